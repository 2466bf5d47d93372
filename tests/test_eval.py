"""Tests of 05_eval.py and the proxy-tuned decoding path in common.py."""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch

import common
from conftest import REPO, DATA, read_records, run_script, run_torchrun

spec = importlib.util.spec_from_file_location("eval05", os.path.join(REPO, "05_eval.py"))
eval05 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval05)

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only fight each other on a busy 2-core box


# ----------------------------------------------------------------------------
# Answer extraction


@pytest.mark.parametrize("text, expected", [
    ("Janet sells 16 - 3 - 4 = 9 eggs at $2 each, so she makes 9 * 2 = $18.", 18.0),
    ("La respuesta es 1.234,5 euros.", 1234.5),
    ("The total is 1,234.5 dollars.", 1234.5),
    ("Die Temperatur fällt auf -3 Grad.", -3.0),
    ("Итого: 18.00", 18.0),
    ("所以她每天赚 $18", 18.0),
    ("答案：１８", 18.0),                                # full-width digits
    ("Il a payé 70 000 €.", 70000.0),
    ("Ответ: 1 234 567", 1234567.0),
    ("Das sind 3,5 kg.", 3.5),
    ("es decir, 12,50 €", 12.5),
    ("It costs $1,500.00.", 1500.0),
    ("La proporción es 0.125", 0.125),                    # not 125: a leading 0 means decimals
    ("Les nombres sont 4, 5", 5.0),                       # a list, not the decimal 4.5
    ("16 - 3 = 13. 13 - 4 = 9", 9.0),
    ("So she has 10-2", 2.0),                             # subtraction, not minus two
    ("x=-7", -7.0),
    ("**Answer: 42**", 42.0),
    ("Je ne sais pas.", None),
    ("", None),
])
def test_extract_last_number(text, expected):
    assert common.extract_last_number(text) == expected


# ----------------------------------------------------------------------------
# Accuracy, intervals, consistency on hand-made predictions


def prediction(problem_id, lang, predicted, gold):
    return {"id": problem_id, "lang": lang, "prediction": predicted, "answer": gold,
            "correct": predicted is not None and abs(predicted - gold) <= 1e-3}


HAND_MADE = ([prediction(f"p{k}", "en", pred, gold)
              for k, (pred, gold) in enumerate([(18, 18), (5, 5), (None, 3), (7, 8)])] +
             [prediction(f"p{k}", "es", pred, gold)
              for k, (pred, gold) in enumerate([(18.0005, 18), (6, 5), (None, 3), (7.0004, 8)])])


def test_accuracy_and_interval():
    table = eval05.per_language(HAND_MADE, "correct", ["en", "es"], seed=0)
    assert table["en"]["score"] == 0.5 and table["en"]["n"] == 4
    assert table["es"]["score"] == 0.25 and table["es"]["n"] == 4   # 18.0005 is within 1e-3 of 18
    assert table["all"]["score"] == 3 / 8 and table["all"]["n"] == 8
    assert table["en"] == eval05.bootstrap(4, lambda picks: np.array([1, 1, 0, 0])[picks].mean(), seed=0)
    low, high = table["all"]["ci"]
    assert 0 <= low < 3 / 8 < high <= 1
    perfect = eval05.per_language([prediction("a", "en", 1, 1)] * 5, "correct", ["en"], seed=0)
    assert perfect["en"] == {"score": 1.0, "n": 5, "ci": [1.0, 1.0]}


def test_consistency_and_harmonic_mean():
    result = eval05.consistency(HAND_MADE, ["en", "es"], seed=0)
    # p0: 18 vs 18.0005 agree; p1: 5 vs 6 differ; p2: no number; p3: 7 vs 7.0004 agree (both wrong).
    assert result["consistency"]["all"]["score"] == 0.5 and result["consistency"]["all"]["n"] == 4
    harmonic = result["consistency x accuracy (harmonic mean)"]["all"]
    assert harmonic["score"] == pytest.approx(2 * 0.5 * 0.375 / (0.5 + 0.375))
    assert harmonic["ci"][0] <= harmonic["score"] <= harmonic["ci"][1]
    assert eval05.consistency(HAND_MADE, ["en"], seed=0) == {}   # one language: nothing to compare


def test_gold_answer_and_in_language_rules():
    assert eval05.check_gold("1,234", "x") == 1234.0 and eval05.check_gold(18, "x") == 18.0
    with pytest.raises(common.InputError, match="f.jsonl:3: gold answer 'eighteen' is not a number"):
        eval05.check_gold("eighteen", "f.jsonl:3")
    assert eval05.in_language("Die Antwort ist achtzehn Euro pro Tag.", "de")
    assert not eval05.in_language("The answer is eighteen dollars per day.", "de")
    assert eval05.in_language("18", "de") and not eval05.in_language("  ", "de")


def test_effect_is_the_paired_difference_of_the_last_model_and_the_first():
    """Per prompt (id, lang): last model's fidelity minus the first's; a proxy column is not the last model."""
    fidelity = {  # (id, lang) -> in_language for M0, M1, M2
        ("a", "es"): (0, 1, 1), ("b", "es"): (0, 0, 1), ("c", "es"): (1, 1, 1),  # es: +1, +1, 0
        ("a", "de"): (1, 0, 0), ("b", "de"): (0, 1, 1), ("c", "de"): (1, 1, 1)}  # de: -1, +1, 0
    labels = ["M0", "M1", "M2"]
    predictions = {label: {"winrate": [{"id": i, "lang": lang, "in_language": bool(values[k])}
                                       for (i, lang), values in fidelity.items()]} for k, label in enumerate(labels)}
    predictions["proxy-tuned"] = {"winrate": [{"id": i, "lang": lang, "in_language": False} for i, lang in fidelity]}
    columns = [{"label": label} for label in labels] + [{"label": "proxy-tuned", "proxy": True}]
    effect = eval05.compute_effect(columns, predictions, ["es", "de"], seed=0)
    table = effect[eval05.INSTRUCTION_FIDELITY]
    assert table["es"]["score"] == pytest.approx(2 / 3) and table["es"]["n"] == 3
    assert table["de"]["score"] == 0.0 and "all" not in table
    assert table["es"] == eval05.entry([1, 1, 0], seed=0)  # the differences resampled
    # es and de pooled: each prompt's mean difference (a: +1 and -1, b: +1 and +1, c: 0 and 0), n = 3 prompts.
    assert table["es+de"] == eval05.entry([0, 1, 0], seed=0) and table["es+de"]["n"] == 3
    results = {label: {eval05.INSTRUCTION_FIDELITY: eval05.per_language(
        [{"lang": lang, "v": float(values[k])} for (_, lang), values in fidelity.items()], "v", ["es", "de"], 0)}
        for k, label in enumerate(labels)}
    lines = eval05.effect_lines(effect, results, labels)
    assert lines[0] == "## Effect: `M2` - `M0` on held-out prompts"
    assert "| language fidelity of answers to instructions | es | 33.3 [" in lines[4]
    assert "| +66.7 [+0.0, +100.0] n=3 |" in lines[4]
    # es's interval touches 0 here (bootstrap of [1, 1, 0] reaches 0/3), so no difference excludes zero.
    assert "Differences whose interval excludes zero: none." in lines[-2]
    sure = {eval05.INSTRUCTION_FIDELITY: {"es": {"score": 0.5, "n": 40, "ci": [0.3, 0.7]},
                                          "de": {"score": -0.1, "n": 40, "ci": [-0.3, 0.1]}}}
    assert "excludes zero: es +50.0." in eval05.effect_lines(sure, results, labels)[-2]
    # One model only: there is no effect to report.
    assert eval05.compute_effect(columns[:1], predictions, ["es"], seed=0) == {}


