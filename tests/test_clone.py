"""A stranger's clone: the repository's tracked files alone, in a folder with nothing beside it.

The scripts' defaults must find everything they read inside the clone (its data/ folder), and nothing beside it.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, read_records


def clone_alone(tmp_path):
    """Copy the tracked files (and files git would track: new, not ignored) into tmp_path/alone/repo."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    clone = tmp_path / "alone" / "repo"
    for name in filter(None, listed):
        if os.path.isfile(os.path.join(REPO, name)):  # a deleted but not yet committed file is listed too
            os.makedirs(clone / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), clone / name)
    assert os.listdir(tmp_path / "alone") == ["repo"]  # nothing beside it, as in a stranger's clone
    return clone


def run_in(clone, script, *args):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=clone, capture_output=True, text=True,
                          env=environment, timeout=600)


@pytest.mark.slow
def test_a_clone_alone_runs_01_and_05_on_their_defaults(tmp_path, tiny_model):
    clone = clone_alone(tmp_path)
    # 05 on its defaults (tasks mgsm,math,winrate, MGSM from data/mgsm), with a tiny model as model and judge.
    result = run_in(clone, "05_eval.py", "--models", tiny_model, tiny_model, "--judge", tiny_model, "--limit", "1",
                    "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    predictions = read_records(clone / "runs" / "loop" / "eval" / "predictions.jsonl")
    mgsm = [r for r in predictions if r["task"] == "mgsm"]
    assert len(mgsm) == 2 * 6 and {r["lang"] for r in mgsm} == {"en", "es", "de", "fr", "ru", "zh"}
    assert {r["answer"] for r in mgsm} == {18.0}  # MGSM's first problem, Janet's ducks, in every language
    # 01 on its defaults (data/alpagasus, every language), writing where loop.sh's first iteration does.
    result = run_in(clone, "01_generate.py", "--model", tiny_model, "--limit", "1", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    responses = read_records(clone / "runs" / "loop" / "iter1" / "responses.jsonl")
    assert [r["id"] for r in responses] == ["alpagasus-0"] * 6


@pytest.mark.slow
def test_05_default_models_are_what_loop_sh_writes(tmp_path, tiny_model):
    """With no --models, 05 evaluates the base model and each finished runs/loop/iter*/model, in iteration order,
    and checks each iteration's responses.jsonl for overlap with what it evaluates."""
    clone = clone_alone(tmp_path)
    for iteration in (2, 1, 10):  # made out of order, and 10 sorts before 2 as text
        model = clone / "runs" / "loop" / f"iter{iteration}" / "model"
        shutil.copytree(tiny_model, model)
        (model / "train_summary.json").write_text('{"eval_after": {"rewards/accuracies": 0.5}, "eval_pairs": 2}')
        (model.parent / "responses.jsonl").write_text('{"id": "alpagasus-0", "lang": "en", "prompt": "x"}\n')
    os.makedirs(clone / "runs" / "loop" / "iter3" / "model")  # unfinished: no train_summary.json
    result = run_in(clone, "05_eval.py", "--tasks", "winrate", "--judge", tiny_model, "--limit", "1",
                    "--max-new-tokens", "2", "--langs", "en")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--models smollm2-135m runs/loop/iter1/model runs/loop/iter2/model runs/loop/iter10/model" in result.stdout
    report = (clone / "runs" / "loop" / "eval" / "report.md").read_text()
    assert "the texts the loop trained on (runs/loop/iter1/responses.jsonl, runs/loop/iter2/responses.jsonl, " \
           "runs/loop/iter10/responses.jsonl)" in report
