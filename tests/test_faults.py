"""Faults a hostile user (or a full disk) causes: no non-finite number is read or written, a byte-order mark or a
cut model file is one line, and a disk that refuses a write is one line with the finished work kept."""
import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import REPO, read_records, run_script
from test_reliability import ENV, error_line, pairs_file, prompts_file, write


# ----------------------------------------------------------------------------
# 1. Nothing non-finite is read or written


def test_a_number_too_large_for_a_float_is_refused_at_its_line(tmp_path, tiny_model):
    """json reads 1e400 as inf; it is refused like NaN, in any field, read or not, before anything is written."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "lang": "en", "prompt": "Hi."}\n'
                    '{"id": "b", "lang": "en", "prompt": "Hello.", "answer": 1e400}\n', encoding="utf-8")
    output = tmp_path / "responses.jsonl"
    result = run_script("01_generate.py", "--model", tiny_model, "--prompts", path, "--langs", "en",
                        "--output", output, "--max-new-tokens", "2", env=ENV)
    error_line(result, f"{path}:2: not valid JSON (1e400 is not a finite number)")
    assert not output.exists()


def test_an_mgsm_answer_too_large_for_a_float_is_refused(tmp_path, tiny_model):
    """400 nines overflow a float to inf: not a number, in a gold answer or in a model's answer."""
    assert common.parse_number("9" * 400) is None and common.extract_last_number("It is 7, or " + "9" * 400) == 7
    path = tmp_path / "mgsm_en.tsv"
    path.write_text("What is one plus one?\t2\nHow many nines?\t" + "9" * 400 + "\n", encoding="utf-8")
    output = tmp_path / "responses.jsonl"
    result = run_script("01_generate.py", "--model", tiny_model, "--prompts", path, "--langs", "en",
                        "--output", output, "--max-new-tokens", "2", env=ENV)
    error_line(result, f"{path}:2: answer '999", "is not a number")
    assert not output.exists()


def test_02_refuses_an_infinite_copied_field_before_writing(tmp_path, tiny_model):
    """A field 02 only carries through (here 01's temperature, edited to 1e400) stops 02 at its line, naming
    02's input, and no translated.jsonl appears."""
    responses = tmp_path / "responses.jsonl"
    run_script("01_generate.py", "--model", tiny_model, "--prompts", prompts_file(tmp_path / "p.jsonl", n=2),
               "--langs", "en,es", "--output", responses, "--max-new-tokens", "4", env=ENV, check=True)
    lines = responses.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[1])
    lines[1] = json.dumps(record).replace('"temperature": 0.0', '"temperature": 1e400')
    assert "1e400" in lines[1]
    responses.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "translated.jsonl"
    result = run_script("02_translate.py", "--translator", tiny_model, "--input", responses, "--output", output,
                        env=ENV)
    error_line(result, f"{responses}:2: not valid JSON (1e400 is not a finite number)")
    assert not output.exists() and not list(tmp_path.glob("translated.jsonl.part*"))


def test_writers_refuse_non_finite_numbers_before_writing(tmp_path):
    """save_batch, write_jsonl and write_json: a NaN or an infinity stops with one line naming the record, and
    neither a part file nor a final file (nor a .partial) is left."""
    out = str(tmp_path / "out.jsonl")
    good, bad = {"id": "a", "lang": "en", "score": 1.0}, {"id": "b", "lang": "es", "score": float("nan")}
    for write_records in (lambda: common.save_batch(out, [good, bad]), lambda: common.write_jsonl(out, [good, bad])):
        with pytest.raises(common.InputError, match=r"out.jsonl: the record \(id 'b', lang 'es'\) holds NaN"):
            write_records()
        assert os.listdir(tmp_path) == []
    with pytest.raises(common.InputError, match="eval.json: the record holds NaN or an infinite number"):
        common.write_json(str(tmp_path / "eval.json"), {"es": {"score": float("inf")}})
    assert os.listdir(tmp_path) == []
    common.write_jsonl(out, [good])  # and a finite record is written as before
    assert read_records(out) == [good]


# ----------------------------------------------------------------------------
# 2. One rule for every reader: a byte-order mark is refused at line 1; duplicate and null ids name their line