def test_a_length_controlled_cell_read_outside_its_data_says_so():
    """A cell is score [interval] n, then the difference from the baseline; a length-controlled win rate with
    under 10% of prompts on the rarer side of equal length is marked as the extrapolation it is."""
    inside = {"score": 0.5, "n": 10, "ci": [0.3, 0.7], "overlap": 0.4}
    assert eval05.cell(inside) == "50.0 [30.0, 70.0] n=10"
    assert eval05.cell(dict(inside, overlap=0.05), base={"score": 0.25, "n": 10, "ci": [0.1, 0.4]}) == \
        "50.0 [30.0, 70.0] n=10 (extrapolated) (+25.0)"
    assert eval05.cell(None) == "–"


def test_a_prompt_the_loop_trained_on_is_never_evaluated(tmp_path):
    prompts = common.load_prompts(os.path.join(REPO, "data", "prompts"), langs=["en", "es"], limit=5)
    math = [{"id": "m0", "lang": "en", "prompt": "What is 2 + 2?", "answer": 4}]
    trained = tmp_path / "responses.jsonl"
    write = lambda *records: trained.write_text("".join(json.dumps(r) + "\n" for r in records))  # noqa: E731
    write({"id": "other-1", "lang": "en", "prompt": "Something else."})
    summary = eval05.check_held_out({"winrate": prompts, "math": math}, [str(trained)])
    assert summary == {"trained_on": [str(trained)], "training_prompt_ids": 1, "overlap": 0}
    # The same id in another language is the same prompt translated: refused.
    write({"id": "bundled-3", "lang": "de", "prompt": "Anders formuliert."})
    with pytest.raises(common.InputError, match=r"winrate prompt 'bundled-3' \(en\) was trained on \(.*responses"):
        eval05.check_held_out({"winrate": prompts}, [str(trained)])
    # The same text under another id: refused too, in any task.
    write({"id": "x", "lang": "en", "prompt": "What is 2 + 2?"})
    with pytest.raises(common.InputError, match=r"math prompt 'm0' \(en\) was trained on"):
        eval05.check_held_out({"winrate": prompts, "math": math}, [str(trained)])
    assert eval05.check_held_out({"winrate": prompts}, []) is None
    # From the command line: one line, before any model loads, nothing written.
    # On 05's default prompts (X-AlpacaEval, ids 1 to 805), with the id trained on in a JSON number.
    write({"id": 2, "lang": "es", "prompt": "x"})
    result = run_script("05_eval.py", "--models", "smollm2-135m", "--tasks", "winrate", "--langs", "en,es",
                        "--limit", "2", "--trained-on", trained, "--output", tmp_path / "out")
    assert_one_line_error(result, "winrate prompt '2' (en) was trained on")
    assert not os.path.exists(tmp_path / "out")


def test_limit_per_language_keeps_the_same_first_ids():
    """--limit 3,en=1: the first 3 ids in es and de, the first 1 in en, the same ids in every language."""
    assert eval05.parse_limit("3,en=1") == {None: 3, "en": 1}
    assert eval05.parse_limit("de=2") == {None: None, "de": 2}  # the languages not named: all
    items = [{"id": i, "lang": lang} for lang in ("en", "es", "de") for i in (5, 2, 9, 4)]
    kept = eval05.first_ids_per_language(items, eval05.parse_limit("3,en=1"))
    assert [(r["lang"], r["id"]) for r in kept] == [("en", 5), ("es", 5), ("es", 2), ("es", 9),
                                                      ("de", 5), ("de", 2), ("de", 9)]
    assert eval05.first_ids_per_language(items, None) == items
    assert eval05.limit_text(eval05.parse_limit("3,en=1")) == "3,en=1" and eval05.limit_text({None: 3}) == 3 and eval05.limit_text(None) is None
    for bad in ("ten", "3,en="):
        with pytest.raises(SystemExit):
            eval05.parse_args(["--limit", bad])
    for bad in ("0", "3,en=-1"):
        with pytest.raises(common.InputError, match="--limit and --judge-limit must be at least 1"):
            eval05.parse_args(["--limit", bad])
    with pytest.raises(common.InputError, match=r"--limit: unknown language code 'xx'"):
        eval05.parse_args(["--limit", "3,xx=1"])
    result = run_script("05_eval.py", "--limit", "ten")
    assert result.returncode == 2 and "argument --limit: 'ten': expected N or N,LANG=M" in result.stderr


