"""03_reward.py: each method on a small hand-made input gives exactly the expected rows."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import common
from conftest import REPO, read_records, run_script

spec = importlib.util.spec_from_file_location("reward", os.path.join(REPO, "03_reward.py"))
reward = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reward)


def record(record_id, lang, prompt, responses, translations=None, truncated=None, **extra):
    """A translated.jsonl record as 01 + 02 write it."""
    return {"id": record_id, "lang": lang, "prompt": prompt, **extra, "responses": responses,
            "truncated": truncated or [False] * len(responses), "model": "m", "sampling": {},
            **({"translations": translations} if translations is not None else {})}


TRANSLATED = [
    record("q1", "en", "What is 2+3?", ["2+3 = 5."], {"es": ["2+3 es 5."], "de": [None]}, answer=5),
    record("q2", "en", "Name a color.", ["Blue."], {"es": ["Azul."], "de": ["Blau."]}),
    record("q3", "en", "What is 10-4?", ["10 - 4 = 7."], {"es": ["10 - 4 = 7."], "de": ["10 - 4 = 7."]}, answer=6),
    record("q1", "es", "¿Cuánto es 2+3?", ["Es 6."], {"en": ["It is 6."]}, answer=5),
    record("q2", "es", "Nombra un color.", ["Azul."], {"en": ["Blue."]}),
    record("q3", "es", "¿Cuánto es 10-4?", ["Son 6."], {"en": ["It is 6."]}, answer=6),
    record("q1", "de", "Was ist 2+3?", ["Es ist 5."], {"en": ["It is 5."]}, answer=5),
    record("q2", "de", "Nenne eine Farbe.", ["Rot."], {"en": ["Red."]}, truncated=[True]),
    record("q3", "de", "Was ist 10-4?", ["Das ist 6."], {"en": ["That is 6."]}, answer=6),
]


def write(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for item in records:
            handle.write((item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)) + "\n")
    return str(path)


def run(tmp_path, records, *args, name="pairs"):
    """Run 03 in this process (no interpreter start-up per test); returns (rows, summary)."""
    source = write(tmp_path / "input.jsonl", records)
    output = tmp_path / f"{name}.jsonl"
    reward.main(["--input", source, "--output", str(output), *map(str, args)])
    with open(tmp_path / f"{name}.summary.json", encoding="utf-8") as handle:
        return read_records(output), json.load(handle)


def pair(record_id, lang, prompt, chosen, rejected, translated, source):
    return {"id": record_id, "lang": lang, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "method": "imbalance", "sample": 0, "translated": translated, "translated_from": source}


def test_imbalance_rows(tmp_path):
    rows, summary = run(tmp_path, TRANSLATED, "--method", "imbalance")
    assert rows == [
        pair("q1", "es", "¿Cuánto es 2+3?", "2+3 es 5.", "Es 6.", "chosen", "en"),
        pair("q1", "en", "What is 2+3?", "2+3 = 5.", "It is 6.", "rejected", "es"),
        pair("q3", "es", "¿Cuánto es 10-4?", "10 - 4 = 7.", "Son 6.", "chosen", "en"),
        pair("q3", "en", "What is 10-4?", "10 - 4 = 7.", "It is 6.", "rejected", "es"),
        # q1 de: the English answer's German translation failed (null): skipped
        pair("q1", "en", "What is 2+3?", "2+3 = 5.", "It is 5.", "rejected", "de"),
        pair("q3", "de", "Was ist 10-4?", "10 - 4 = 7.", "Das ist 6.", "chosen", "en"),
        pair("q3", "en", "What is 10-4?", "10 - 4 = 7.", "That is 6.", "rejected", "de"),
    ]
    assert summary["per_language"] == {
        "en": {"made": 4, "skipped": {"identical": 1, "truncated": 1}},
        "es": {"made": 2, "skipped": {"identical": 1}},
        "de": {"made": 1, "skipped": {"null_translation": 1, "truncated": 1}}}


def test_imbalance_without_translations_into_english(tmp_path):
    """02 --no-into-dominant: the X prompts' pairs are made as before; the English prompts' are skipped, counted."""
    records = [dict(r, translations={}) if r["lang"] != "en" else r for r in TRANSLATED]
    rows, summary = run(tmp_path, records, "--method", "imbalance")
    assert [(r["id"], r["lang"]) for r in rows] == [("q1", "es"), ("q3", "es"), ("q3", "de")]
    assert summary["per_language"] == {
        "en": {"made": 0, "skipped": {"not_translated": 6}},
        "es": {"made": 2, "skipped": {"identical": 1}},
        "de": {"made": 1, "skipped": {"null_translation": 1, "truncated": 1}}}
    # An X record that never went through 02 at all is still an error, naming its line.
    with pytest.raises(common.InputError, match=r"input.jsonl:4: no translations \(run 02_translate.py\)"):
        run(tmp_path, [{k: v for k, v in r.items() if k != "translations"} if r["lang"] == "es" else r
                       for r in records], "--method", "imbalance")


def test_imbalance_check_answer(tmp_path):
    """q3's English answer says 7, gold is 6: with --check-answer its pairs go, in both directions.

    --langs en,es leaves German out altogether."""
    rows, summary = run(tmp_path, TRANSLATED, "--method", "imbalance", "--check-answer", "--langs", "en,es")
    assert [(r["id"], r["lang"], r["translated_from"]) for r in rows] == [("q1", "es", "en"), ("q1", "en", "es")]
    assert summary["per_language"] == {"en": {"made": 1, "skipped": {"identical": 1, "wrong_answer": 1}},
                                       "es": {"made": 1, "skipped": {"identical": 1, "wrong_answer": 1}}}


def test_crossin_rows(tmp_path):
    rows, summary = run(tmp_path, TRANSLATED, "--method", "crossin", "--langs", "es")
    assert rows == [
        {"id": "q1", "lang": "es", "prompt": "What is 2+3?\n\nPlease answer in Spanish.", "completion": "2+3 es 5.",
         "method": "crossin", "kind": "answer_in_x", "sample": 0},
        {"id": "q2", "lang": "es", "prompt": "Name a color.\n\nPlease answer in Spanish.", "completion": "Azul.",
         "method": "crossin", "kind": "answer_in_x", "sample": 0},
        {"id": "q3", "lang": "es", "prompt": "What is 10-4?\n\nPlease answer in Spanish.", "completion": "10 - 4 = 7.",
         "method": "crossin", "kind": "answer_in_x", "sample": 0},
        {"id": "q1", "lang": "es", "prompt": "¿Cuánto es 2+3?\n\nPlease answer in English.", "completion": "2+3 = 5.",
         "method": "crossin", "kind": "answer_in_en", "sample": 0},
        {"id": "q2", "lang": "es", "prompt": "Nombra un color.\n\nPlease answer in English.", "completion": "Blue.",
         "method": "crossin", "kind": "answer_in_en", "sample": 0},
        {"id": "q3", "lang": "es", "prompt": "¿Cuánto es 10-4?\n\nPlease answer in English.",
         "completion": "10 - 4 = 7.", "method": "crossin", "kind": "answer_in_en", "sample": 0},
        {"id": "q1", "lang": "es", "prompt": "Translate the following Spanish instruction into English.\n\n"
         "¿Cuánto es 2+3?", "completion": "What is 2+3?", "method": "crossin", "kind": "translate"},
        {"id": "q2", "lang": "es", "prompt": "Translate the following Spanish instruction into English.\n\n"
         "Nombra un color.", "completion": "Name a color.", "method": "crossin", "kind": "translate"},
        {"id": "q3", "lang": "es", "prompt": "Translate the following Spanish instruction into English.\n\n"
         "¿Cuánto es 10-4?", "completion": "What is 10-4?", "method": "crossin", "kind": "translate"},
    ]
    assert summary["per_language"] == {"es": {"made": 9, "skipped": {}}}


def test_crossin_mix_ratios(tmp_path):
    args = ("--method", "crossin", "--mix-answer-in-x", "0", "--mix-answer-in-en", "0.5", "--mix-translate", "1")
    rows, summary = run(tmp_path, TRANSLATED, *args)
    kinds = [row["kind"] for row in rows]
    # answer_in_x: 5 possible (q1 de is null), none kept; answer_in_en: 6 possible, 3 kept; translate: all 6
    assert (kinds.count("answer_in_x"), kinds.count("answer_in_en"), kinds.count("translate")) == (0, 3, 6)
    skipped = {lang: summary["per_language"][lang]["skipped"] for lang in ("es", "de")}
    assert sum(s.get("mix_answer_in_x", 0) for s in skipped.values()) == 5
    assert sum(s.get("mix_answer_in_en", 0) for s in skipped.values()) == 3
    assert skipped["de"]["null_translation"] == 1
    again, _ = run(tmp_path, TRANSLATED, *args, name="again")
    assert again == rows  # the mix is drawn from --seed


def test_qalign_rows(tmp_path):
    rows, _ = run(tmp_path, TRANSLATED, "--method", "qalign", "--langs", "de")
    assert rows == [{"id": f"q{i}", "lang": "de", "prompt": "Translate the following question from German into "
                     f"English.\n\n{german}", "completion": english, "method": "qalign", "source": "gold"}
                    for i, german, english in [(1, "Was ist 2+3?", "What is 2+3?"),
                                               (2, "Nenne eine Farbe.", "Name a color."),
                                               (3, "Was ist 10-4?", "What is 10-4?")]]


def test_qalign_from_prompt_en(tmp_path):
    """Without English records the question's own translation (02 --questions) is the target; null is skipped."""
    prompts = [{"id": "a", "lang": "fr", "prompt": "Combien font 2+2 ?", "prompt_en": "How much is 2+2?"},
               {"id": "b", "lang": "fr", "prompt": "Quelle heure est-il ?", "prompt_en": None}]
    rows, summary = run(tmp_path, prompts, "--method", "qalign")
    assert rows == [{"id": "a", "lang": "fr", "prompt": "Translate the following question from French into English."
                     "\n\nCombien font 2+2 ?", "completion": "How much is 2+2?", "method": "qalign",
                     "source": "prompt_en"}]
    assert summary["per_language"] == {"fr": {"made": 1, "skipped": {"null_translation": 1}}}