@pytest.mark.parametrize("name, content", [
    ("mgsm_en.tsv", "\ufeffWhat is one plus one?\t2\n"),
    ("prompts.jsonl", '\ufeff{"id": "a", "lang": "en", "prompt": "Hi."}\n'),
])
def test_a_byte_order_mark_is_refused_in_every_reader(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(common.InputError, match=rf"{name}:1: starts with a byte-order mark \(U\+FEFF\)"):
        common.load_prompts(str(path), langs=["en"])


def test_05_refuses_an_mgsm_file_with_a_byte_order_mark(tmp_path, tiny_model):
    mgsm = tmp_path / "mgsm"
    mgsm.mkdir()
    (mgsm / "mgsm_en.tsv").write_text("\ufeffWhat is one plus one?\t2\nAnd two plus two?\t4\n", encoding="utf-8")
    result = run_script("05_eval.py", "--models", tiny_model, "--tasks", "mgsm", "--langs", "en", "--mgsm", mgsm,
                        "--output", tmp_path / "eval", "--max-new-tokens", "2", env=ENV)
    error_line(result, "mgsm_en.tsv:1: starts with a byte-order mark")
    assert not (tmp_path / "eval" / "eval.json").exists()


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "lang": "en", "prompt": "x"}', '{"id": "b", "lang": "en", "prompt": "y"}',
      '{"id": "a", "lang": "en", "prompt": "z"}'], "p.jsonl:3: id 'a' appears twice in language 'en' (first at"),
    (['{"id": "a", "lang": "en", "prompt": "x"}', '{"id": null, "lang": "en", "prompt": "y"}'],
     "p.jsonl:2: 'id' is null"),
])
def test_duplicate_and_null_ids_name_their_line(tmp_path, lines, message):
    path = write(tmp_path / "p.jsonl", lines)
    with pytest.raises(common.InputError) as raised:
        common.load_prompts(path, langs=["en"], limit=1)  # the duplicate lies past --limit: still refused
    assert message in str(raised.value)


# ----------------------------------------------------------------------------
# 3. A cut model is one line, before any work