def test_middle_models_answer_the_first_ids_of_middle_limit(tmp_path, tiny_model, tiny_model_b):
    """--middle-limit: the models between the first and the last answer fewer prompts; the effect, the last
    model minus the first, is over all of --limit's."""
    output = tmp_path / "out"
    result = run_script("05_eval.py", "--models", tiny_model, tiny_model_b, tiny_model, "--tasks", "winrate",
                        "--langs", "en,es,de", "--limit", "3,en=2", "--middle-limit", "1", "--max-new-tokens", "2",
                        "--judge", tiny_model, "--judge-limit", "1", "--output", output, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    answered = {}
    for row in read_records(output / "predictions.jsonl"):
        answered.setdefault(row["model"], []).append((row["lang"], row["id"]))
    labels = list(answered)
    assert [sorted(answered[label]) for label in labels] == [
        sorted([("en", "1"), ("en", "2")] + [(lang, i) for lang in ("es", "de") for i in ("1", "2", "3")]),
        [("de", "1"), ("en", "1"), ("es", "1")]] + [sorted(answered[labels[0]])]
    summary = json.loads((output / "eval.json").read_text())
    assert {lang: v["n"] for lang, v in summary["effect"][eval05.INSTRUCTION_FIDELITY].items()} == {
        "en": 2, "es": 3, "de": 3, "es+de": 3}
    assert "(--middle-limit: 1 per language)" in (output / "report.md").read_text()


def test_column_labels(tmp_path):
    for iteration in ("iter1", "iter2"):
        (tmp_path / iteration / "model").mkdir(parents=True)
    names = [str(tmp_path / "iter1" / "model"), str(tmp_path / "iter2" / "model"), "smollm2-135m", "smollm2-135m"]
    assert eval05.unique_labels(names) == ["iter1/model", "iter2/model", "smollm2-135m", "smollm2-135m (2)"]


def test_math_scoring_with_fixed_answers(tiny_model):
    """The math task's records: last number, 1e-3 tolerance, prompt in the problem's language."""
    tokenizer = common.load_tokenizer(tiny_model)
    replies = {"m0": "9 * 2 = $18.", "m1": "Das macht 1.234,5 Euro", "m2": "Je ne sais pas", "m3": "about 18.0021"}
    items = [{"model": "x", "task": "math", "engine": "in-process", "id": i, "lang": lang, "prompt": f"question {i}",
              "answer": gold}
             for i, lang, gold in [("m0", "en", 18), ("m1", "de", 1234.5), ("m2", "fr", 3), ("m3", "en", 18)]]
    seen_prompts = []

    def fake_generate(prompts, desc):
        seen_prompts.extend(prompts)
        yield [(k, [{"text": replies[items[k]["id"]], "truncated": False, "new_tokens": 3}]) for k in range(len(items))]

    counts = {"new_tokens": 0, "no_number": 0}
    records = [r for batch in eval05.task_records({"generate": fake_generate, "tokenizer": tokenizer}, items,
                                                                     "math", "cot", counts) for r in batch]
    assert [r["prediction"] for r in records] == [18.0, 1234.5, None, 18.0021]
    assert [r["correct"] for r in records] == [True, True, False, False]
    assert counts == {"new_tokens": 12, "no_number": 1}
    assert eval05.math_instructions()["de"] in seen_prompts[1] and eval05.math_instructions()["fr"] in seen_prompts[2]


def test_translate_test_answers_the_english_translation(tiny_model):
    """--translate-test: non-English questions are translated first; the answer prompt is English."""
    tokenizer = common.load_tokenizer(tiny_model)
    items = [{"model": "x", "task": "math-tt", "engine": "in-process", "id": "m0", "lang": lang, "prompt": question, "answer": 7}
             for lang, question in [("en", "Tom has 3 and buys 4. How many?"),
                                    ("es", "Tom tiene 3 y compra 4. ¿Cuántas?")]]
    calls = []

    def fake_generate(prompts, desc):
        calls.append((desc, prompts))
        text = "Tom has 3 and buys 4. How many?" if desc == "translate" else "3 + 4 = 7"
        yield [(k, [{"text": text, "truncated": False, "new_tokens": 5}]) for k in range(len(prompts))]

    counts = {"new_tokens": 0, "no_number": 0}
    records = [r for batch in eval05.task_records({"generate": fake_generate, "tokenizer": tokenizer}, items,
                                                                     "math-tt", "cot", counts) for r in batch]
    assert [desc for desc, _ in calls] == ["translate", "answer"]
    assert len(calls[0][1]) == 1 and "Translate the following question from Spanish into English" in calls[0][1][0]
    assert all(eval05.math_instructions()["en"] in prompt for prompt in calls[1][1])
    spanish = next(r for r in records if r["lang"] == "es")
    assert spanish["question_en"] == "Tom has 3 and buys 4. How many?" and spanish["question"] == items[1]["prompt"]
    assert [r["correct"] for r in records] == [True, True] and counts["new_tokens"] == 15


# ----------------------------------------------------------------------------
# Judging


PAIRS = [("Say hi.", "reference one", "candidate one"), ("Count.", "reference two", "candidate two")]


def candidate_slot(text):
    return "A" if text.index("candidate") < text.index("reference") else "B"


def test_order_swap_cancels_a_judge_that_always_prefers_the_first_slot():
    always_first = lambda texts: [{"choice": "A"} for _ in texts]  # noqa: E731
    assert [score for score, _ in eval05.judge_pairs(always_first, PAIRS)] == [0.5, 0.5]
    always_second = lambda texts: [{"choice": "B"} for _ in texts]  # noqa: E731
    assert [score for score, _ in eval05.judge_pairs(always_second, PAIRS)] == [0.5, 0.5]
    likes_candidate = lambda texts: [{"choice": candidate_slot(t)} for t in texts]  # noqa: E731
    assert [score for score, _ in eval05.judge_pairs(likes_candidate, PAIRS)] == [1.0, 1.0]
    likes_reference = lambda texts: [{"choice": "B" if candidate_slot(t) == "A" else "A"} for t in texts]  # noqa: E731
    assert [score for score, _ in eval05.judge_pairs(likes_reference, PAIRS)] == [0.0, 0.0]
    # local (log-prob) judges: a fixed pull towards slot A cancels; what is left decides
    first_slot_logits = lambda texts: [{"choice": "A", "logp_a": 2.0, "logp_b": 0.0} for _ in texts]  # noqa: E731
    assert [score for score, _ in eval05.judge_pairs(first_slot_logits, PAIRS)] == [0.5, 0.5]

    def biased_but_likes_candidate(texts):  # +2 for slot A, +0.1 for the candidate: votes would say A twice
        return [{"choice": "A", "logp_a": 2.0 + 0.1 * (candidate_slot(t) == "A"),
                 "logp_b": 0.1 * (candidate_slot(t) == "B")} for t in texts]
    assert [score for score, _ in eval05.judge_pairs(biased_but_likes_candidate, PAIRS)] == [1.0, 1.0]
    unreadable = lambda texts: [{"choice": None} for _ in texts]  # noqa: E731
    score, verdicts = eval05.judge_pairs(unreadable, PAIRS)[0]
    assert score == 0.5 and [v["order"] for v in verdicts] == ["reference first", "candidate first"]


def test_local_judge_reads_the_last_real_token(tiny_model):
    """Right padding in a batch must not change a verdict: compare with one unpadded forward each."""
    model, tokenizer = common.load_model(tiny_model)
    judge = eval05.local_judge(model, tokenizer, token_budget=100000)
    texts = [eval05.JUDGE_PROMPT.format(instruction=i, answer_a=a, answer_b=b) for i, a, b in PAIRS]
    texts.append(texts[0] + " A much longer prompt than the others, so the rest are padded." * 3)
    verdicts = judge(texts)
    a_id, b_id = (tokenizer(letter, add_special_tokens=False).input_ids[0] for letter in "AB")
    for text, verdict in zip(texts, verdicts):
        ids = torch.tensor([common.chat_prompt_ids(tokenizer, text)])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, -1].double().log_softmax(-1)  # next-token log-probs
        assert verdict["logp_a"] == pytest.approx(logits[a_id].item(), abs=1e-4)
        assert verdict["logp_b"] == pytest.approx(logits[b_id].item(), abs=1e-4)
        assert verdict["choice"] == ("A" if logits[a_id] > logits[b_id] else "B")


def test_local_judge_stays_fp32_where_the_code_chooses_bf16(tiny_model, monkeypatch):
    """A verdict is the difference of two log-probs: the judge loads in fp32 even where bf16 is chosen."""
    import argparse
    args = argparse.Namespace(judge=tiny_model, trust_remote_code=False, token_budget=8192)
    texts = [eval05.JUDGE_PROMPT.format(instruction=i, answer_a=a, answer_b=b) for i, a, b in PAIRS]
    expected = eval05.load_local_judge(args)[0](texts)
    monkeypatch.setenv("LOOP_BF16", "1")
    assert common.load_model(tiny_model)[0].dtype == torch.bfloat16  # what a model loads as, by default, here
    judge, model = eval05.load_local_judge(args)
    assert model.dtype == torch.float32 and judge(texts) == expected


# ----------------------------------------------------------------------------
# Proxy-tuned decoding