def test_eval_split_by_id(tmp_path):
    many = [record(f"p{i}", lang, f"prompt {i} {lang}", [f"answer {i} {lang}"],
                   {"en": [f"translated {i}"]} if lang == "es" else {"es": [f"traducido {i}"]})
            for lang in ("en", "es") for i in range(20)]
    rows, summary = run(tmp_path, many, "--method", "imbalance", "--eval-frac", "0.25", "--seed", "3")
    held_out = read_records(tmp_path / "pairs.eval.jsonl")
    assert len({r["id"] for r in held_out}) == 5 and len(rows) + len(held_out) == 40
    assert not {r["id"] for r in rows} & {r["id"] for r in held_out}
    assert (summary["rows"], summary["eval_rows"]) == (30, 10)
    run(tmp_path, many, "--method", "imbalance", "--eval-frac", "0.25", "--seed", "3", name="again")
    assert read_records(tmp_path / "again.eval.jsonl") == held_out  # deterministic by seed
    # --conversational: the same rows and split, in TRL's conversational form.
    chat, _ = run(tmp_path, many, "--method", "imbalance", "--eval-frac", "0.25", "--seed", "3", "--conversational",
                  name="chat")
    assert chat == [common.conversational(row) for row in rows]
    assert chat[0]["prompt"] == [{"role": "user", "content": rows[0]["prompt"]}]


