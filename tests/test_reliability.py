"""What a user can get wrong, as a user would get it wrong: one line, a non-zero exit, nothing half-written.

Divergence never reaches a checkpoint or a final model; a rerun with other settings never continues a run
made with these; two copies of one command never write one file; bad bytes, bad numbers and degenerate
inputs are refused before anything is written, or skipped and counted.
"""
import fcntl
import glob
import json
import os

import pytest
import torch

import common
from conftest import read_records, run_script

ENV = {"OMP_NUM_THREADS": "1"}


def error_line(result, *fragments):
    """The run failed with exit code 2 and one `error: ...` line at the end, no traceback; returns that line."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # The last line as a log shows it: split at newlines only, so a progress bar redrawn with a carriage
    # return, left unfinished before the error, counts as part of the error's line.
    last = result.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return str(path)


def prompts_file(path, n=3):
    return write(path, [{"id": f"p{i}", "lang": lang, "prompt": f"Say {i} in {lang}."}
                        for lang in ("en", "es") for i in range(n)])


def pairs_file(path, n=8):
    return write(path, [{"id": f"q{i}", "lang": "es", "prompt": f"Pregunta {i}", "chosen": f"Respuesta buena {i}.",
                         "rejected": f"Bad answer {i}."} for i in range(n)])


def train(tmp_path, model, *flags, name="out"):
    output = tmp_path / name
    result = run_script("04_dpo.py", "--input", pairs_file(tmp_path / "pairs.jsonl"), "--output", output,
                        "--model", model, "--eval-frac", "0", "--batch-size", "4", "--grad-accum", "1", *flags, env=ENV)
    return output, result


# ----------------------------------------------------------------------------
# 1. Divergence: nothing non-finite is ever saved


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr nan is out of range"),
    (["--lr", "-1"], "--lr -1.0 is out of range"),
    (["--loss", "ipo", "--beta", "0"], "--beta 0.0 is out of range"),
    (["--beta", "nan"], "--beta nan is out of range"),
    (["--eval-frac", "nan"], "--eval-frac nan is out of range"),
])
def test_04_refuses_bad_hyperparameters_before_writing(tmp_path, tiny_model, flags, message):
    output, result = train(tmp_path, tiny_model, *flags)
    assert error_line(result) == f"error: {message}"
    assert not output.exists()


@pytest.mark.parametrize("flags", [["--save-every", "1", "--epochs", "3"], ["--max-steps", "1"]])
def test_04_an_update_that_makes_weights_non_finite_is_never_saved(tmp_path, tiny_model, flags):
    """lr 1e39 overflows fp32: the first update makes the weights infinite. No checkpoint, no final model."""
    output, result = train(tmp_path, tiny_model, "--lr", "1e39", "--warmup-ratio", "0", *flags)
    error_line(result, "step 1:", "not finite", "last good checkpoint: none")
    assert not (output / "train_summary.json").exists() and not (output / "model.safetensors").exists()
    assert not glob.glob(str(output / "checkpoint-*"))


def test_04_the_kept_checkpoint_loads_with_finite_logits(tmp_path, tiny_model):
    """lr 1e30: step 1 stays finite and is saved, step 2's loss is NaN; checkpoint-1 is a good model."""
    output, result = train(tmp_path, tiny_model, "--lr", "1e30", "--warmup-ratio", "0", "--save-every", "1",
                           "--epochs", "3")
    error_line(result, "step 2:", "nan", f"last good checkpoint: {output / 'checkpoint-1'}")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(output / "checkpoint-1")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    assert all(torch.isfinite(value).all() for state in torch.load(output / "checkpoint-1" / "optimizer.pt",
                                                                     weights_only=True)["state"].values()
               for value in state.values() if value.ndim)


# ----------------------------------------------------------------------------
# 2. A rerun continues only the same run


