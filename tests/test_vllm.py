"""01, 02, 05 and loop.sh through a real vLLM server (its CPU build), against the same stages in-process.

vLLM lives in a venv of its own (.ci/vllm-cpu-env builds it: its CPU build pins an older transformers); these
tests find its `vllm` command at $LOOP_VLLM, or .venv-vllm/bin/vllm in the checkout. Where neither is there
they are skipped, saying so, unless LOOP_REQUIRE_VLLM=1 (CI sets it), where that is a failure.

The server is started as README, "Paper scale on GPUs" shows, on loopback, fp32, with the embedded model
and a LoRA adapter of it trained here as a module: one start serves both. In fp32, greedy, vLLM's answers are
the in-process ones word for word (the prompts are rendered here; the server's token counts are checked).
"""
import contextlib
import json
import os
import re
import socket
import sys

import pytest

import common
from conftest import REPO, read_records, run_script
from test_loop import loop_environment, start_loop
from test_server import free_port, running_server

pytestmark = pytest.mark.slow
VLLM = os.environ.get("LOOP_VLLM") or os.path.join(REPO, ".venv-vllm", "bin", "vllm")
if not os.access(VLLM, os.X_OK):
    if os.environ.get("LOOP_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"LOOP_REQUIRE_VLLM=1 but there is no vLLM at {VLLM}: run bash .ci/vllm-cpu-env")
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=f"no vLLM at {VLLM} (bash .ci/vllm-cpu-env makes it)")]
# fp32, no torch.compile (a minute saved at every start), a small KV cache: README, "Paper scale on GPUs".
SERVE_FLAGS = "--host 127.0.0.1 --dtype float32 --enforce-eager"
ENVIRONMENT = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
PROMPT_FLAGS = ["--prompts", os.path.join(REPO, "data", "prompts"), "--langs", "en,es", "--limit", "3",
                "--max-new-tokens", "24"]


@contextlib.contextmanager
def vllm_serve(model, log_path, *flags):
    """`vllm serve MODEL` until /health answers; yields its base URL; stopped (its whole process group) on exit."""
    port = free_port()
    command = [VLLM, "serve", model, *SERVE_FLAGS.split(), "--port", str(port), *flags]
    with running_server(command, port, log_path, ENVIRONMENT) as (url, _):
        yield url


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A LoRA policy of the embedded model (04 --lora-rank 8, a few steps at a high rate): its answers differ."""
    directory = tmp_path_factory.mktemp("policy")
    pairs = directory / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": str(i), "prompt": f"Name a colour, number {i}.",
                                         "chosen": "Azul. Es un color bonito.", "rejected": "Blue."}) + "\n"
                             for i in range(8)))
    run_script("04_dpo.py", "--input", pairs, "--output", directory / "model", "--eval-frac", "0", "--lora-rank", "8",
               "--lr", "3e-3", "--batch-size", "4", "--grad-accum", "1", "--epochs", "2", check=True)
    return str(directory / "model")


@pytest.fixture(scope="module")
def server(policy, tmp_path_factory):
    """The embedded model, and the policy's adapter as the module `iter1` (named as a user might: 01 and 05 find
    it by its adapter folder, which vLLM lists as the module's root)."""
    log = tmp_path_factory.mktemp("vllm") / "log"
    with vllm_serve(common.embedded_model_dir(), log, "--enable-lora", "--max-lora-rank", "8",
                    "--lora-modules", f"iter1={policy}/adapter") as url:
        yield url


def without_engine(records, field="engine"):
    return [{k: v for k, v in r.items() if k != field} for r in records]


def test_01_through_vllm_writes_the_records_it_writes_in_process(server, policy, tmp_path):
    """The base and the LoRA policy: fp32 greedy records equal field for field (the repetition penalty on, which
    vLLM takes); the policy's column is served by its module, picked by its adapter folder, not its name."""
    for name, label in ((common.EMBEDDED_MODEL, "base"), (policy, "policy")):
        flags = ["--model", name, *PROMPT_FLAGS]
        run_script("01_generate.py", *flags, "--output", tmp_path / f"{label}-local.jsonl", check=True)
        served = run_script("01_generate.py", *flags, "--server", server,
                            "--output", tmp_path / f"{label}-served.jsonl", check=True)
        engine = f"{common.embedded_model_dir() if label == 'base' else 'iter1'} at {server}"
        assert f"engine {engine}" in served.stdout
        local, remote = (read_records(tmp_path / f"{label}-{kind}.jsonl") for kind in ("local", "served"))
        assert {r["engine"] for r in remote} == {engine} and len(local) == 6
        assert without_engine(remote) == without_engine(local)
    answers = {label: [r["responses"] for r in read_records(tmp_path / f"{label}-local.jsonl")]
               for label in ("base", "policy")}
    assert sum(a != b for a, b in zip(answers["base"], answers["policy"])) >= 3  # the adapter is served, not the base