def test_command_line_and_rerun(tmp_path):
    """As a user runs it: exit 0, a summary line; run again, it says the output is complete and does nothing."""
    source = write(tmp_path / "input.jsonl", TRANSLATED)
    first = run_script("03_reward.py", "--input", source, "--output", tmp_path / "pairs.jsonl")
    assert first.returncode == 0, first.stderr
    assert "03_reward: method imbalance, rows 7, eval rows 0, skipped 5" in first.stdout
    second = run_script("03_reward.py", "--input", source, "--output", tmp_path / "pairs.jsonl")
    assert second.returncode == 0 and "already exists" in second.stdout
    assert len(read_records(tmp_path / "pairs.jsonl")) == 7


# ----------------------------------------------------------------------------
# Bad input: one line naming file and line, exit 2, nothing written.

GOOD = [json.dumps(r, ensure_ascii=False) for r in TRANSLATED]
NO_GERMAN = [json.dumps(dict(r, translations={"es": r["translations"]["es"]}), ensure_ascii=False)
             if r["lang"] == "en" else json.dumps(r, ensure_ascii=False) for r in TRANSLATED]


@pytest.mark.parametrize("lines,args,message", [
    (GOOD[:4] + ['{"id": "q2", "lang": "es", "prompt": "Nombra un color."}'] + GOOD[5:], (),
     ":5: missing field 'responses'"),
    (GOOD[:3] + [GOOD[3].replace('"q1"', '"q9"')] + GOOD[4:], (),
     ":1: id 'q1' is in 'en' but not in es"),
    (GOOD + [json.dumps(record("q7", "es", "Hola", ["Hola"], {"en": ["Hi"]}))], (),
     ":10: id 'q7' in 'es' has no 'en' record with the same id"),
    (NO_GERMAN, (), ":1: the 'en' record has no translations into 'de'"),
    (GOOD[3:], (), "no 'en' records; imbalance needs the teacher's answers"),
    (GOOD[:2] + [GOOD[2].replace('"translations": {', '"translations": {"fr": [], ')] + GOOD[3:], (),
     ":3: translations['fr'] must be 1 strings or nulls, one per response"),
    (GOOD[:1] + ["{not json"] + GOOD[2:], (), ":2: not valid JSON"),
    (GOOD, ("--method", "implicit", "--dpo-model", "a", "--ref-model", "b"),
     "one answer per prompt; implicit rewarding picks the best and worst of N"),
    (GOOD, ("--method", "implicit", "--dpo-model", "a"), "--method implicit needs --dpo-model and --ref-model"),
    (GOOD, ("--langs", "xx"), "--langs: unknown language code 'xx'"),
])
def test_bad_input(tmp_path, capsys, lines, args, message):
    """Through common.run_main, as the command line runs main(): one line on stderr, exit code 2."""
    source = write(tmp_path / "input.jsonl", lines)
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(lambda: reward.main(["--input", source, "--output", str(tmp_path / "out" / "pairs.jsonl"),
                                             "--eval-frac", "0.5", *args]))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr, stderr
    if message.startswith(":"):
        assert stderr.startswith(f"error: {source}{message.split(' ')[0]}")
    assert not os.path.exists(tmp_path / "out")  # nothing written, not even half