def test_01_rerun_with_other_settings_is_refused_over_partial_and_finished_output(tmp_path, tiny_model):
    out = tmp_path / "responses.jsonl"
    flags = ["--prompts", prompts_file(tmp_path / "p.jsonl"), "--model", tiny_model, "--output", out]
    run_script("01_generate.py", *flags, "--max-new-tokens", "4", env=ENV, check=True)
    finished = out.read_text()
    changed = run_script("01_generate.py", *flags, "--max-new-tokens", "8", env=ENV)
    error_line(changed, f"{out}: --max-new-tokens: made with 4, now 8; rerun with the same settings", "delete")
    assert out.read_text() == finished
    os.rename(out, f"{out}.part0")  # as a killed run leaves it: every record in a part file, no final file
    error_line(run_script("01_generate.py", *flags, "--max-new-tokens", "8", env=ENV),
               "--max-new-tokens: made with 4, now 8")
    error_line(run_script("01_generate.py", *flags, "--max-new-tokens", "4", "--limit", "2", env=ENV),
               "--limit: made with None, now 2")  # a setting, not a hash of the prompts it chose
    write(tmp_path / "p.jsonl", [{"id": "p0", "lang": "en", "prompt": "Something else."}])
    error_line(run_script("01_generate.py", *flags, "--max-new-tokens", "4", env=ENV),
               f"made from other records than {tmp_path / 'p.jsonl'} holds now")
    prompts_file(tmp_path / "p.jsonl")
    assert not out.exists()
    resumed = run_script("01_generate.py", *flags, "--max-new-tokens", "4", env=ENV, check=True)
    assert "resumed from 6" in resumed.stdout and out.read_text() == finished


def test_02_rerun_with_another_translator_is_refused(tmp_path, tiny_model, tiny_model_b):
    responses = write(tmp_path / "responses.jsonl", [
        {"id": "a", "lang": lang, "prompt": "x", "responses": ["Hello there."], "model": tiny_model}
        for lang in ("en", "es")])
    out = tmp_path / "translated.jsonl"
    run_script("02_translate.py", "--input", responses, "--output", out, env=ENV, check=True)
    os.rename(out, f"{out}.part0")
    other = run_script("02_translate.py", "--input", responses, "--output", out, "--translator", tiny_model_b, env=ENV)
    error_line(other, f"--translator: made with '{tiny_model}', now '{tiny_model_b}'")
    write(tmp_path / "responses.jsonl", [{"id": "a", "lang": lang, "prompt": "x", "responses": ["Goodbye."], "model": tiny_model}
                      for lang in ("en", "es")])
    error_line(run_script("02_translate.py", "--input", responses, "--output", out, env=ENV),
               f"made from other records than {responses} holds now")
    assert not out.exists()


def test_03_rerun_with_other_settings_is_refused(tmp_path):
    source = write(tmp_path / "in.jsonl", [
        {"id": f"q{i}", "lang": lang, "prompt": f"{i}?", "responses": [f"{lang} {i}"],
         "translations": {"es": [f"es {i}"]} if lang == "en" else {"en": [f"en {i}"]}}
        for i in range(4) for lang in ("en", "es")])
    out = tmp_path / "pairs.jsonl"
    assert run_script("03_reward.py", "--input", source, "--output", out).returncode == 0
    again = run_script("03_reward.py", "--input", source, "--output", out)
    assert again.returncode == 0 and "already exists and is complete" in again.stdout
    error_line(run_script("03_reward.py", "--input", source, "--output", out, "--eval-frac", "0.5"),
               "--eval-frac: made with 0.0, now 0.5")
    write(tmp_path / "in.jsonl", [{"id": "q0", "lang": lang, "prompt": "0?", "responses": [f"{lang} 0"],
                                   "translations": {"es": ["es 0"]} if lang == "en" else {"en": ["en 0"]}}
                                  for lang in ("en", "es")])
    error_line(run_script("03_reward.py", "--input", source, "--output", out),
               f"made from other records than {source} holds now")