def test_a_cut_model_file_stops_05_before_the_first_answer(tmp_path, tiny_model):
    """loop.sh's iteration-1 model, its model.safetensors cut in half (its train_summary.json present): 05 with
    no --models names it before the base model answers anything; 04, which would load it, names it too."""
    cut = tmp_path / "runs" / "loop" / "iter1" / "model"
    cut.mkdir(parents=True)
    for name in os.listdir(tiny_model):
        data = open(os.path.join(tiny_model, name), "rb").read()
        (cut / name).write_bytes(data[:len(data) // 2] if name == "model.safetensors" else data)
    (cut / "train_summary.json").write_text('{"eval_after": {"rewards/accuracies": 0.5}, "eval_pairs": 2}')
    (cut.parent / "responses.jsonl").write_text('{"id": "alpagasus-0", "lang": "en", "prompt": "x"}\n')
    result = subprocess.run([sys.executable, os.path.join(REPO, "05_eval.py"), "--tasks", "winrate", "--langs",
                             "en", "--judge", tiny_model, "--prompts", os.path.join(REPO, "data", "prompts"),
                             "--max-new-tokens", "2"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, **ENV})
    error_line(result, "runs/loop/iter1/model: model.safetensors is missing, cut short or damaged")
    assert not (tmp_path / "runs" / "loop" / "eval" / "work").exists()  # nothing was answered
    trained = run_script("04_dpo.py", "--model", cut, "--input", pairs_file(tmp_path / "pairs.jsonl"),
                         "--output", tmp_path / "out", "--eval-frac", "0", env=ENV)
    error_line(trained, f"{cut}: model.safetensors is missing, cut short or damaged")
    common.check_weights(tiny_model)  # a whole one passes


# ----------------------------------------------------------------------------
# 4. A disk that refuses a write: one line, the finished work kept, the same command continues


def small_disk(tmp_path, size_kib):
    """A folder on a filesystem of `size_kib` KiB (tmpfs: this user may mount one), or None where mounting is
    not allowed (then the tests below limit the size of any file the process writes instead: ulimit -f)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    return disk, mounted


def run_limited(script, *args, mounted, file_limit):
    """run_script, with every file this process writes limited to `file_limit` bytes unless on a small disk."""
    command = [sys.executable, os.path.join(REPO, script), *map(str, args)]
    limit = None if mounted else lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, preexec_fn=limit,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def grow(disk, mounted):
    """Make room: a bigger filesystem (or, without one, the next run has no file-size limit)."""
    if mounted:
        subprocess.run(["mount", "-o", "remount,size=65536k", str(disk)], check=True)


@pytest.fixture
def unmount():
    disks = []
    yield disks.append
    for disk in disks:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_04_on_a_full_disk_keeps_its_checkpoint_and_continues(tmp_path, tiny_model, unmount):
    """LoRA checkpoints are small and fit; the merged model (--save-merged) does not: one line naming the output, no
    train_summary.json, the last checkpoint kept; with room, the same command resumes from it and ends with
    the weights of a run that never ran out of space."""
    flags = ["--input", pairs_file(tmp_path / "pairs.jsonl"), "--model", tiny_model, "--eval-frac", "0",
             "--lora-rank", "4", "--batch-size", "1", "--grad-accum", "1", "--lr", "1e-2", "--save-every", "3", "--save-merged"]
    straight = tmp_path / "straight"
    run_script("04_dpo.py", *flags, "--output", straight, env=ENV, check=True)
    disk, mounted = small_disk(tmp_path, 1024)
    if mounted:
        unmount(disk)
    output = disk / "out"
    result = run_limited("04_dpo.py", *flags, "--output", output, mounted=mounted, file_limit=2 ** 20)
    line = error_line(result, f"{output}: ", "MiB free there); make room and rerun the same command")
    assert ("No space left on device" if mounted else "File too large") in line
    assert not (output / "train_summary.json").exists()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-6"]
    grow(disk, mounted)
    resumed = run_script("04_dpo.py", *flags, "--output", output, env=ENV, check=True)
    assert "resuming from" in resumed.stdout and (output / "train_summary.json").exists()
    ours, theirs = (load_file(run / "merged" / "model.safetensors") for run in (output, straight))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_01_on_a_full_disk_writes_no_output_and_continues(tmp_path, tiny_model, unmount):
    disk, mounted = small_disk(tmp_path, 64)
    if mounted:
        unmount(disk)
        (disk / "filler").write_bytes(b"x" * (64 * 1024 - 4096 * 2))  # two pages left: a lock and settings file
    output = disk / "responses.jsonl"
    flags = ["--model", tiny_model, "--prompts", prompts_file(tmp_path / "p.jsonl", n=3), "--langs", "en,es",
             "--output", output, "--max-new-tokens", "4"]
    result = run_limited("01_generate.py", *flags, mounted=mounted, file_limit=64)  # tempfile probes write 4
    error_line(result, f"error: {output}", "MiB free there); make room and rerun the same command")
    assert not output.exists() and not list(disk.glob("responses.jsonl.partial"))
    if mounted:  # the disk filled at the final merge: every answer is in the kept part file
        assert len(read_records(f"{output}.part0")) == 6
        os.remove(disk / "filler")
    resumed = run_script("01_generate.py", *flags, env=ENV, check=True)
    assert len(read_records(output)) == 6, resumed.stdout


def test_an_error_while_a_progress_bar_is_drawing_starts_a_line_of_its_own(tmp_path, tiny_model):
    """The first batch's write is refused while 01's generate bar is half drawn (no newline yet): the bar is
    ended before the error line, and nothing is drawn after it."""
    flags = ["--model", tiny_model, "--prompts", prompts_file(tmp_path / "p.jsonl", n=8), "--langs", "en,es",
             "--output", tmp_path / "out" / "responses.jsonl", "--max-new-tokens", "4", "--batch-size", "1"]
    result = run_limited("01_generate.py", *flags, mounted=False, file_limit=1024)  # ~3 records
    error_line(result, "File too large", "make room and rerun the same command")
    assert "generate:" in result.stderr and result.stderr.endswith("continues from what was finished\n")


def test_05_reports_on_a_model_trained_without_held_out_pairs(tmp_path, tiny_model):
    """04 --eval-frac 0 trains on every pair and holds none out: 05 evaluates its model, with no held-out reward
    accuracy to report for it (and none invented)."""
    run_script("04_dpo.py", "--model", tiny_model, "--input", pairs_file(tmp_path / "pairs.jsonl"), "--output",
               tmp_path / "model", "--eval-frac", "0", "--batch-size", "1", "--max-steps", "1", env=ENV, check=True)
    assert json.loads((tmp_path / "model" / "train_summary.json").read_text())["eval_pairs"] == 0
    run_script("05_eval.py", "--models", tiny_model, tmp_path / "model", "--tasks", "winrate", "--langs", "en",
               "--limit", "1", "--judge", tiny_model, "--prompts", os.path.join(REPO, "data", "prompts"),
               "--max-new-tokens", "2", "--output", tmp_path / "eval", env=ENV, check=True)
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert len(results) == 2 and all("held-out reward accuracy (04)" not in metrics for metrics in results.values())
    assert all("language fidelity of answers to instructions" in metrics for metrics in results.values())


def test_a_gold_answer_too_large_for_a_float_is_refused_at_its_line():
    """In JSON a 400-digit integer is exact, but no float can hold it: 05 refuses it as it refuses inf."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("evaluate", os.path.join(REPO, "05_eval.py"))
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    for answer in (10 ** 400, float("nan"), "1e400"):
        with pytest.raises(common.InputError, match="math.jsonl:4: gold answer .* is not a number"):
            evaluate.check_gold(answer, "math.jsonl:4")
    assert evaluate.check_gold(10 ** 20, "math.jsonl:4") == 1e20