def test_bad_input_command_line(tmp_path):
    source = write(tmp_path / "input.jsonl", GOOD[:4] + ['{"id": "q2", "lang": "es"}'] + GOOD[5:])
    result = run_script("03_reward.py", "--input", source, "--output", tmp_path / "out" / "pairs.jsonl")
    assert result.returncode == 2 and result.stderr == f"error: {source}:5: missing field 'prompt'\n"
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------
# Implicit cross-lingual rewarding


def test_length_control_removes_length_bias():
    """Synthetic scores where longer answers earn more reward: the chosen alpha cancels the bias."""
    generator = np.random.default_rng(0)
    lengths = generator.integers(50, 800, size=(300, 6)).astype(float)
    rewards = 0.02 * lengths + generator.normal(0, 3, size=lengths.shape)
    valid = np.ones_like(lengths, dtype=bool)
    valid[:50, 4:] = False  # some prompts have fewer usable samples
    _, gap_without = reward.choose_alpha(rewards, lengths, valid, [0.0])
    alpha, gap = reward.search_alpha(rewards, lengths, valid)
    assert gap_without > 300  # without control the chosen answer is much longer
    assert abs(gap) < 2 and 0.015 < alpha < 0.025
    # a padded (invalid) sample is never chosen or rejected, whatever its numbers
    rewards[:50, 4:], lengths[:50, 4:] = 1e9, 1e9
    assert reward.choose_alpha(rewards, lengths, valid, [alpha]) == (alpha, gap)