def test_05_a_changed_limit_never_reads_stale_predictions(tmp_path, tiny_model):
    math_dir = tmp_path / "math"
    math_dir.mkdir()
    for lang in ("en", "es"):
        write(math_dir / f"{lang}.jsonl", [{"id": f"m{i}", "question": f"{i} + {i}?", "answer": 2 * i}
                                           for i in range(3)])
    flags = ["--models", tiny_model, "--tasks", "math", "--langs", "en,es", "--math", math_dir,
             "--max-new-tokens", "2", "--output", tmp_path / "eval"]
    run_script("05_eval.py", *flags, "--limit", "2", env=ENV, check=True)
    error_line(run_script("05_eval.py", *flags, "--limit", "1", env=ENV), "--limit: made with 2, now 1")
    os.remove(tmp_path / "eval" / "eval.json")  # as the message says, to evaluate again
    run_script("05_eval.py", *flags, "--limit", "1", env=ENV, check=True)
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert results[os.path.basename(tiny_model)]["math accuracy"]["en"]["n"] == 1


def test_output_paths_that_cannot_be_written(tmp_path, tiny_model):
    flags = ["--prompts", prompts_file(tmp_path / "p.jsonl"), "--model", tiny_model]
    error_line(run_script("01_generate.py", *flags, "--output", tmp_path, env=ENV), "is a directory")
    (tmp_path / "a-file").write_text("x")
    error_line(run_script("01_generate.py", *flags, "--output", tmp_path / "a-file" / "out.jsonl", env=ENV),
               "cannot write there")
    output, result = train(tmp_path, tiny_model, name="a-file")
    assert error_line(result) == f"error: --output {output} is a file; 04 writes a directory"


def test_a_second_copy_stops_while_the_first_holds_the_lock(tmp_path, tiny_model):
    out = tmp_path / "responses.jsonl"
    with open(f"{out}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the first copy holds it while it runs
        result = run_script("01_generate.py", "--prompts", prompts_file(tmp_path / "p.jsonl"), "--model", tiny_model,
                            "--output", out, env=ENV)
    error_line(result, "another run is writing it")
    assert not out.exists() and not glob.glob(f"{out}.part*")


# ----------------------------------------------------------------------------
# 3. One line, not a traceback


def test_invalid_utf8_is_named_by_file_and_line(tmp_path, tiny_model):
    bad = b'{"id": "a", "lang": "en", "prompt": "ok"}\n{"id": "b", "lang": "en", "prompt": "caf\xe9"}\n'
    (tmp_path / "p.jsonl").write_bytes(bad)
    result = run_script("01_generate.py", "--prompts", tmp_path / "p.jsonl", "--model", tiny_model,
                        "--output", tmp_path / "r.jsonl", env=ENV)
    error_line(result, f"{tmp_path / 'p.jsonl'}:2: not valid UTF-8")
    (tmp_path / "r.jsonl").write_bytes(b'{"id": "a", "lang": "en", "responses": ["\xff"]}\n')
    result = run_script("02_translate.py", "--input", tmp_path / "r.jsonl", "--output", tmp_path / "t.jsonl", env=ENV)
    error_line(result, f"{tmp_path / 'r.jsonl'}:1: not valid UTF-8")
    (tmp_path / "mgsm_en.tsv").write_bytes(b"What is 1+1?\t2\nWhat is 2+2?\t4\xff\n")
    with pytest.raises(common.InputError, match=r"mgsm_en.tsv:2: not valid UTF-8"):
        common.load_prompts(str(tmp_path / "mgsm_en.tsv"))
    assert not (tmp_path / "t.jsonl").exists()


def test_a_language_that_is_not_a_string(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"id": "a", "lang": 5, "prompt": "x"}])
    with pytest.raises(common.InputError, match=r"p.jsonl:1: unknown language code 5 \(known: en,"):
        common.load_prompts(path)


@pytest.mark.parametrize("flags, message", [
    (["--eval-frac", "nan"], "out of range: --eval-frac in [0, 1)"),
    (["--method", "implicit", "--dpo-model", "a", "--ref-model", "b", "--batch-size", "0"],
     "out of range: --batch-size, --token-budget, --limit >= 1"),
    (["--method", "implicit", "--dpo-model", "a", "--ref-model", "b", "--beta", "nan"], "out of range: --beta > 0"),
    (["--limit", "0"], "out of range: --batch-size, --token-budget, --limit >= 1"),
])
def test_03_bad_numbers(tmp_path, flags, message):
    source = write(tmp_path / "in.jsonl", [{"id": "a", "lang": "en", "prompt": "x", "responses": ["y", "z"]}])
    result = run_script("03_reward.py", "--input", source, "--output", tmp_path / "out" / "pairs.jsonl", *flags)
    error_line(result, message)
    assert not (tmp_path / "out").exists()


