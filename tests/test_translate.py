"""Tests for 02_translate.py: tag extraction, the language check, splitting, alignment, resume, bad input.

Fast tests use tiny random models (they never close the <translated> tag, so every
translation they make is null with reason no_closing_tag: that is what the pipeline tests
check). The slow tests run the real embedded model.
"""
import importlib.util
import json
import os

import pytest
from tqdm import tqdm

from conftest import REPO, make_tiny_model, read_records, run_script, run_torchrun


def run(script, *args, **kwargs):
    """run_script with one CPU thread: tiny models gain nothing from more, and two threads on
    a busy 2-core machine make every generation step ~15x slower (the threads spin-wait)."""
    return run_script(script, *args, env={"OMP_NUM_THREADS": "1"}, **kwargs)

spec = importlib.util.spec_from_file_location("translate", os.path.join(REPO, "02_translate.py"))
translate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(translate)

SENTENCES = {
    "en": ["The cat is sleeping on the sofa because it is cold outside.",
           "We are going to the market tomorrow morning to buy fresh vegetables."],
    "es": ["El gato duerme en el sofá porque hace frío afuera.",
           "Mañana por la mañana vamos al mercado a comprar verduras frescas."],
    "de": ["Die Katze schläft auf dem Sofa, weil es draußen kalt ist.",
           "Wir gehen morgen früh auf den Markt, um frisches Gemüse zu kaufen."],
}
PROMPTS = {"en": "Describe your morning.", "es": "Describe tu mañana.", "de": "Beschreibe deinen Morgen."}


def answer(text, truncated=False):
    """A generate_batches sample: what the model wrote after the primed <translated> tag."""
    return {"text": text, "truncated": truncated, "new_tokens": 1}


