"""01, 02 and 05 through a real OpenAI-compatible server, against the same stages in-process.

The server is `transformers serve` (it ships with transformers; its `serving` extra brings FastAPI and
Uvicorn), started by the tests on a free loopback port with a tiny model directory and stopped after.
It is the engine the tests can run here; vLLM and SGLang speak the same /v1/completions. What holds:
greedy records equal the in-process ones field for field (the engine that made them aside), because the
prompt text is rendered here and the server's prompt-token count is checked against ours.
"""
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import REPO, read_records, run_script
from test_eval import write_prompt_fixture

pytestmark = pytest.mark.slow
PROMPT_FLAGS = ["--prompts", os.path.join(REPO, "data", "prompts"), "--langs", "en,es"]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(model, log_path, port=None):
    """`transformers serve MODEL` on loopback until /health answers; yields its base URL; stopped on exit."""
    port = port or free_port()
    command = [os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", model, "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu"]
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with running_server(command, port, log_path, environment) as (url, process):
        yield url, process


@contextlib.contextmanager
def running_server(command, port, log_path, environment, wait=600):
    """Start a server command (in its own process group) until http://127.0.0.1:PORT/health answers; yields (its
    base URL, the process); the whole group is stopped on exit."""
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=environment)
    try:
        deadline = time.time() + wait
        while True:
            assert process.poll() is None and time.time() < deadline, open(log_path).read()[-3000:]
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)


@pytest.fixture(scope="module")
def served_model(lively_model, tmp_path_factory):
    """The lively tiny model, with do_sample in its generation config: transformers serve samples at a
    temperature above 0 only when the model's own config says so (vLLM and SGLang always do)."""
    directory = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(lively_model, directory)
    config_path = directory / "generation_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "do_sample": True}))
    return str(directory)


@pytest.fixture(scope="module")
def lively_server(served_model, tmp_path_factory):
    with serve(served_model, tmp_path_factory.mktemp("server") / "log") as (url, _):
        yield url


def assert_one_line_error(result, *fragments):
    """Exit code 2, no traceback, and the last line (after any progress bar) is one `error:` naming the fault."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and result.stderr.count("error: ") == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, last


def without_engine(records):
    """Records with the field that names their engine removed (it is the one field that should differ)."""
    for record in records:
        record.pop("engine", None)
        record.get("translation_info", {}).pop("engine", None)
    return records


def test_01_through_a_server_writes_the_records_it_writes_in_process(lively_server, served_model, tmp_path):
    flags = ["--model", served_model, *PROMPT_FLAGS, "--limit", "3", "--max-new-tokens", "24",
             "--repetition-penalty", "1.0"]
    local_run = run_script("01_generate.py", *flags, "--output", tmp_path / "local.jsonl", check=True)
    served = run_script("01_generate.py", *flags, "--server", lively_server, "--output", tmp_path / "served.jsonl",
                        check=True)
    assert f"engine {served_model} at {lively_server}" in served.stdout
    local, remote = read_records(tmp_path / "local.jsonl"), read_records(tmp_path / "served.jsonl")
    assert {r["engine"] for r in local} == {"in-process"}
    assert {r["engine"] for r in remote} == {f"{served_model} at {lively_server}"}
    assert without_engine(remote) == without_engine(local) and len(local) == 6
    # The tokens are counted alike (from the server's usage): the summaries' totals agree.
    tokens = [re.search(r"(\d+) tokens \(", run.stdout).group(1) for run in (local_run, served)]
    assert tokens[0] == tokens[1] and int(tokens[0]) > 0
    # Several samples: the server gives one choice per request, so the rest are asked for (other seeds).
    sampled = run_script("01_generate.py", *flags, "--server", lively_server, "--num-samples", "2", "--temperature",
                         "1.0", "--limit", "1", "--output", tmp_path / "sampled.jsonl", check=True)
    assert "generated 2" in sampled.stdout
    assert all(len(r["responses"]) == 2 and r["responses"][0] != r["responses"][1]
               for r in read_records(tmp_path / "sampled.jsonl"))
    # transformers serve takes no repetition penalty: one line says what to do, and nothing is written.
    penalised = run_script("01_generate.py", *flags[:-2], "--server", lively_server, "--output", tmp_path / "rp.jsonl")
    assert_one_line_error(penalised, "repetition_penalty", "--repetition-penalty 1.0")
    assert not os.path.exists(tmp_path / "rp.jsonl")


def test_a_lora_policy_is_never_answered_by_its_base_alone(lively_server, served_model, tmp_path):
    """The server lists one model, the policy's base: it does not serve the policy (its adapter is not there), so 01
    stops with one line before anything is written, instead of answering as the base."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                             for i in range(4)))
    run_script("04_dpo.py", "--model", served_model, "--input", pairs, "--output", tmp_path / "policy",
               "--eval-frac", "0", "--lora-rank", "4", "--batch-size", "2", check=True)
    result = run_script("01_generate.py", "--model", tmp_path / "policy", *PROMPT_FLAGS, "--server", lively_server,
                        "--output", tmp_path / "out" / "responses.jsonl")
    assert_one_line_error(result, f"lists 1 models ['{served_model}'], none of them {tmp_path / 'policy'}",
                          "--lora-modules")
    assert not (tmp_path / "out").exists()