def test_03_implicit_makes_its_output_folder(tmp_path, tiny_model, tiny_model_b):
    source = write(tmp_path / "in.jsonl", [{"id": "a", "lang": lang, "prompt": "Say hi.", "responses": ["Hi!", "Hey"]}
                                           for lang in ("en", "es")])
    result = run_script("03_reward.py", "--input", source, "--output", tmp_path / "new" / "dir" / "pairs.jsonl",
                        "--method", "implicit", "--dpo-model", tiny_model, "--ref-model", tiny_model_b, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_records(tmp_path / "new" / "dir" / "pairs.scores.jsonl")) == 2


# ----------------------------------------------------------------------------
# 4. Degenerate input


@pytest.mark.parametrize("content, flags, message", [
    ("", [], "no prompts"),
    (None, ["--limit", "0"], "and --limit must be at least 1"),
    (None, ["--limit", "-1"], "and --limit must be at least 1"),
    (None, ["--temperature", "-1"], "--temperature must be >= 0"),
])
def test_01_degenerate_input_is_refused(tmp_path, tiny_model, content, flags, message):
    path = tmp_path / "p.jsonl"
    prompts_file(path) if content is None else path.write_text(content)
    result = run_script("01_generate.py", "--prompts", path, "--model", tiny_model, "--output", tmp_path / "r.jsonl",
                        *flags, env=ENV)
    error_line(result, message)
    assert os.listdir(tmp_path) == ["p.jsonl"]  # nothing written at all


@pytest.mark.parametrize("script, flags, message", [
    ("02_translate.py", ["--limit", "0"], "--batch-size and --limit must be at least 1"),
    ("02_translate.py", ["--batch-size", "0"], "--batch-size and --limit must be at least 1"),
    ("05_eval.py", ["--limit", "0"], "--limit and --judge-limit must be at least 1"),
    ("05_eval.py", ["--judge-limit", "0"], "--limit and --judge-limit must be at least 1"),
])
def test_a_count_of_zero_is_refused_before_any_work(tmp_path, script, flags, message):
    """0 is a count, not "no limit": refused in one line before anything is read or written."""
    error_line(run_script(script, *flags, "--output", tmp_path / "out"), message)
    assert os.listdir(tmp_path) == []


def test_02_refuses_an_empty_file(tmp_path):
    (tmp_path / "r.jsonl").write_text("\n")
    result = run_script("02_translate.py", "--input", tmp_path / "r.jsonl", "--output", tmp_path / "t.jsonl")
    error_line(result, "no records to translate")


def test_texts_longer_than_the_context_are_skipped_and_counted(tmp_path, tiny_model):
    """A 10 MB prompt or response: skipped with one line (01), or null as too_long (02), in seconds."""
    huge = "word " * 2_000_000
    prompts = write(tmp_path / "p.jsonl", [{"id": "a", "lang": "en", "prompt": "Hi."},
                                           {"id": "b", "lang": "en", "prompt": huge}])
    out = tmp_path / "r.jsonl"
    result = run_script("01_generate.py", "--prompts", prompts, "--model", tiny_model, "--output", out,
                        "--max-new-tokens", "4", env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 prompt(s) longer than the model's 2048-token context" in result.stdout
    assert [r["id"] for r in read_records(out)] == ["a"] and "skipped too long 1" in result.stdout
    responses = write(tmp_path / "big.jsonl", [{"id": "a", "lang": lang, "prompt": "x", "model": tiny_model,
                                                "responses": [huge if lang == "en" else "Hola."]}
                                               for lang in ("en", "es")])
    result = run_script("02_translate.py", "--input", responses, "--output", tmp_path / "t.jsonl", env=ENV,
                        timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    english = read_records(tmp_path / "t.jsonl")[0]
    assert english["translations"]["es"] == [None] and english["translation_info"]["es"] == ["too_long"]
