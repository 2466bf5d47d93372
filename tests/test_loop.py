"""loop.sh, the whole loop: 01 -> 02 -> 03 -> 04 -> 05 on the embedded model, killed and resumed.

A random tiny model cannot be used here: its answers are noise, so every self-translation
fails the language check and no pair is ever made. The embedded 135M model, greedy, on four
one-sentence prompts in two languages, reliably yields a few pairs in about a minute.
"""
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import common
from conftest import REPO, read_records

spec = importlib.util.spec_from_file_location("eval05", os.path.join(REPO, "05_eval.py"))
eval05 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval05)

LOOP = open(os.path.join(REPO, "loop.sh"), encoding="utf-8").read()


def loop_default(name):
    """The default loop.sh gives a variable: NAME=${NAME:-default}."""
    return re.search(rf"^{name}=\$\{{{name}:-([^}}]*)\}}", LOOP, re.MULTILINE).group(1)


def test_the_driver_never_evaluates_a_prompt_it_trains_on():
    """The demo's selections: every iteration's 01 reads the first LIMIT ids of PROMPTS, 05 reads EVAL_PROMPTS,
    and no id (in any language) or text is in both. 05 is also handed every iteration's records to check."""
    langs = loop_default("LANGS").split(",")
    trained = common.load_prompts(os.path.join(REPO, loop_default("PROMPTS")), langs, int(loop_default("LIMIT")))
    limit = eval05.parse_limit(loop_default("EVAL_LIMIT"))
    evaluated = eval05.first_ids_per_language(
        common.load_prompts(os.path.join(REPO, loop_default("EVAL_PROMPTS")), langs), limit)
    assert len(trained) == int(loop_default("LIMIT")) * len(langs)
    assert [sum(p["lang"] == lang for p in evaluated) for lang in langs] == [60, 180, 180, 180]
    assert limit == {None: 180, "en": 60} and langs == ["en", "es", "de", "fr"]
    assert not {p["id"] for p in trained} & {p["id"] for p in evaluated}
    # No text in common at all: not in the first LIMIT ids, nor anywhere in the two sets, in any language.
    everything = lambda name: {p["prompt"] for p in common.load_prompts(os.path.join(REPO, name))}  # noqa: E731
    assert not everything(loop_default("PROMPTS")) & everything(loop_default("EVAL_PROMPTS"))
    generate_calls = re.findall(r"01_generate\.py[^\n]*\n[^\n]*", LOOP)
    assert len(generate_calls) == 2 and all('--prompts "$PROMPTS"' in c and '--limit "$LIMIT"' in c
                                            for c in generate_calls)
    assert LOOP.count("--prompts") == 3 and '--prompts "$EVAL_PROMPTS"' in LOOP
    assert 'trained_on+=("$dir/responses.jsonl")' in LOOP and '--trained-on "${trained_on[@]}"' in LOOP

PROMPTS = {
    "en": ["Say hello to me in one short sentence.", "Name one colour of the sky. Answer in one short sentence.",
           "What is the capital of France? Answer in one short sentence.", "Is water wet? Answer in one short sentence."],
    "es": ["Salúdame en una frase corta.", "Nombra un color del cielo. Responde en una frase corta.",
           "¿Cuál es la capital de Francia? Responde en una frase corta.", "¿El agua moja? Responde en una frase corta."],
}