def write_responses(path, model, langs=("en", "es", "de"), ids=("a", "b"), responses=None):
    """A responses.jsonl as 01 writes it: every id in every language, N responses each."""
    with open(path, "w", encoding="utf-8") as handle:
        for lang in langs:
            for record_id in ids:
                texts = responses(lang, record_id) if responses else SENTENCES[lang]
                handle.write(json.dumps({
                    "id": record_id, "lang": lang, "prompt": PROMPTS[lang], "responses": texts,
                    "truncated": [False] * len(texts), "model": model, "extra": f"{record_id}-{lang}",
                    "sampling": {"temperature": 0.0, "num_samples": len(texts)}}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """A tiny random model whose context is only 256 tokens, so long texts must be split."""
    directory = make_tiny_model(tmp_path_factory.mktemp("tiny-short-context"))
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["max_position_embeddings"] = 256
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    return directory


# ----------------------------------------------------------------------------
# Pieces that need no model


@pytest.mark.parametrize("output, expected", [
    ("El gato duerme.</translated>", ("El gato duerme.", None)),
    ("  El gato duerme.\n</translated>\nAnything after is ignored.", ("El gato duerme.", None)),
    ("El gato duerme.", (None, "no_closing_tag")),
    ("El gato duerme.</translate>", (None, "no_closing_tag")),
    ("<translated>El gato duerme.</translated></translated>", ("El gato duerme.", None)),  # nested
    ("Hola.</translated>\n<translated>Adiós.</translated>", ("Hola.", None)),  # repeated: the first wins
    ("<sentence>Hola.</sentence></translated>", ("Hola.", None)),  # echoed source tags
    ("</translated>", (None, "empty")),
    ("  \n <translated> </translated>", (None, "empty")),
    ("", (None, "no_closing_tag")),
])
def test_extract_translation(output, expected):
    assert translate.extract_translation(output) == expected


def test_wrong_language_becomes_null_and_right_language_survives():
    spanish, english = SENTENCES["es"][0], SENTENCES["en"][0]
    assert translate.check_language(spanish, "es") == (spanish, None)
    assert translate.check_language(english, "en") == (english, None)
    assert translate.check_language(english, "es") == (None, "wrong_language")  # the model did not translate
    assert translate.check_language(SENTENCES["de"][1], "es") == (None, "wrong_language")
    assert translate.check_language("12 + 30 = 42", "zh") == ("12 + 30 = 42", None)  # numbers are exempt
    code = "def f(x):\n    return [x * 2 for x in range(10)]"
    assert translate.check_language(code, "ru") == (code, None)  # and so is code
    # The same through a whole job: one piece, the model's answer in English for a Spanish target.
    job = {"target": "es", "pieces": [(english, "")]}
    assert translate.finish_job(job, [answer(SENTENCES["en"][1] + "</translated>")]) == (None, "wrong_language")
    assert translate.finish_job(job, [answer(english + "</translated>")]) == (None, "copied")  # the source again
    assert translate.finish_job(job, [answer(spanish + "</translated>")]) == (spanish, None)
    # No closing tag: the model ended its turn without one, or was cut off by the length cap.
    assert translate.finish_job(job, [answer(spanish)]) == (None, "no_closing_tag")
    assert translate.finish_job(job, [answer(spanish, truncated=True)]) == (None, "length_cap")
    assert translate.finish_job({"target": "es", "pieces": []}, []) == (None, "empty_source")


def test_a_copied_sentence_is_a_copy_even_among_translated_ones():
    source = "Drink a glass of water every morning. Sleep eight hours.\nSee a doctor: Dr. Smith."
    spanish = "Bebe un vaso de agua cada mañana. Duerme ocho horas."
    job = {"target": "es", "pieces": [(source, "")]}
    # The translation is mostly Spanish, so the language check passes, but it repeats a source sentence.
    mixed = spanish + " Drink a glass of water every morning."
    assert translate.check_language(mixed, "es") == (mixed, None)
    assert translate.finish_job(job, [answer(mixed + "</translated>")]) == (None, "copied")
    # Names and short phrases carried over unchanged are not copies (under 20 letters or 4 words).
    kept = spanish + " Consulta a un médico: Dr. Smith."
    assert translate.finish_job(job, [answer(kept + "</translated>")]) == (kept, None)
    # A failed or copied piece is worth a second attempt; a good one, or a short one in any language, is not.
    assert translate.worth_retrying(source, answer(mixed + "</translated>"), "es")
    assert translate.worth_retrying(source, answer(spanish), "es")  # no closing tag
    assert not translate.worth_retrying(source, answer(kept + "</translated>"), "es")
    assert translate.worth_retrying(source, answer("Trink jeden Morgen ein Glas Wasser und schlafe acht Stunden "
                                                   "lang.</translated>"), "es")  # German, not Spanish
    assert not translate.worth_retrying("OK.", answer("OK.</translated>"), "es")


def translate_one(monkeypatch, tokenizer, response, flags, reply):
    """translate_records on one English record into Spanish, with the model replaced by reply(piece, temperature).
    Returns (the finished record, [(temperature, [pieces sent])] per call)."""
    calls = []

    def generate(engine, tokenizer, requests, batch_size, sampling, progress):
        calls.append((sampling["temperature"], [piece for _, _, piece, _ in requests]))
        return [answer(reply(piece, sampling["temperature"]) + "</translated>") for _, _, piece, _ in requests]

    monkeypatch.setattr(translate, "generate_translations", generate)
    args = translate.parse_args(flags)
    args.translator = "stand-in"
    record = {"id": "a", "lang": "en", "prompt": "p", "responses": [response]}
    [[finished]] = translate.translate_records([record], {("a", "en"): ["es"]}, "stand-in engine", tokenizer, 2048,
                                              args, {}, tqdm(disable=True), [0])
    return finished, calls


def test_retries_are_counted_per_target(monkeypatch, tiny_model):
    """One English answer into Spanish and German: only the Spanish piece is copied greedily and asked again,
    so only Spanish counts a retry (a count per response alone would be overwritten by the last target)."""
    tokenizer = translate.common.load_tokenizer(tiny_model)
    english = SENTENCES["en"][0]

    def generate(engine, tokenizer, requests, batch_size, sampling, progress):
        return [answer((piece if target == "es" and sampling["temperature"] == 0 else
                        dict(zip(SENTENCES["en"], SENTENCES[target]))[piece]) + "</translated>")
                for _, _, piece, target in requests]

    monkeypatch.setattr(translate, "generate_translations", generate)
    args = translate.parse_args([])
    args.translator = "stand-in"
    record = {"id": "a", "lang": "en", "prompt": "p", "responses": [english]}
    [[finished]] = translate.translate_records([record], {("a", "en"): ["es", "de"]}, "stand-in engine", tokenizer,
                                              2048, args, {}, tqdm(disable=True), [0])
    assert finished["translations"] == {"es": [SENTENCES["es"][0]], "de": [SENTENCES["de"][0]]}
    assert finished["translation_info"]["retried"] == {"es": [1], "de": [0]}


def test_pieces_are_translated_apart_and_failed_ones_asked_again_sampled(monkeypatch, tiny_model):
    tokenizer = translate.common.load_tokenizer(tiny_model)
    english = SENTENCES["en"][0] + " " + SENTENCES["en"][1]
    spanish = dict(zip(SENTENCES["en"], SENTENCES["es"]))
    # --piece-tokens 16: the two sentences go as two pieces and come back joined, in order.
    finished, calls = translate_one(monkeypatch, tokenizer, english, ["--piece-tokens", "16", "--retries", "0"],
                                    lambda piece, temperature: spanish[piece])
    assert calls == [(0.0, SENTENCES["en"])]
    assert finished["translations"]["es"] == [" ".join(SENTENCES["es"])]
    assert finished["translation_info"]["pieces"] == [2] and finished["translation_info"]["retried"] == {"es": [0]}
    # Greedy copies the second sentence; the sampled retry translates it. Only that piece is asked again.
    def copies_second(piece, temperature):
        return piece if temperature == 0 and piece == SENTENCES["en"][1] else spanish[piece]
    finished, calls = translate_one(monkeypatch, tokenizer, english, ["--piece-tokens", "16"], copies_second)
    assert calls == [(0.0, SENTENCES["en"]), (0.7, [SENTENCES["en"][1]])]
    assert finished["translations"]["es"] == [" ".join(SENTENCES["es"])]
    assert finished["translation_info"]["retried"] == {"es": [1]}
    # Without retries the copy makes the whole text null, with its own reason.
    finished, _ = translate_one(monkeypatch, tokenizer, english, ["--piece-tokens", "16", "--retries", "0"],
                                copies_second)
    assert finished["translations"]["es"] == [None] and finished["translation_info"]["es"] == ["copied"]
    # --piece-tokens 0: the whole text in one call.
    _, calls = translate_one(monkeypatch, tokenizer, english, ["--piece-tokens", "0", "--retries", "0"],
                             lambda piece, temperature: " ".join(SENTENCES["es"]))
    assert calls == [(0.0, [english])]


def test_split_text_packs_paragraphs_then_cuts_finer():
    text = "First para.\n\nSecond para.\n\nA third paragraph that is long. It has two sentences."
    fits = lambda piece: len(piece) <= 31  # noqa: E731
    pieces = translate.split_text(text, fits)
    assert pieces == [("First para.\n\nSecond para.", "\n\n"),
                      ("A third paragraph that is long.", " "),  # the full stop stays with its sentence
                      ("It has two sentences.", "")]
    assert "".join(piece + separator for piece, separator in pieces) == text
    assert translate.split_text("short", fits) == [("short", "")]
    # One finished job joins its pieces' translations with the original separators.
    job = {"target": "en", "pieces": pieces}
    outputs = [answer("One.\n\nTwo.</translated>"), answer("Three is long.</translated>"),
               answer("It has two sentences.</translated>")]
    assert translate.finish_job(job, outputs) == ("One.\n\nTwo.\n\nThree is long. It has two sentences.", None)
    outputs[1] = answer("never closed")
    assert translate.finish_job(job, outputs) == (None, "no_closing_tag")


def test_plan_targets_both_directions_and_targets_flag():
    records = [{"id": "a", "lang": lang} for lang in ("en", "es", "de", "ru")]
    assert translate.plan_targets(records, "en", None) == {
        ("a", "en"): ["es", "de", "ru"], ("a", "es"): ["en"], ("a", "de"): ["en"], ("a", "ru"): ["en"]}
    # --targets es,fr: German and Russian are left untranslated (and counted), French is made though absent.
    assert translate.plan_targets(records, "en", ["es", "fr"]) == {
        ("a", "en"): ["es", "fr"], ("a", "es"): ["en"], ("a", "de"): [], ("a", "ru"): []}
    # Another dominant language.
    assert translate.plan_targets(records, "es", None)[("a", "en")] == ["es"]
    assert translate.plan_targets(records, "es", None)[("a", "es")] == ["en", "de", "ru"]
    # --no-into-dominant: only out of the dominant language.
    assert translate.plan_targets(records, "en", None, into_dominant=False) == {
        ("a", "en"): ["es", "de", "ru"], ("a", "es"): [], ("a", "de"): [], ("a", "ru"): []}


def test_length_cap_and_token_ratios(tiny_model):
    assert translate.max_new_tokens(10, 1.0) == 36       # 2 x 10 + 16
    assert translate.max_new_tokens(10, 3.5) == 86       # a costlier target language: 2 x 3.5 x 10 + 16
    assert translate.max_new_tokens(10, 0.3) == 36       # a cheaper one still gets 2x
    assert translate.piece_limit(1000, 100, 1.0) == 294  # (1000 - 100 - 16) / 3
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = {("a", "en"): "Hello there.", ("a", "ru"): "Привет.",
             ("b", "en"): "Good morning.", ("b", "ru"): "Доброе утро."}
    ratios = translate.token_ratios([{"id": i, "lang": lang, "prompt": t} for (i, lang), t in texts.items()], tokenizer)
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    english = count(texts["a", "en"]) + count(texts["b", "en"])
    russian = count(texts["a", "ru"]) + count(texts["b", "ru"])
    assert ratios["en", "ru"] == pytest.approx(russian / english)
    assert ratios["ru", "en"] == pytest.approx(english / russian)
    assert ratios["en", "en"] == 1.0


# ----------------------------------------------------------------------------
# The script, with tiny models


def test_translations_align_with_responses(tmp_path, short_context_model):
    long_response = "\n\n".join(["This paragraph says one thing twice, so that it is long. " * 2] * 3)
    texts = {("a", "en"): [SENTENCES["en"][0], "", long_response]}
    responses = lambda lang, record_id: texts.get((record_id, lang), SENTENCES[lang] + ["42"])  # noqa: E731
    source = write_responses(tmp_path / "responses.jsonl", short_context_model, responses=responses)
    output = tmp_path / "translated.jsonl"
    result = run("02_translate.py", "--input", source, "--output", output, "--questions", "--batch-size", 4)
    assert result.returncode == 0, result.stderr
    records = read_records(output)
    inputs = read_records(source)
    assert [(r["id"], r["lang"]) for r in records] == [(r["id"], r["lang"]) for r in inputs]
    for record, given in zip(records, inputs):
        assert {k: record[k] for k in given} == given  # every input field carried through unchanged
        expected_targets = ["es", "de"] if record["lang"] == "en" else ["en"]
        assert list(record["translations"]) == expected_targets
        info = record["translation_info"]
        assert info["translator"] == short_context_model  # default: the model that wrote the responses
        for target in expected_targets:
            assert len(record["translations"][target]) == len(record["responses"]) == 3
            assert len(info[target]) == 3
            for text, reason, response in zip(record["translations"][target], info[target], record["responses"]):
                # A random model never closes the tag; an empty response is never sent to it.
                assert text is None
                assert reason == "empty_source" if response == "" else reason in ("length_cap", "no_closing_tag")
        if record["lang"] == "en":
            assert "prompt_en" not in record and "prompt_en" not in info
        else:
            assert record["prompt_en"] is None and info["prompt_en"] in ("length_cap", "no_closing_tag")
            assert info["prompt_pieces"] == 1
    # The long response did not fit the 256-token context and went in several pieces.
    long_record = records[0]
    assert long_record["translation_info"]["pieces"][1] == 0           # empty: nothing to translate
    assert long_record["translation_info"]["pieces"][0] == 1
    assert long_record["translation_info"]["pieces"][2] >= 2
    assert all(r["translation_info"]["pieces"] == [1, 1, 1] for r in records[1:])
    # The summary counts every null, by direction and reason.
    assert "en->es" in result.stdout and "de->en" in result.stdout and "question es->en" in result.stdout
    assert "ok 0" in result.stdout and "empty source 2" in result.stdout
    summary_line = result.stdout.strip().splitlines()[-2]  # "translate: records 6, ..., time 1.0s, N tokens (...)"
    summary = dict(part.rsplit(" ", 1) for part in summary_line.split(": ", 1)[1].split(", ")[:-2])
    assert int(summary["no closing tag"]) + int(summary["length cap"]) == 26  # en: 2x2x3 - 2; es, de: 4x3; 4 questions
    assert summary["null"] == "28" and summary["texts"] == "28" and summary["records"] == "6"
    assert not [name for name in os.listdir(tmp_path) if ".part" in name]


def test_resume_from_torn_part_file_and_other_translator(tmp_path, tiny_model, tiny_model_b):
    source = write_responses(tmp_path / "responses.jsonl", tiny_model)
    first = tmp_path / "first.jsonl"
    run("02_translate.py", "--input", source, "--output", first, "--translator", tiny_model_b, check=True)
    complete = read_records(first)
    assert all(r["translation_info"]["translator"] == tiny_model_b for r in complete)
    # A killed run: two records on disk (marked, to see they are not redone) and a torn third line.
    output = tmp_path / "translated.jsonl"
    with open(f"{output}.part0", "w", encoding="utf-8") as handle:
        for record in complete[:2]:
            handle.write(json.dumps({**record, "written_before_kill": True}, ensure_ascii=False) + "\n")
        handle.write(json.dumps(complete[2], ensure_ascii=False)[:40])
    result = run("02_translate.py", "--input", source, "--output", output, "--translator", tiny_model_b)
    assert result.returncode == 0, result.stderr
    resumed = read_records(output)
    assert [(r["id"], r["lang"]) for r in resumed] == [(r["id"], r["lang"]) for r in complete]  # each exactly once
    assert [r.get("written_before_kill", False) for r in resumed] == [True, True, False, False, False, False]
    assert [{k: v for k, v in r.items() if k != "written_before_kill"} for r in resumed] == complete
    assert "resumed 2" in result.stdout and "translated now 4" in result.stdout
    assert not os.path.exists(f"{output}.part0")
    again = run("02_translate.py", "--input", source, "--output", output, "--translator", tiny_model_b)  # the same
    assert again.returncode == 0 and "already exists" in again.stdout


@pytest.mark.parametrize("bad_line, message", [
    ({"id": "a", "lang": "es", "prompt": "x"}, "missing field 'responses'"),
    ({"id": "a", "lang": "xx", "prompt": "x", "responses": ["y"]}, "unknown language code 'xx'"),
    ({"id": "a", "lang": "es", "prompt": "x", "responses": "not a list"}, "'responses' must be a list of strings"),
    ({"id": "a", "lang": "en", "prompt": "x", "responses": ["y"]}, "id 'a' in language 'en' already on line 1"),
    ({"id": "c", "lang": "es", "responses": ["y"]}, "missing field 'prompt'"),
    ({"id": "c", "lang": "es", "prompt": ["x"], "responses": ["y"]}, "'prompt' must be a string, not list"),
    ({"id": "c", "lang": "es", "prompt": "x", "responses": ["y"], "score": float("nan")}, "not valid JSON (NaN is"),
    ({"id": "c", "lang": "es", "prompt": "x", "responses": ["y"], "model": "another"}, "written by 'another'"),
])
def test_bad_input_names_file_and_line(tmp_path, bad_line, message):
    source = tmp_path / "responses.jsonl"
    good = {"id": "a", "lang": "en", "prompt": "x", "responses": ["y"], "model": "m"}
    lines = [good, {**good, "id": "b"}, {"model": "m", **bad_line}]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(translate.common.InputError) as error:
        rows = translate.read_responses(str(source), limit=None)
        translate.pick_translator(rows, str(source), None)
    assert str(error.value).startswith(f"{source}:3: {message}")


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    source = tmp_path / "responses.jsonl"
    source.write_text(json.dumps({"id": "a", "lang": "en", "prompt": "x", "responses": ["y"]}) + "\n"
                      + json.dumps({"id": "a", "lang": "xx", "prompt": "x", "responses": ["y"]}) + "\n")
    output = tmp_path / "translated.jsonl"
    result = run("02_translate.py", "--input", source, "--output", output)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: {source}:2: unknown language code 'xx'")
    assert not [name for name in os.listdir(tmp_path) if name.startswith("translated")]


# ----------------------------------------------------------------------------
# The real embedded model


@pytest.mark.slow
def test_real_model_translates_into_spanish_and_back(tmp_path):
    english = ["The cat is sleeping on the sofa.", "I drink coffee every morning."]
    source = write_responses(tmp_path / "en.jsonl", "smollm2-135m", langs=("en",), ids=("a",),
                             responses=lambda lang, record_id: english)
    to_spanish = tmp_path / "es.jsonl"
    result = run("02_translate.py", "--input", source, "--output", to_spanish, "--targets", "es", check=True)
    [record] = read_records(to_spanish)
    spanish, reasons = record["translations"]["es"], record["translation_info"]["es"]
    assert len(spanish) == len(reasons) == 2 and "en->es" in result.stdout
    for text, reason in zip(spanish, reasons):  # the language check ran on each: a text, or why not
        assert (text is None) != (reason is None)
        assert text is None or translate.common.detect_language(text) in (None, "es")
        assert reason in (None, "no_closing_tag", "length_cap", "empty", "wrong_language")
    assert any(text is not None for text in spanish), f"no Spanish translation survived: {reasons}"
    # Back: the surviving Spanish texts are the responses of a Spanish record.
    back_source = tmp_path / "es-responses.jsonl"
    back_source.write_text(json.dumps({"id": "a", "lang": "es", "prompt": "x", "model": "smollm2-135m",
                                       "responses": [t for t in spanish if t is not None]}, ensure_ascii=False) + "\n")
    back = tmp_path / "back.jsonl"
    result = run("02_translate.py", "--input", back_source, "--output", back, "--targets", "es", check=True)
    [record] = read_records(back)
    assert list(record["translations"]) == ["en"] and "es->en" in result.stdout
    for text, reason in zip(record["translations"]["en"], record["translation_info"]["en"]):
        assert (text is None) != (reason is None)
        assert text is None or translate.common.detect_language(text) in (None, "en")


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path):
    third = {"en": "My sister reads a book every evening.", "es": "Mi hermana lee un libro cada noche."}
    texts = {(record_id, lang): [text] for lang in ("en", "es")
             for record_id, text in zip("abc", SENTENCES[lang] + [third[lang]])}
    source = write_responses(tmp_path / "responses.jsonl", "smollm2-135m", langs=("en", "es"), ids=("a", "b", "c"),
                             responses=lambda lang, record_id: texts[record_id, lang])
    single, double = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    # Greedy only: the sampled retries draw from each rank's own generator (seed + rank), as 01's sampling does,
    # so with retries the two runs are alike in shape, not in every token.
    flags = ["--input", source, "--batch-size", 1, "--retries", 0]
    run("02_translate.py", *flags, "--output", single, check=True)
    result = run_torchrun("02_translate.py", 2, *flags, "--output", double)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_records(double) == read_records(single)
    assert result.stdout.count("translate: records 6") == 1  # one summary, from rank 0


def test_too_long_counts_context_sized_pieces_not_small_ones():
    """A 30,000-character answer is cut into small pieces and translated; only a runaway one is too_long."""
    count = lambda text: len(text) // 4  # noqa: E731
    record = {"responses": ["Word. " * 5000, "x" * (8 * translate.MAX_PIECES * 600 + 1)], "prompt": "p"}
    long_answer, runaway = translate.make_jobs(record, ["es"], None, count, 48, 600)
    assert long_answer["pieces"] and all(count(piece) <= 48 for piece, _ in long_answer["pieces"])
    assert runaway["pieces"] is None