def make_untied_model(directory, seed):
    """A tiny random Llama whose output layer is NOT tied to its embeddings, saved with the real tokenizer.

    (conftest's tiny models tie them, so their greedy answer just repeats the prompt's
    last token, a newline: every model would then agree and no comparison would mean anything.)
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = common.load_tokenizer(common.EMBEDDED_MODEL)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def untied_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("untied")
    return make_untied_model(root / "large", seed=0), make_untied_model(root / "small", seed=1)


PROMPTS = ["Hi", "What is 2+2? Explain it to a child, step by step.", "Bonjour, ça va ?", "Wie spät ist es?"]


def decode_all(batches, count):
    out = {}
    for batch in batches:
        for index, samples in batch:
            out[index] = samples
    return [out[i] for i in range(count)]


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_proxy_decoding_reduces_to_plain_decoding(untied_models, one_thread):
    large, tokenizer = common.load_model(untied_models[0])
    small, _ = common.load_model(untied_models[1])
    ids = [common.chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    options = dict(max_new_tokens=12, show_progress=False)
    plain_large = decode_all(common.generate_batches(large, tokenizer, ids, batch_size=4, **options), len(ids))
    plain_small = decode_all(common.generate_batches(small, tokenizer, ids, batch_size=4, **options), len(ids))
    assert all(a[0]["text"] and a != b for a, b in zip(plain_large, plain_small))  # the comparison means something
    # alpha 0: the large model alone, whatever the small ones say (batch 3 pads differently than batch 4)
    alpha_zero = common.generate_batches(large, tokenizer, ids, proxy=(small, large, 0.0), batch_size=3, **options)
    assert decode_all(alpha_zero, len(ids)) == plain_large
    # expert == antiexpert: the difference is zero
    same_small = common.generate_batches(large, tokenizer, ids, proxy=(small, small, 1.0), batch_size=4, **options)
    assert decode_all(same_small, len(ids)) == plain_large
    # antiexpert == large, alpha 1: large + (small - large) is the small model: the arithmetic is really applied
    swapped = common.generate_batches(large, tokenizer, ids, proxy=(small, large, 1.0), batch_size=4, **options)
    assert decode_all(swapped, len(ids)) == plain_small


def test_proxy_repetition_penalty_and_sampling(untied_models, one_thread):
    large, tokenizer = common.load_model(untied_models[0])
    small, _ = common.load_model(untied_models[1])
    ids = [common.chat_prompt_ids(tokenizer, p) for p in PROMPTS[:2]]
    options = dict(max_new_tokens=10, show_progress=False, batch_size=1)
    # HF generate is the independent reference for the penalty (one prompt at a time: HF penalises pad tokens too)
    stop_ids = common.end_of_turn_ids(tokenizer)
    hf = [common.decode_samples(tokenizer, large.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                                          repetition_penalty=1.5, eos_token_id=stop_ids,
                                                          pad_token_id=tokenizer.pad_token_id)[:, len(prompt):].tolist(),
                                stop_ids) for prompt in ids]
    ours = decode_all(common.generate_batches(large, tokenizer, ids, proxy=(small, small, 1.0), repetition_penalty=1.5,
                                              **options), len(ids))
    assert ours == hf
    # top_p so small only the top token survives: sampling becomes greedy
    greedy = decode_all(common.generate_batches(large, tokenizer, ids, proxy=(small, large, 0.5), **options), 2)
    nucleus = decode_all(common.generate_batches(large, tokenizer, ids, proxy=(small, large, 0.5), temperature=0.8,
                                                top_p=1e-6, **options), 2)
    assert nucleus == greedy
    torch.manual_seed(0)
    sampled = decode_all(common.generate_batches(large, tokenizer, ids, proxy=(small, large, 0.5), temperature=1.0,
                                                num_samples=3, **options), 2)
    assert [len(s) for s in sampled] == [3, 3] and all(x["new_tokens"] <= 10 for s in sampled for x in s)
    torch.manual_seed(0)
    again = decode_all(common.generate_batches(large, tokenizer, ids, proxy=(small, large, 0.5), temperature=1.0,
                                              num_samples=3, **options), 2)
    assert again == sampled and len({x["text"] for x in sampled[0]}) > 1


# ----------------------------------------------------------------------------
# Inputs in the shapes the papers ship: X-AlpacaEval's JSON arrays, reference answers, xCSQA


def test_json_array_prompts_take_the_language_from_the_file_name(tmp_path):
    """X-AlpacaEval ships one JSON array per language, `de.json`, with no lang field: as a file and as a folder."""
    records = [{"id": 1, "dataset": "helpful_base", "instruction": "Wie backe ich Brot?"},
               {"id": 2, "dataset": "oasst", "instruction": "Nenne eine Farbe."}]
    (tmp_path / "de.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "en.json").write_text(json.dumps([{"id": 1, "instruction": "How do I bake bread?"}]), encoding="utf-8")
    single = common.load_prompts(str(tmp_path / "de.json"))
    assert [(p["id"], p["lang"], p["prompt"], p["dataset"]) for p in single] == [
        ("1", "de", "Wie backe ich Brot?", "helpful_base"), ("2", "de", "Nenne eine Farbe.", "oasst")]
    folder = common.load_prompts(str(tmp_path), langs=["en", "de"], limit=1)
    assert [(p["id"], p["lang"]) for p in folder] == [("1", "en"), ("1", "de")]
    (tmp_path / "prompts.json").write_text(json.dumps([{"id": 1, "instruction": "Hi"}]), encoding="utf-8")
    with pytest.raises(common.InputError, match=r"prompts.json\[0\]: no 'lang' field"):
        common.load_prompts(str(tmp_path / "prompts.json"))  # a name that is no language says nothing


def test_length_controlled_win_rate_by_hand():
    rng = np.random.default_rng(0)
    # Equal lengths: the model reduces to its intercept, whose fit is the mean score.
    scores = rng.choice([0.0, 0.5, 1.0], size=40, p=[0.2, 0.2, 0.6])
    equal = eval05.length_controlled(scores, np.zeros(40), seed=0)
    assert equal["score"] == pytest.approx(scores.mean(), abs=1e-3) and equal["n"] == 40
    # Preference that depends on length alone, P(win) = sigmoid(2 tanh(d / std d)), with the candidate mostly
    # longer: the raw win rate is high, the length-controlled one is 50%, the value at d = 0.
    differences = rng.normal(300, 400, size=200)
    x = np.tanh(differences / differences.std())
    by_length = 1 / (1 + np.exp(-2 * x))
    assert by_length.mean() > 0.65
    controlled = eval05.length_controlled(by_length, differences, seed=0)
    assert controlled["score"] == pytest.approx(0.5, abs=2e-3)
    assert controlled["ci"][0] <= controlled["score"] <= controlled["ci"][1]
    assert controlled["overlap"] == pytest.approx(min(np.mean(differences > 0), np.mean(differences < 0)))
    # A column that wins everything stays finite and near 100%.
    assert eval05.length_controlled(np.ones(10), differences[:10], seed=0)["score"] > 0.99
    # Answers always far shorter than the reference's: the length term cannot be told from quality, so the
    # estimate stays at the raw rate instead of extrapolating to a length no answer had; overlap says so.
    shorter = eval05.length_controlled([1, 0, 0, 0, 0, 1, 0, 0, 0, 0], rng.normal(-1800, 300, size=10), seed=0)
    assert shorter["score"] == pytest.approx(0.2, abs=0.02) and shorter["overlap"] == 0.0


def test_reference_answers_must_match_the_judged_prompts(tmp_path):
    prompts = common.load_prompts(write_prompt_fixture(tmp_path / "prompts"), langs=["en", "es"])
    answers = tmp_path / "answers"
    answers.mkdir()
    rows = {"en": [("p-0", "Name a colour.", "Blue."), ("p-1", "Say hello.", "Hello!")],
            "es": [("p-0", "Nombra un color.", "Azul."), ("p-1", "Di hola.", "¡Hola!")]}
    for lang, triples in rows.items():
        (answers / f"{lang}.jsonl").write_text("".join(json.dumps({"id": i, "prompt": p, "response": r}) + "\n"
                                                      for i, p, r in triples), encoding="utf-8")
    loaded = eval05.load_reference_answers(str(answers), prompts, ["en", "es"], None)
    assert loaded["p-1", "es"]["response"] == "¡Hola!" and len(loaded) == 4
    (answers / "es.jsonl").write_text(json.dumps({"id": "p-0", "prompt": "Nombra un color.", "response": "Azul."}) +
                                      "\n", encoding="utf-8")
    with pytest.raises(common.InputError, match=r"no answer for 1 judged prompt\(s\), e.g. 'p-1' \(es\)"):
        eval05.load_reference_answers(str(answers), prompts, ["en", "es"], None)
    assert len(eval05.load_reference_answers(str(answers), prompts, ["en", "es"], 1)) == 3  # p-1 is not judged
    (answers / "es.jsonl").write_text(json.dumps({"id": "p-0", "prompt": "Otra cosa.", "response": "Azul."}) + "\n",
                                      encoding="utf-8")
    with pytest.raises(common.InputError, match=r"answer to 'p-0' \(es\) was asked a different prompt"):
        eval05.load_reference_answers(str(answers), prompts, ["en", "es"], 1)


def test_judging_against_reference_answers_judges_every_column(tmp_path):
    """With --reference-answers the first model is judged too, and the length difference is the reference's."""
    args = eval05.parse_args(["--judge", "unused", "--judge-server", "http://x/v1", "--reference-answers", "r"])
    columns = [{"label": "base", "slug": "base"}, {"label": "trained", "slug": "trained"}]
    answer = lambda model, i, text: {"model": model, "id": i, "lang": "en", "prompt": "q", "response": text}  # noqa: E731
    predictions = {"base": {"winrate": [answer("base", "a", "short"), answer("base", "b", "a long answer")]},
                   "trained": {"winrate": [answer("trained", "a", "a much longer answer"), answer("trained", "b", "")]}}
    reference = {("a", "en"): {"response": "ref"}, ("b", "en"): {"response": "reference"}}

    def longer_wins(texts):  # prompt text: [Answer A] ... [Answer B] ...
        verdicts = []
        for text in texts:
            first, second = text.split("[Answer A]\n")[1].split("\n\n[Answer B]\n")
            second = second.split("\n\nWhich answer")[0]
            verdicts.append({"choice": "A" if len(first) > len(second) else "B"})
        return verdicts

    counts = {"unreadable_verdicts": 0, "judged": 0}
    judgements, _ = eval05.judge_all(columns, predictions, reference, str(tmp_path), args, 0, 1, counts, longer_wins)
    assert set(judgements) == {"base", "trained"} and counts["judged"] == 4
    by_key = {(r["model"], r["id"]): r for rows in judgements.values() for r in rows}
    assert by_key["base", "a"]["score"] == 1.0 and by_key["base", "a"]["length_difference"] == 5 - 3
    assert by_key["trained", "b"]["score"] == 0.0 and by_key["trained", "b"]["length_difference"] == -9
    results = eval05.compute_results(columns, predictions, judgements, ["en"], 0, "reference answers")
    assert results["base"]["winrate vs reference answers"]["en"]["score"] == 1.0
    assert results["trained"]["winrate vs reference answers"]["all"]["score"] == 0.5
    assert "winrate vs reference answers, length-controlled" in results["trained"]