def test_02_through_vllm_gives_the_same_translations(server, tmp_path):
    run_script("01_generate.py", "--model", common.EMBEDDED_MODEL, *PROMPT_FLAGS, "--output", tmp_path / "r.jsonl",
               check=True)
    flags = ["--input", tmp_path / "r.jsonl", "--retries", "0"]
    run_script("02_translate.py", *flags, "--output", tmp_path / "local.jsonl", check=True)
    run_script("02_translate.py", *flags, "--server", server, "--output", tmp_path / "served.jsonl", check=True)
    local, remote = read_records(tmp_path / "local.jsonl"), read_records(tmp_path / "served.jsonl")
    strip = lambda records: [{**r, "translation_info": without_engine([r["translation_info"]])[0]}  # noqa: E731
                             for r in records]
    assert strip(remote) == strip(local) and len(local) == 6
    assert {r["translation_info"]["engine"] for r in remote} == {f"{common.embedded_model_dir()} at {server}"}


def test_05_answers_a_base_and_a_lora_column_through_vllm(server, policy, tmp_path):
    """Both columns are served by the one server (the policy by its module, found by its adapter folder), with
    the answers 05 gives in-process, work file by work file."""
    flags = ["--models", common.EMBEDDED_MODEL, policy, "--tasks", "winrate", "--langs", "en,es", "--limit", "2",
             "--max-new-tokens", "12"]
    run_script("05_eval.py", *flags, "--judge-limit", "1", "--output", tmp_path / "local", check=True)
    run_script("05_eval.py", *flags, "--answers-only", "--server", server, "--output", tmp_path / "served",
               check=True)
    local = sorted((tmp_path / "local" / "work").glob("*.winrate.jsonl"))
    assert len(local) == 2
    engines = set()
    for path in local:
        served = read_records(tmp_path / "served" / "work" / path.name)
        assert without_engine(served) == without_engine(read_records(path)) and len(served) == 4
        engines |= {r["engine"] for r in served}
    assert engines == {f"{common.embedded_model_dir()} at {server}", f"iter1 at {server}"}


def test_loop_serves_each_lora_policy_as_base_plus_adapter(tmp_path):
    """SERVE="vllm serve ..." with LORA_RANK=8 and MERGED=0: no merged copy is written; iteration 1's 01 and 02
    run on vLLM, and 05's M1 column is answered by vLLM serving the base with iteration 1's adapter as a module,
    as in-process base + adapter would answer."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    serve = re.search(r'SERVE="(\.venv-vllm/bin/vllm serve [^"]*)" LORA_RANK=8 MERGED=0 bash loop.sh', readme).group(1)
    assert serve == f".venv-vllm/bin/vllm serve {{model}} {SERVE_FLAGS} --port {{port}}"  # README, "Paper scale on GPUs"
    port = free_port()
    environment = dict(loop_environment(tmp_path), SERVE=serve.replace(".venv-vllm/bin/vllm", VLLM),
                       SERVE_PORT=str(port), SERVE_WAIT="600", LORA_RANK="8", MERGED="0", EVAL_TASKS="winrate",
                       PYTHON=sys.executable, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    with open(tmp_path / "log", "w") as log:
        assert start_loop(environment, log).wait(timeout=1800) == 0, (tmp_path / "log").read_text()[-3000:]
    run, url = tmp_path / "run", f"http://127.0.0.1:{port}/v1"
    embedded = common.embedded_model_dir()
    assert {r["engine"] for r in read_records(run / "iter1" / "responses.jsonl")} == {f"{embedded} at {url}"}
    assert not (run / "iter1" / "model" / "merged").exists()
    server_log = (run / "eval" / "server1.log").read_text()
    assert "--enable-lora" in (tmp_path / "log").read_text() and "iter1" in server_log
    assert [m["engines"] for m in json.loads((run / "eval" / "eval.json").read_text())["models"]] == \
        [[f"{embedded} at {url}"], [f"iter1 at {url}"]]
    # The policy's answers, in-process, are the served ones.
    served = [r for path in (run / "eval" / "work").glob("*.winrate.jsonl") for r in read_records(path)
              if r["engine"] == f"iter1 at {url}"]
    run_script("05_eval.py", "--models", str(run / "iter1" / "model"), "--tasks", "winrate", "--langs", "en,es",
               "--prompts", os.path.join(REPO, "data", "x-alpacaeval"), "--limit", "1", "--max-new-tokens", "16",
               "--judge-limit", "1", "--output", tmp_path / "local", check=True)
    local = [r for path in (tmp_path / "local" / "work").glob("*.winrate.jsonl") for r in read_records(path)]
    answers = lambda records: sorted((r["id"], r["lang"], r["response"]) for r in records)  # noqa: E731
    assert answers(served) == answers(local) and len(served) == 2
    with pytest.raises(OSError):  # the last server was stopped
        socket.create_connection(("127.0.0.1", port), timeout=2)