def test_02_through_a_server_gives_the_same_translations_and_null_reasons(lively_server, served_model, tmp_path):
    run_script("01_generate.py", "--model", served_model, *PROMPT_FLAGS, "--limit", "2", "--max-new-tokens", "40",
               "--repetition-penalty", "1.0", "--output", tmp_path / "responses.jsonl", check=True)
    flags = ["--input", tmp_path / "responses.jsonl", "--retries", "0"]
    run_script("02_translate.py", *flags, "--output", tmp_path / "local.jsonl", check=True)
    served = run_script("02_translate.py", *flags, "--server", lively_server, "--output", tmp_path / "served.jsonl",
                        check=True)
    assert f"{served_model} at {lively_server}" in served.stdout
    local, remote = read_records(tmp_path / "local.jsonl"), read_records(tmp_path / "served.jsonl")
    assert {r["translation_info"]["engine"] for r in remote} == {f"{served_model} at {lively_server}"}
    assert without_engine(remote) == without_engine(local) and len(local) == 4
    assert all(set(r["translations"]) == {"en"} or set(r["translations"]) == {"es"} for r in remote)


def test_05_answers_and_judges_through_a_server(lively_server, served_model, tiny_model, tmp_path):
    flags = ["--models", tiny_model, served_model, "--tasks", "winrate", "--langs", "en,es", "--limit", "2",
             "--prompts", write_prompt_fixture(tmp_path / "prompts"), "--max-new-tokens", "8"]
    run_script("05_eval.py", *flags, "--output", tmp_path / "local", check=True)
    served = run_script("05_eval.py", *flags, "--server", lively_server, "--judge", served_model,
                        "--judge-server", lively_server, "--output", tmp_path / "served", check=True)
    summary = json.load(open(tmp_path / "served" / "eval.json"))
    assert [m["engines"] for m in summary["models"]] == [["in-process"], [f"{served_model} at {lively_server}"]]
    assert lively_server in summary["judge"]
    answers = lambda run: [{k: p[k] for k in ("model", "id", "lang", "response", "truncated")}  # noqa: E731
                           for p in read_records(tmp_path / run / "predictions.jsonl")]
    assert answers("served") == answers("local")  # the server's answers are the in-process ones
    judged = [p for p in read_records(tmp_path / "served" / "predictions.jsonl") if "judge_verdicts" in p]
    assert len(judged) == 4
    for record in judged:
        assert [v["order"] for v in record["judge_verdicts"]] == ["reference first", "candidate first"]
        assert all(isinstance(v["reply"], str) and v["choice"] in ("A", "B", None) for v in record["judge_verdicts"])
    unreadable = sum(v["choice"] is None for p in judged for v in p["judge_verdicts"])
    assert f"unreadable judge replies {unreadable}" in served.stdout
    # A judge the server does not serve: one line, before anything is generated.
    wrong = run_script("05_eval.py", *flags, "--judge", "gpt-4o", "--judge-server", lively_server,
                       "--output", tmp_path / "wrong")
    assert_one_line_error(wrong, "does not serve 'gpt-4o'")
    assert not os.path.exists(tmp_path / "wrong" / "work")