def test_choose_alpha_prefers_smallest_change():
    rewards = np.array([[3.0, 1.0], [2.0, 0.0]])
    lengths = np.array([[10.0, 10.0], [5.0, 5.0]])  # equal lengths: every alpha gives gap 0
    assert reward.choose_alpha(rewards, lengths, np.ones((2, 2), bool), [-1.0, 0.5, 0.0, 2.0]) == (0.0, 0.0)


IMPLICIT = [
    record("q1", "en", "Name a color.", ["Blue.", "Red is a color I like a lot.", "Green"]),
    record("q2", "en", "Say hi.", ["Hi!", "Hello there, my friend.", "Hey"], truncated=[False, False, True]),
    record("q3", "en", "Count to three.", ["1 2 3", "1 2 3"]),
    record("q1", "es", "Nombra un color.", ["Azul.", "El rojo es un color que me gusta.", "Verde"]),
    record("q2", "es", "Di hola.", ["¡Hola!", "Hola, amigo.", "Hola, amigo mío, ¿qué tal?"]),
    record("q3", "es", "Cuenta hasta tres.", ["uno dos tres", "Uno, dos, tres."]),
]


def reference_logp(model, tokenizer, prompt, response):
    """One sequence, full float64 log-softmax: the obviously correct summed log-prob."""
    prompt_ids = common.chat_prompt_ids(tokenizer, prompt)
    ids = prompt_ids + tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(logps[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))