def loop_environment(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for lang, texts in PROMPTS.items():
        (prompts / f"{lang}.jsonl").write_text(
            "".join(json.dumps({"id": f"s{i}", "prompt": t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts)),
            encoding="utf-8")
    return dict(os.environ, RUN=str(tmp_path / "run"), ITERS="1", PROMPTS=str(prompts), LANGS="en,es", LIMIT="4",
                MAX_NEW_TOKENS="40", EPOCHS="1", TRAIN_ARGS="--batch-size 1 --grad-accum 1",
                EVAL_TASKS="math,winrate", EVAL_LIMIT="1", EVAL_MAX_NEW_TOKENS="16", PYTHONUNBUFFERED="1")


def start_loop(environment, log):
    return subprocess.Popen(["bash", os.path.join(REPO, "loop.sh")], env=environment, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_loop_runs_all_stages_and_resumes_after_kills(tmp_path):
    environment = loop_environment(tmp_path)
    run = tmp_path / "run"
    iteration = run / "iter1"
    # 1. Kill the driver inside stage 02 (01 finished, 02 started). Resuming from part files
    #    inside a stage is tested stage by stage; here the driver must pick up the right stage.
    with open(tmp_path / "log1", "w") as log:
        process = start_loop(environment, log)
        deadline = time.time() + 900
        while time.time() < deadline and "02 translate" not in (tmp_path / "log1").read_text():
            assert process.poll() is None, (tmp_path / "log1").read_text()[-3000:]  # it stopped before 02
            time.sleep(0.2)
        time.sleep(3)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert (iteration / "responses.jsonl").exists() and not (iteration / "translated.jsonl").exists()
    responses_written = os.path.getmtime(iteration / "responses.jsonl")
    # 2. Rerun: 01 is skipped, 02 continues from its part file, the rest runs to the end.
    with open(tmp_path / "log2", "w") as log:
        assert start_loop(environment, log).wait(timeout=1800) == 0, (tmp_path / "log2").read_text()[-3000:]
    log2 = (tmp_path / "log2").read_text()
    assert "responses.jsonl already exists" in log2
    assert os.path.getmtime(iteration / "responses.jsonl") == responses_written
    # Every stage's output exists and holds what it should.
    responses = read_records(iteration / "responses.jsonl")
    assert sorted((r["id"], r["lang"]) for r in responses) == [(f"s{i}", lang) for i in range(4) for lang in ("en", "es")]
    translated = read_records(iteration / "translated.jsonl")
    # The default INTO_ENGLISH=0: English answers go into Spanish; the Spanish ones are not translated back.
    assert all(list(r["translations"]) == (["es"] if r["lang"] == "en" else []) for r in translated)
    assert all(len(r["translations"]["es"]) == 1 for r in translated if r["lang"] == "en")
    pairs = read_records(iteration / "pairs.jsonl") + read_records(iteration / "pairs.eval.jsonl")
    assert pairs and all(p["method"] == "imbalance" and p["chosen"] != p["rejected"] and p["lang"] == "es"
                         for p in pairs)
    model = iteration / "model"
    assert (model / "model.safetensors").exists() and (model / "config.json").exists()
    summary = json.loads((model / "train_summary.json").read_text())
    assert "eval_after" in summary and "eval_before" in summary
    assert read_records(model / "metrics.jsonl")[0]["rewards/accuracies"] is not None
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    # Held out: 05 checked every evaluated prompt against the iteration's training records.
    assert evaluation["held_out"] == {"trained_on": [str(iteration / "responses.jsonl")], "training_prompt_ids": 4,
                                      "overlap": 0}
    evaluated = read_records(run / "eval" / "predictions.jsonl")
    assert evaluated and not {p["id"] for p in evaluated} & {r["id"] for r in responses}
    report = (run / "eval" / "report.md").read_text()
    assert "iter1/model" in report and "math" in report and "winrate" in report.lower().replace(" ", "")
    # 3. Kill between stages: remove 05's output and run again; only 05 runs, nothing else is redone.
    for name in ("eval.json", "report.md"):
        (run / "eval" / name).unlink()
    model_written = os.path.getmtime(model / "model.safetensors")
    with open(tmp_path / "log3", "w") as log:
        assert start_loop(environment, log).wait(timeout=900) == 0, (tmp_path / "log3").read_text()[-3000:]
    assert "is complete" in (tmp_path / "log3").read_text()  # 04 saw its finished model and stopped
    assert os.path.getmtime(model / "model.safetensors") == model_written
    assert os.path.getmtime(iteration / "responses.jsonl") == responses_written
    assert (run / "eval" / "report.md").exists()


@pytest.mark.slow
def test_loop_with_lora_keeps_one_base_and_each_iterations_adapter(tmp_path):
    """LORA_RANK under LOOP_BF16=1 (a GPU's path), MERGED=0 (the paper-scale setting): each iteration writes its
    adapter alone, iteration 2 trains on iteration 1's (step 1 is ln 2) and its implicit reward scores iteration
    1 against the base on one base; 05 evaluates the base and both LoRA policies."""
    environment = {**loop_environment(tmp_path), "ITERS": "2", "LORA_RANK": "4", "MERGED": "0", "LOOP_BF16": "1",
                   "SAMPLES": "2", "MAX_NEW_TOKENS": "24", "EVAL_TASKS": "winrate"}
    # A server that takes no adapters (SERVE_LORA empty) runs a LoRA policy's merged copy: with MERGED=0, refused
    # before any work. (vLLM serving the adapter itself is tests/test_vllm.py's.)
    refused = subprocess.run(["bash", os.path.join(REPO, "loop.sh")], env={**environment, "SERVE": "any",
                                                                          "SERVE_LORA": ""},
                             cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "set MERGED=1" in refused.stdout and not (tmp_path / "run").exists()
    with open(tmp_path / "log", "w") as log:
        assert start_loop(environment, log).wait(timeout=1800) == 0, (tmp_path / "log").read_text()[-3000:]
    run = tmp_path / "run"
    for iteration in ("iter1", "iter2"):
        model = run / iteration / "model"
        assert sorted(p.name for p in model.iterdir() if not p.name.startswith(("train_summary", "reference"))) == \
            ["adapter", "metrics.jsonl"]
        config = json.loads((model / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["base_model_name_or_path"] == common.embedded_model_dir()
    step_1 = read_records(run / "iter2" / "model" / "metrics.jsonl")[0]  # DPO + NLL (NLL_WEIGHT=1)
    assert abs(step_1["loss"] - step_1["nll_loss"] - math.log(2)) < 1e-6
    scores = read_records(run / "iter2" / "pairs.scores.jsonl")
    assert scores and all(s["dpo_model"] == str(run / "iter1" / "model") and s["ref_model"] == "smollm2-135m"
                          and s["dpo_logps"] != s["ref_logps"] for s in scores)
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    assert len(evaluation["models"]) == 3, evaluation["models"]


@pytest.mark.slow
def test_loop_generates_on_the_servers_it_starts_and_stops(tmp_path):
    """SERVE: loop.sh serves each iteration's policy for 01 and 02 (transformers serve here, vLLM at scale),
    and each model in turn for 05's answers; every record names its server, and no server outlives the run."""
    from test_server import free_port
    port = free_port()
    serve = (f"{os.path.join(os.path.dirname(sys.executable), 'transformers')} serve {{model}} --host 127.0.0.1 "
             "--port {port} --device cpu")
    environment = dict(loop_environment(tmp_path), SERVE=serve, SERVE_PORT=str(port), EVAL_TASKS="winrate",
                       INTO_ENGLISH="1",
                       GEN_ARGS="--repetition-penalty 1.0", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    with open(tmp_path / "log", "w") as log:
        assert start_loop(environment, log).wait(timeout=1800) == 0, (tmp_path / "log").read_text()[-3000:]
    run, url = tmp_path / "run", f"http://127.0.0.1:{port}/v1"
    embedded = common.embedded_model_dir()
    assert {r["engine"] for r in read_records(run / "iter1" / "responses.jsonl")} == {f"{embedded} at {url}"}
    assert {r["translation_info"]["engine"] for r in read_records(run / "iter1" / "translated.jsonl")} == \
        {f"{embedded} at {url}"}
    # INTO_ENGLISH=1: both directions, as the papers translate.
    assert all(list(r["translations"]) == ["es" if r["lang"] == "en" else "en"]
               for r in read_records(run / "iter1" / "translated.jsonl"))
    served = [f"{embedded} at {url}", f"{run / 'iter1' / 'model'} at {url}"]
    assert [m["engines"] for m in json.loads((run / "eval" / "eval.json").read_text())["models"]] == \
        [[served[0]], [served[1]]]
    assert (run / "eval" / "server1.log").exists() and (run / "iter1" / "model" / "model.safetensors").exists()
    with pytest.raises(OSError):  # the last server was stopped
        socket.create_connection(("127.0.0.1", port), timeout=2)


# Flags the test adds to each of the stage commands (README, "The stages"), so that they run in about a minute:
# the short prompts above instead of Alpagasus, shorter answers, one prompt evaluated. Later flags win.
README_OVERRIDES = {
    "01_generate.py": "--prompts {prompts} --langs en,es --limit 4 --max-new-tokens 40",
    "04_dpo.py": "--batch-size 1",
    "05_eval.py": "--langs en,es --limit 1 --max-new-tokens 16",
}


@pytest.mark.slow
def test_readme_stage_commands_run_as_shown_after_the_demo(tmp_path, tiny_model):
    """The stage block (README, "The stages"), line by line in its order, in a clone where a demo-like run has
    already filled runs/loop/iter1/ (with settings of its own): every command succeeds, the demo's files stay."""
    from test_clone import clone_alone
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    block = re.search(r"```bash\n(.*?)```", readme[readme.index("## The stages"):], re.DOTALL).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert [c.split()[1] for c in commands[1:]] == [f"0{k}_{name}.py" for k, name in enumerate(
        ("generate", "translate", "reward", "dpo", "eval"), start=1)]
    clone = clone_alone(tmp_path)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    demo = clone / "runs" / "loop" / "iter1" / "responses.jsonl"
    subprocess.run([sys.executable, "01_generate.py", "--model", tiny_model, "--limit", "1", "--max-new-tokens", "4"],
                   cwd=clone, env=environment, check=True, capture_output=True)
    before = demo.read_bytes()
    prompts = loop_environment(tmp_path)["PROMPTS"]
    script = "set -e\n" + "\n".join(
        f"{line} {README_OVERRIDES.get(line.split()[1], '').format(prompts=prompts)}" if line.startswith("python ")
        else line for line in commands)
    result = subprocess.run(["bash", "-c", script.replace("python ", f"{sys.executable} ")], cwd=clone,
                            env=environment, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    output = clone / "runs" / "by-hand"
    assert len(read_records(output / "pairs.jsonl")) >= 1 and (output / "model" / "train_summary.json").exists()
    report = (output / "eval" / "report.md").read_text(encoding="utf-8")
    assert "## Effect: `model` - `smollm2-135m` on held-out prompts" in report
    assert demo.read_bytes() == before and sorted(os.listdir(demo.parent)) == [
        "responses.jsonl", "responses.jsonl.lock", "responses.jsonl.settings.json"]