class NotCompletions(http.server.BaseHTTPRequestHandler):
    """A server that lists a model but answers every request with JSON that has no choices (a proxy's error page,
    a different API): the client must say so, not crash or write an empty answer."""
    keys = []  # the Authorization header of each POST

    def do_GET(self):
        self.reply({"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self):
        NotCompletions.keys.append(self.headers.get("Authorization"))
        self.reply({"object": "error", "message": "upstream unavailable"})

    def reply(self, value):
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_server_faults_are_one_line_and_a_killed_server_loses_nothing(served_model, tmp_path):
    flags = ["--model", served_model, *PROMPT_FLAGS, "--max-new-tokens", "16", "--repetition-penalty", "1.0"]
    # Nothing listening.
    down = run_script("01_generate.py", *flags, "--server", f"http://127.0.0.1:{free_port()}/v1",
                      "--output", tmp_path / "down.jsonl")
    assert_one_line_error(down, "/v1/models: no reply after 3 tries")
    # A reply without choices.
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotCompletions)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    odd = run_script("01_generate.py", *flags, "--limit", "1", "--server", f"http://127.0.0.1:{stub.server_port}/v1",
                     "--output", tmp_path / "odd.jsonl", env={"OPENAI_API_KEY": "sk-test"})
    stub.shutdown()
    assert_one_line_error(odd, "not a completions reply")
    assert NotCompletions.keys[0] == "Bearer sk-test"  # the API key goes as vLLM's --api-key expects it
    assert not os.path.exists(tmp_path / "odd.jsonl")

    port = free_port()
    output = tmp_path / "served.jsonl"
    run_script("01_generate.py", *flags, "--limit", "8", "--output", tmp_path / "local.jsonl", check=True)
    with serve(served_model, tmp_path / "log", port) as (url, server):
        # A wrong model name.
        wrong = run_script("01_generate.py", *flags, "--server", url, "--server-model", "llama-70b",
                           "--output", tmp_path / "wrong.jsonl")
        assert_one_line_error(wrong, "does not serve 'llama-70b'", served_model)
        # The server dies mid-run: 01 retries, then stops with one line; what came back is on disk.
        client = subprocess.Popen([sys.executable, os.path.join(REPO, "01_generate.py"), *flags, "--limit", "8",
                                   "--server", url, "--server-concurrency", "2", "--output", str(output)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
        part = tmp_path / "served.jsonl.part0"
        deadline = time.time() + 300
        while time.time() < deadline and (not part.exists() or len(part.read_text().splitlines()) < 3):
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        _, stderr = client.communicate(timeout=300)
    assert client.returncode == 2 and "no reply after 6 tries" in stderr.strip().splitlines()[-1], stderr[-2000:]
    saved = len(part.read_text().splitlines())
    assert 3 <= saved < 16 and not output.exists()
    # Rerun against a new server: it finishes the rest, and every record is there once, as in-process.
    with serve(served_model, tmp_path / "log", port):
        rerun = run_script("01_generate.py", *flags, "--limit", "8", "--server", url, "--output", output, check=True)
    assert f"resumed from {saved}, generated {16 - saved}" in rerun.stdout
    assert without_engine(read_records(output)) == without_engine(read_records(tmp_path / "local.jsonl"))