@pytest.fixture(scope="module")
def implicit_expected(tiny_model, tiny_model_b):
    """(id, lang) -> rewards of every sample, scored after the English instruction (+ 'answer in Spanish')."""
    dpo, tokenizer = common.load_model(tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    ref, _ = common.load_model(tiny_model_b, device=torch.device("cpu"), dtype=torch.float32)
    english = {r["id"]: r["prompt"] for r in IMPLICIT if r["lang"] == "en"}
    expected = {}
    for r in IMPLICIT:
        prompt = english[r["id"]] + ("\n\nPlease answer in Spanish." if r["lang"] == "es" else "")
        expected[(r["id"], r["lang"])] = [0.5 * (reference_logp(dpo, tokenizer, prompt, text)
                                                 - reference_logp(ref, tokenizer, prompt, text))
                                          for text in r["responses"]]
    return expected


def test_implicit_rows(tmp_path, tiny_model, tiny_model_b, implicit_expected):
    rows, summary = run(tmp_path, IMPLICIT, "--method", "implicit", "--dpo-model", tiny_model,
                        "--ref-model", tiny_model_b, "--beta", "0.5", "--alpha", "0", "--batch-size", "2")
    expected_rows = []
    for r in IMPLICIT:
        candidates = [i for i in range(len(r["responses"])) if not r["truncated"][i]]
        rewards = implicit_expected[(r["id"], r["lang"])]
        best = max(candidates, key=lambda i: rewards[i])
        worst = min(candidates, key=lambda i: rewards[i])
        if r["id"] != "q3" or r["lang"] != "en":  # q3 en: two identical answers, equal rewards: no pair
            expected_rows.append((r["id"], r["lang"], r["prompt"], r["responses"][best], r["responses"][worst],
                                  best, worst))
    expected_rows.sort(key=lambda row: row[1] != "en")  # rows come language by language, English first
    assert [(r["id"], r["lang"], r["prompt"], r["chosen"], r["rejected"], r["chosen_sample"], r["rejected_sample"])
            for r in rows] == expected_rows
    for row in rows:
        expected = implicit_expected[(row["id"], row["lang"])]
        assert row["chosen_reward"] == pytest.approx(expected[row["chosen_sample"]], abs=1e-4)
        assert row["rejected_reward"] == pytest.approx(expected[row["rejected_sample"]], abs=1e-4)
        assert (row["alpha"], row["beta"], row["method"]) == (0.0, 0.5, "implicit")
    q2 = next(row for row in rows if row["id"] == "q2" and row["lang"] == "en")
    assert q2["rewards"][2] is None  # the truncated sample was not a candidate
    assert summary["per_language"]["en"]["skipped"] == {"all_equal": 1, "truncated_sample": 1}


def test_implicit_scores_are_cached(tmp_path, tiny_model, tiny_model_b):
    """A killed run leaves scores in a part file; the rerun uses them instead of scoring again."""
    args = ("--method", "implicit", "--dpo-model", tiny_model, "--ref-model", tiny_model_b, "--alpha", "0")
    rows, _ = run(tmp_path, IMPLICIT, *args)
    scores = read_records(tmp_path / "pairs.scores.jsonl")
    assert [(s["id"], s["lang"]) for s in scores] == [(r["id"], r["lang"]) for r in IMPLICIT]
    # Pretend a run was killed after scoring q1/es, with scores no model would give: sample 1 best, 0 worst.
    fake = dict(next(s for s in scores if (s["id"], s["lang"]) == ("q1", "es")),
                dpo_logps=[-50.0, 50.0, 0.0], ref_logps=[0.0, 0.0, 0.0])
    stale = dict(fake, id="q2", dpo_model="another-model")  # made with another model: must be ignored
    os.makedirs(tmp_path / "second")
    write(tmp_path / "second" / "pairs.scores.jsonl.part1", [fake, stale])
    rerun, _ = run(tmp_path / "second", IMPLICIT, *args)
    q1_es = next(r for r in rerun if (r["id"], r["lang"]) == ("q1", "es"))
    assert (q1_es["chosen_sample"], q1_es["rejected_sample"], q1_es["chosen_reward"]) == (1, 0, 50.0)
    others, before = ([r for r in result if (r["id"], r["lang"]) != ("q1", "es")] for result in (rerun, rows))
    # rescored in other batches: the same rows, rewards equal to float noise
    assert [(r["id"], r["lang"], r["chosen"], r["rejected"]) for r in others] == \
        [(r["id"], r["lang"], r["chosen"], r["rejected"]) for r in before]
    assert [r["chosen_reward"] for r in others] == pytest.approx([r["chosen_reward"] for r in before], abs=1e-4)
    assert not [f for f in os.listdir(tmp_path / "second") if ".part" in f]
    assert len(read_records(tmp_path / "second" / "pairs.scores.jsonl")) == len(IMPLICIT)


@pytest.mark.slow
def test_implicit_under_torchrun(tmp_path, tiny_model, tiny_model_b):
    from conftest import run_torchrun
    args = ("--method", "implicit", "--dpo-model", tiny_model, "--ref-model", tiny_model_b, "--alpha", "0")
    single, _ = run(tmp_path, IMPLICIT, *args)
    result = run_torchrun("03_reward.py", 2, "--input", tmp_path / "input.jsonl", "--output",
                          tmp_path / "two.jsonl", *args)
    assert result.returncode == 0, result.stderr
    two = read_records(tmp_path / "two.jsonl")
    assert [(r["id"], r["lang"], r["chosen"], r["rejected"]) for r in two] == \
        [(r["id"], r["lang"], r["chosen"], r["rejected"]) for r in single]


def test_implicit_rewards_stay_fp32_where_the_code_chooses_bf16(tmp_path, tiny_model, tiny_model_b, monkeypatch):
    """The reward is a difference of two close models: 03 loads both in fp32 on every device (LOOP_BF16=1 makes
    the code choose bf16 as on a GPU); the rows, rewards included, are exactly those of an fp32 run."""
    args = ("--method", "implicit", "--dpo-model", tiny_model, "--ref-model", tiny_model_b, "--alpha", "0")
    rows, _ = run(tmp_path, IMPLICIT, *args)
    monkeypatch.setenv("LOOP_BF16", "1")
    assert common.pick_device()[1] == torch.bfloat16
    assert run(tmp_path, IMPLICIT, *args, name="bf16")[0] == rows