@pytest.mark.parametrize("record, choices, answer", [
    ({"question": "Q?", "choices": ["x", "y", "z"], "answer": "c"}, ["x", "y", "z"], 2),
    ({"question": "Q?", "choices": ["x", "y"], "answer": 0}, ["x", "y"], 0),
    ({"question": {"stem": "Q?", "choices": [{"label": "A", "text": "x"}, {"label": "B", "text": "y"}]},
      "answerKey": "B"}, ["x", "y"], 1),  # xCSQA's JSONL
    ({"question": {"stem": "Q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}}, "answerKey": "A"},
     ["x", "y"], 0),  # xCSQA as datasets stores it
])
def test_choice_records_in_every_shape(record, choices, answer):
    record = json.loads(json.dumps(record))
    eval05.check_choice(record, "f.jsonl:1")
    assert (record["question"], record["choices"], record["answer"]) == ("Q?", choices, answer)


def test_bad_choice_records_name_file_and_line(tmp_path):
    path = tmp_path / "en.jsonl"
    path.write_text('{"id": "a", "question": "Q?", "choices": ["x", "y"], "answer": "B"}\n'
                    '{"id": "b", "question": "Q?", "choices": ["x", "y"], "answer": "C"}\n', encoding="utf-8")
    with pytest.raises(common.InputError, match=r"en.jsonl:2: answer 'C' is not one of the 2 options"):
        common.load_prompts(str(path), check=eval05.check_choice)
    path.write_text('{"id": "a", "question": "Q?", "choices": ["x"], "answer": 0}\n', encoding="utf-8")
    with pytest.raises(common.InputError, match=r"en.jsonl:1: 'choices' must list 2 to 26"):
        common.load_prompts(str(path), check=eval05.check_choice)


def test_bundled_choice_set_is_parallel_and_balanced():
    items = common.load_prompts(os.path.join(REPO, "data", "choice"), langs=["en", "es", "de", "fr", "ru", "zh"],
                                check=eval05.check_choice)
    by_id = {}
    for item in items:
        by_id.setdefault(item["id"], set()).add((item["answer"], len(item["choices"])))
    assert len(items) == 120 and len(by_id) == 20 and all(len(answers) == 1 for answers in by_id.values())
    assert sorted(next(iter(a))[0] for a in by_id.values()) == sorted([0, 1, 2, 3] * 5)  # no letter favoured

def test_hub_choice_sets_one_config_per_language(monkeypatch):
    """`NAME:CONFIG:SPLIT` with `{lang}`: one load per language, the language read from the config name, and rows
    in the shape datasets gives xCSQA (options as columns). The hub itself is out of reach of the tests."""
    import datasets
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        options = {"label": ["A", "B"], "text": ["x", "y"]}
        return [{"id": "q1", "question": {"stem": f"Q ({config})?", "choices": options}, "answerKey": "B"}]
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    items = common.load_prompts("INK-USC/xcsr:X-CSQA-{lang}:validation", langs=["en", "de"], check=eval05.check_choice)
    assert calls == [("INK-USC/xcsr", "X-CSQA-en", "validation"), ("INK-USC/xcsr", "X-CSQA-de", "validation")]
    assert [(i["id"], i["lang"], i["prompt"], i["answer"]) for i in items] == [
        ("q1", "en", "Q (X-CSQA-en)?", 1), ("q1", "de", "Q (X-CSQA-de)?", 1)]
    common.load_prompts("some/set:de", langs=["de"], check=eval05.check_choice)  # name:config: the caller's split
    assert calls[-1] == ("some/set", "de", "train")

def test_choice_picks_the_letter_with_the_highest_next_token_log_prob(tiny_model):
    """Each option's letter log-prob equals an unpadded forward's next-token log-prob; the pick is the argmax."""
    model, tokenizer = common.load_model(tiny_model)
    items = common.load_prompts(os.path.join(REPO, "data", "choice"), langs=["en", "zh"], limit=3,
                                check=eval05.check_choice)
    items = [dict(item, model="m", task="choice", engine="in-process") for item in items]
    args = eval05.parse_args(["--token-budget", "100000"])
    records = [r for batch in eval05.choice_records(model, tokenizer, items, args) for r in batch]
    letter_ids = [tokenizer(letter, add_special_tokens=False).input_ids[0] for letter in "ABCD"]
    for item, record in zip(items, records):
        ids = torch.tensor([common.chat_prompt_ids(tokenizer, eval05.choice_message(item))])
        with torch.inference_mode():
            logps = model(input_ids=ids).logits[0, -1].double().log_softmax(-1)[letter_ids]
        assert record["letter_logps"] == pytest.approx(logps.tolist(), abs=1e-4)
        assert record["prediction"] == int(logps.argmax()) and record["correct"] == (record["prediction"] ==
                                                                                     item["answer"])
        assert "A. " in record["prompt"] and "D. " in record["prompt"]
    # Consistency on options: the same index in every language.
    rows = [{"id": i, "lang": lang, "prediction": p, "correct": p == 0} for i, lang, p in
            [("q0", "en", 0), ("q0", "zh", 0), ("q1", "en", 1), ("q1", "zh", 2)]]
    assert eval05.consistency(rows, ["en", "zh"], seed=0)["consistency"]["all"]["score"] == 0.5


def test_mean_hidden_states_ignore_padding_and_bos(tiny_model):
    """A batch's padded rows give the same means as one text at a time; the same text aligns perfectly."""
    model, tokenizer = common.load_model(tiny_model)
    texts = ["How many eggs are in 2 boxes?", "¿Cuántos huevos hay en 2 cajas? Una caja tiene 6 huevos."]
    batched = eval05.mean_hidden_states(model, tokenizer, texts)
    assert batched.shape == (2, model.config.num_hidden_layers + 1, model.config.hidden_size)
    for row, text in enumerate(texts):
        ids = torch.tensor([common.prompt_ids(tokenizer, text)])
        with torch.inference_mode():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
        start = 1 if common.adds_bos(tokenizer) else 0
        expected = torch.stack([layer[0, start:].float().mean(0) for layer in states])
        assert torch.allclose(batched[row], expected, atol=1e-5)
    args = eval05.parse_args(["--batch-size", "4"])
    item = {"model": "m", "task": "alignment", "id": "q", "lang": "es", "engine": "in-process", "prompt": texts[1]}
    same, other = [r for batch in eval05.alignment_records(
        model, tokenizer, [dict(item, english=texts[1]), dict(item, english=texts[0])], args) for r in batch]
    assert same["cosine"] == pytest.approx([1.0] * (model.config.num_hidden_layers + 1), abs=1e-5)
    cosine = torch.nn.functional.cosine_similarity(batched[1], batched[0], dim=-1)
    assert other["cosine"] == pytest.approx(cosine.tolist(), abs=1e-5)


# ----------------------------------------------------------------------------
# --math-mode code: model-written programs run in a limited child process


def test_programs_run_in_a_limited_child_process(tmp_path):
    assert eval05.run_program("print(6 * 7)") == ("ok", "42\n")
    status, printed = eval05.run_program("import os\nprint(os.getpid())")
    assert status == "ok" and int(printed) != os.getpid()  # never in our process
    assert eval05.run_program("import os\nprint(sorted(os.environ))")[1] in ("[]\n", "['LC_CTYPE']\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("42")
    cases = {"while True:\n    pass": ("killed by signal", "timeout"),  # CPU time, or wall clock on a busy machine
             "import time\ntime.sleep(60)": "timeout",              # wall-clock limit
             "x = []\nwhile True:\n    x.append(' ' * 10 ** 7)": "error: MemoryError",
             f"print(open({str(secret)!r}).read())": "error: PermissionError: not allowed here: open",
             "open('out.txt', 'w').write('x')": "error: PermissionError: not allowed here: open",
             "import socket\nprint(1)": "error: PermissionError: not allowed here: import",
             "import os\nos.system('true')\nprint(1)": "error: PermissionError: not allowed here: os.system",
             "while True:\n    print('1' * 1000)": "error: OSError: [Errno 27] File too large"}
    for program, status in cases.items():
        result = eval05.run_program(program)
        assert result[0].startswith(status) and result[1] == "", (program, result)  # str.startswith takes tuples


def test_code_mode_counts_a_stopped_program_as_wrong(tiny_model):
    tokenizer = common.load_tokenizer(tiny_model)
    replies = {"m0": "Here:\n```python\napples = 3 + 4\nprint(apples)\n```", "m1": "```python\nwhile True: pass\n```",
               "m2": "```python\nprint(open('/etc/hostname').read(), 7)\n```", "m3": "```py\nprint(12)"}  # cut off
    items = [{"model": "x", "task": "math", "engine": "in-process", "id": i, "lang": "en", "prompt": "q",
              "answer": gold} for i, gold in [("m0", 7), ("m1", 7), ("m2", 7), ("m3", 12)]]
    seen = []

    def fake_generate(prompts, desc):
        seen.extend(prompts)
        yield [(k, [{"text": replies[items[k]["id"]], "truncated": False, "new_tokens": 3}]) for k in range(len(items))]

    counts = {"new_tokens": 0, "no_number": 0}
    records = [r for batch in eval05.task_records({"generate": fake_generate, "tokenizer": tokenizer}, items, "math",
                                                  "code", counts) for r in batch]
    assert [r["correct"] for r in records] == [True, False, False, True]
    assert records[0]["program_status"] == records[3]["program_status"] == "ok"
    assert records[1]["program_status"].startswith(("killed", "timeout")) and records[2]["program_status"].startswith(
        "error: PermissionError")
    assert records[0]["program"] == "apples = 3 + 4\nprint(apples)\n" and "in_language" not in records[0]
    assert all(eval05.CODE_INSTRUCTION in prompt for prompt in seen) and counts["no_number"] == 2


# ----------------------------------------------------------------------------
# The script end to end (tiny models)


def write_math_fixture(directory, answers=None):
    problems = {"en": ["Tom has 3 apples and buys 4 more. How many apples does he have?",
                       "A box holds 6 eggs. How many eggs are in 2 boxes?"],
                "es": ["Tom tiene 3 manzanas y compra 4 más. ¿Cuántas manzanas tiene?",
                       "Una caja tiene 6 huevos. ¿Cuántos huevos hay en 2 cajas?"]}
    os.makedirs(directory, exist_ok=True)
    for lang, questions in problems.items():
        with open(os.path.join(directory, f"{lang}.jsonl"), "w", encoding="utf-8") as handle:
            for k, (question, answer) in enumerate(zip(questions, answers or [7, 12])):
                handle.write(json.dumps({"id": f"math-{k}", "question": question, "answer": answer}) + "\n")
    return str(directory)


def write_prompt_fixture(directory):
    prompts = {"en": ["Name a colour.", "Say hello."], "es": ["Nombra un color.", "Di hola."]}
    os.makedirs(directory, exist_ok=True)
    for lang, texts in prompts.items():
        with open(os.path.join(directory, f"{lang}.jsonl"), "w", encoding="utf-8") as handle:
            for k, text in enumerate(texts):
                handle.write(json.dumps({"id": f"p-{k}", "prompt": text}) + "\n")
    return str(directory)


@pytest.fixture(scope="module")
def two_model_run(tmp_path_factory, untied_models, tiny_model):
    """One run of 05 on two tiny models (the second with a train_summary.json) plus a proxy column."""
    root = tmp_path_factory.mktemp("eval-run")
    base_model = untied_models[0]
    trained = str(root / "trained")
    shutil.copytree(untied_models[1], trained)
    with open(os.path.join(trained, "train_summary.json"), "w") as handle:
        json.dump({"eval_before": {"rewards/accuracies": 0.5}, "eval_after": {"rewards/accuracies": 0.75},
                   "eval_pairs": 40}, handle)
    output = str(root / "eval")
    args = ["--models", base_model, trained, "--tasks", "mgsm,math,winrate", "--langs", "en,es", "--limit", "2",
            "--mgsm", os.path.join(DATA, "mgsm"), "--math", write_math_fixture(root / "math"),
            "--prompts", write_prompt_fixture(root / "prompts"), "--max-new-tokens", "8", "--judge", tiny_model,
            "--proxy-expert", trained, "--proxy-antiexpert", trained, "--output", output]
    result = run_script("05_eval.py", *args, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, args, result, os.path.basename(base_model), tiny_model


def test_two_model_run_writes_every_output(two_model_run):
    output, _, result, base, judge = two_model_run
    summary = json.load(open(os.path.join(output, "eval.json")))
    labels = [m["label"] for m in summary["models"]]
    assert labels == [base, "trained", "proxy-tuned"]
    results = summary["results"]
    for label in labels:
        for metric in ("mgsm accuracy", "math accuracy", "mgsm language fidelity",
                       eval05.INSTRUCTION_FIDELITY):
            assert set(results[label][metric]) == {"en", "es", "all"}
            assert results[label][metric]["en"]["n"] == 2 and results[label][metric]["all"]["n"] == 4
            for value in results[label][metric].values():
                assert value["ci"][0] <= value["score"] <= value["ci"][1]
        assert results[label]["math consistency"]["all"]["n"] == 2
    assert "winrate vs first model" not in results[base]
    assert results["trained"]["winrate vs first model"]["all"]["n"] == 4
    held_out = results["trained"]["held-out reward accuracy (04)"]["all"]
    assert held_out["score"] == 0.75 and held_out["n"] == 40 and held_out["ci"][0] < 0.75 < held_out["ci"][1]
    # eval.json agrees with predictions.jsonl
    predictions = read_records(os.path.join(output, "predictions.jsonl"))
    assert len(predictions) == 3 * 3 * 4
    math_rows = [p for p in predictions if p["model"] == "trained" and p["task"] == "math"]
    assert results["trained"]["math accuracy"]["all"]["score"] == np.mean([p["correct"] for p in math_rows])
    judged = [p for p in predictions if p["task"] == "winrate" and p["model"] != base]
    assert len(judged) == 8 and all(len(p["judge_verdicts"]) == 2 and p["judge_score"] in (0, 0.5, 1) for p in judged)
    # proxy column with expert == antiexpert answers exactly like the first model, unlike the second
    by_key = {(p["model"], p["task"], p["id"], p["lang"]): p["response"] for p in predictions}
    proxy_keys = [k for k in by_key if k[0] == "proxy-tuned"]
    assert all(by_key[k] == by_key[(base, *k[1:])] for k in proxy_keys)
    assert sum(by_key[k] != by_key[("trained", *k[1:])] for k in proxy_keys) == len(proxy_keys)
    report = open(os.path.join(output, "report.md"), encoding="utf-8").read()
    assert f"| metric | lang | `{base}` | `trained` | `proxy-tuned` |" in report
    assert "| held-out reward accuracy (04) | all | – | 75.0 [" in report and "n=40" in report
    # The effect leads: the trained model minus the base (the proxy column is not a trained model).
    effect = summary["effect"]["language fidelity of answers to instructions"]
    assert effect["es"]["n"] == 2 and set(effect) == {"en", "es"}  # one language besides English: no pool
    fidelity = {(p["model"], p["id"], p["lang"]): p["in_language"] for p in predictions if p["task"] == "winrate"}
    assert effect["es"]["score"] == np.mean([fidelity["trained", i, lang] - fidelity[base, i, lang]
                                             for _, i, lang in fidelity if _ == base and lang == "es"])
    assert report.index("## Effect: `trained` - `" + base) < report.index("## All metrics")
    assert "Caveat" in report and "judge is weak" in report and f"`{judge}`" in report
    with open(os.path.join(output, "report.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "05_eval: models 3, tasks 3, predictions made now 36, judged now 8" in result.stdout


def test_choice_alignment_and_reference_win_rate_end_to_end(tmp_path, untied_models, tiny_model):
    """The tasks the papers report beyond math, in one run: every metric in eval.json, the report and the plot;
    a rerun reuses every (model, task) work file."""
    answers = tmp_path / "answers"
    answers.mkdir()
    for lang, texts in {"en": ["Name a colour.", "Say hello."], "es": ["Nombra un color.", "Di hola."]}.items():
        (answers / f"{lang}.jsonl").write_text("".join(json.dumps({"id": f"p-{k}", "prompt": text, "response": "Sí."})
                                                       + "\n" for k, text in enumerate(texts)), encoding="utf-8")
    output = tmp_path / "eval"
    args = ["--models", *untied_models, "--tasks", "winrate,choice,alignment", "--langs", "en,es", "--limit", "2",
            "--mgsm", os.path.join(DATA, "mgsm"), "--prompts", write_prompt_fixture(tmp_path / "prompts"),
            "--reference-answers", answers, "--max-new-tokens", "8", "--judge", tiny_model, "--output", output]
    result = run_script("05_eval.py", *args, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(output / "eval.json"))
    layers = common.load_model(untied_models[0])[0].config.num_hidden_layers + 1
    for label in (m["label"] for m in summary["models"]):
        metrics = summary["results"][label]
        assert metrics["choice accuracy"]["en"]["n"] == 2 and metrics["choice consistency"]["all"]["n"] == 2
        assert metrics["winrate vs reference answers"]["all"]["n"] == 4  # the first model is judged too
        assert metrics["winrate vs reference answers, length-controlled"]["all"]["n"] == 4
        alignment = metrics["alignment cosine with English (mean over layers)"]
        assert set(alignment) == {"es", "all"} and alignment["es"]["n"] == 2
        by_layer = summary["alignment_by_layer"][label]["es"]
        assert len(by_layer) == layers and -1 <= by_layer[-1]["score"] <= 1
        assert alignment["es"]["score"] == pytest.approx(np.mean([v["score"] for v in by_layer]))
    predictions = read_records(output / "predictions.jsonl")
    choice = [p for p in predictions if p["task"] == "choice"]
    assert len(choice) == 8 and all(p["correct"] == (p["prediction"] == p["answer"]) for p in choice)
    report = open(output / "report.md", encoding="utf-8").read()
    assert "every layer is in eval.json and report.png" in report
    assert "| winrate vs reference answers, length-controlled |" in report
    assert "| choice accuracy | es |" in report
    assert open(output / "report.png", "rb").read(4) == b"\x89PNG"
    os.remove(output / "eval.json")
    again = run_script("05_eval.py", *args, env=ONE_THREAD)
    assert again.returncode == 0 and "predictions made now 0, judged now 0" in again.stdout, again.stderr[-2000:]


def test_rerun_resumes_from_a_killed_run(two_model_run):
    """Part files of a killed run are kept; the rerun only makes what is missing."""
    output, args, _, base, _ = two_model_run
    work = os.path.join(output, "work")
    finished = next(os.path.join(work, name) for name in os.listdir(work)
                    if name.startswith(f"{base}-") and name.endswith(".math.jsonl"))
    rows = read_records(finished)
    rows[0]["response"] = "MARKER 7"   # were it redone, the marker would be gone
    with open(finished + ".part0", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows[:2])
        handle.write('{"torn": ')     # a kill mid-write
    os.remove(finished)
    os.remove(os.path.join(output, "eval.json"))
    result = run_script("05_eval.py", *args, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "predictions made now 2, judged now 0" in result.stdout
    assert read_records(finished)[0]["response"] == "MARKER 7" and len(read_records(finished)) == 4
    assert not any(name.endswith(tuple(f".part{k}" for k in range(4))) for name in os.listdir(work))
    modified = os.path.getmtime(os.path.join(output, "eval.json"))
    result = run_script("05_eval.py", *args, env=ONE_THREAD)  # complete: says so and stops at once, exit code 0
    assert result.returncode == 0 and "eval.json already exists and is complete" in result.stdout
    assert "predictions made now" not in result.stdout and os.path.getmtime(os.path.join(output, "eval.json")) == modified


# ----------------------------------------------------------------------------
# Bad input: one line naming file and line, non-zero exit, nothing written


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_inputs(tmp_path, tiny_model):
    """Each bad input stops the run before any model loads, naming the file and line."""
    base = ["--models", tiny_model, "--langs", "en,es", "--output", str(tmp_path / "out")]
    mgsm = tmp_path / "mgsm"
    mgsm.mkdir()
    (mgsm / "mgsm_en.tsv").write_text("What is 1+1?\t2\nWhat is 2+2?\t\n", encoding="utf-8")
    (mgsm / "mgsm_es.tsv").write_text("¿1+1?\t2\n¿2+2?\t4\n", encoding="utf-8")
    result = run_script("05_eval.py", *base, "--tasks", "mgsm", "--mgsm", mgsm)  # as a user sees it
    assert_one_line_error(result, f"{mgsm / 'mgsm_en.tsv'}:2:", "no answer")

    (mgsm / "mgsm_en.tsv").write_text("What is 1+1?\t2\nWhat is 2+2?\tfour\n", encoding="utf-8")
    with pytest.raises(common.InputError, match=r"mgsm_en.tsv:2: answer 'four' is not a number"):
        eval05.main([*base, "--tasks", "mgsm", "--mgsm", str(mgsm)])
    math_dir = write_math_fixture(tmp_path / "math", answers=[7, "twelve"])
    with pytest.raises(common.InputError, match=r"en.jsonl:2: gold answer 'twelve' is not a number"):
        eval05.main([*base, "--tasks", "math", "--math", math_dir])
    with pytest.raises(common.InputError, match=r"--langs: unknown language code 'xx'"):
        eval05.main([*base, "--langs", "en,xx", "--tasks", "math", "--math", math_dir])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"id": "a", "lang": "en", "question": "1+1?", "answer": 2}\n'
                     '{"id": "a", "lang": "klingon", "question": "1+1?", "answer": 2}\n', encoding="utf-8")
    with pytest.raises(common.InputError, match=r"mixed.jsonl:2: unknown language code 'klingon'"):
        eval05.main([*base, "--langs", "en", "--tasks", "math", "--math", str(mixed)])
    with pytest.raises(common.InputError, match=r"--tasks: unknown task\(s\) mmlu"):
        eval05.main([*base, "--tasks", "math,mmlu"])
    # Proxy-tuning adds logits token by token: a small model whose tokenizer has one more token is refused.
    other = shutil.copytree(tiny_model, tmp_path / "other-tokenizer")
    tokenizer = common.load_tokenizer(str(other))
    tokenizer.add_tokens(["<not-in-the-base>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(common.InputError, match=r"--proxy-antiexpert .*other-tokenizer: its tokenizer differs"):
        eval05.main([*base, "--tasks", "winrate", "--limit", "1", "--max-new-tokens", "2", "--judge", tiny_model,
                     "--proxy-expert", tiny_model, "--proxy-antiexpert", str(other)])
    assert not os.path.exists(tmp_path / "out" / "eval.json")


@pytest.mark.parametrize("flag", ["--models", "--judge", "--proxy-expert"])
def test_every_model_is_checked_before_any_answer(tmp_path, tiny_model, flag):
    """A wrong second model (or judge, or proxy) stops the run before the first model answers anything."""
    missing = str(tmp_path / "no-such-model")
    models = [tiny_model, missing if flag == "--models" else tiny_model]
    extra = {"--judge": ["--judge", missing],
             "--proxy-expert": ["--proxy-expert", missing, "--proxy-antiexpert", tiny_model]}.get(flag, [])
    result = run_script("05_eval.py", "--models", *models, "--tasks", "math,winrate", "--langs", "en", "--limit",
                        "1", "--output", tmp_path / "out", *extra)
    assert_one_line_error(result, f"{missing}: not a model we can load", "")
    assert not os.path.exists(tmp_path / "out")  # not one answer was made


# ----------------------------------------------------------------------------
# Slow: two ranks; the real model on a real MGSM slice


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path, untied_models):
    """Under torchrun the problems are split across ranks; the merged predictions equal a 1-process run (the
    scored tasks' floats to rounding: a rank's batches pad differently)."""
    args = ["--models", *untied_models, "--tasks", "math,choice,alignment", "--langs", "en,es", "--math",
            write_math_fixture(tmp_path / "math"), "--mgsm", os.path.join(DATA, "mgsm"), "--limit", "3",
            "--max-new-tokens", "6"]
    single = run_script("05_eval.py", *args, "--output", tmp_path / "one", env=ONE_THREAD)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_torchrun("05_eval.py", 2, *args, "--output", tmp_path / "two")
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (read_records(tmp_path / run / "predictions.jsonl") for run in ("one", "two"))
    floats = ("letter_logps", "cosine")
    assert [{k: v for k, v in r.items() if k not in floats} for r in two] == \
        [{k: v for k, v in r.items() if k not in floats} for r in one]
    assert {r["task"] for r in one} == {"math", "choice", "alignment"}
    for a, b in zip(one, two):
        for field in floats:
            assert a.get(field) == pytest.approx(b.get(field), abs=1e-4)
    assert "05_eval[rank 1]" in double.stdout


@pytest.mark.slow
def test_real_model_end_to_end(tmp_path):
    """The embedded model, greedy, on one easy problem in two languages: a scored, detected, reported answer."""
    math_dir = write_math_fixture(tmp_path / "math")
    result = run_script("05_eval.py", "--models", "smollm2-135m", "--tasks", "math", "--langs", "en,es", "--limit", "1",
                        "--math", math_dir, "--max-new-tokens", "48", "--output", tmp_path / "out", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_records(tmp_path / "out" / "predictions.jsonl")
    assert [r["lang"] for r in rows] == ["en", "es"] and all(r["response"] for r in rows)
    english = rows[0]
    assert english["detected_language"] == "en" and english["in_language"]
    assert english["prediction"] == common.extract_last_number(english["response"])
    assert english["correct"] == (english["prediction"] is not None and abs(english["prediction"] - 7) <= 1e-3)
    summary = json.load(open(tmp_path / "out" / "eval.json"))
    assert summary["results"]["smollm2-135m"]["math accuracy"]["all"]["n"] == 2
    assert os.path.exists(tmp_path / "out" / "report.png")
