"""Benchmark 01 in-process against 01 through a serving engine (`transformers serve`), on this machine.

The same command a user runs, twice: `01_generate.py` on the embedded model, greedy, no repetition
penalty (transformers serve takes none), the first N bundled prompts of en, es, de and fr.
  in-process   our decode loop, 32 prompts a batch (01's default)
  server       --server http://127.0.0.1:PORT/v1: every prompt a request, 64 in flight (01's default)
  server-cb    the same against `transformers serve --continuous-batching` (paged attention, requests batched)
Variants alternate, round after round, so a noisy machine slows them alike; the table gives the median.
Tokens/s is 01's own summary (answer tokens over the generation time; the model load and the server's
start-up are not in it). The records are checked equal between variants (greedy), so the comparison is
of the same work.

    python bench/bench_serve.py                 # 32 prompts, 64 new tokens, 3 rounds
    python bench/bench_serve.py --quick         # 8 prompts, 32 new tokens, 2 rounds

On a GPU the engine to measure is vLLM; the same comparison is, with vLLM installed:
    vllm serve <model directory> --port 8000 &
    python 01_generate.py --model <model directory> --server http://127.0.0.1:8000/v1 --limit 250 ...
"""
import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server(model_dir, extra, log_path):
    """transformers serve on a free port; yields (base URL, seconds until /health answered)."""
    command = [os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", model_dir, "--host",
               "127.0.0.1", "--device", "cpu", *extra]
    with running(command, log_path) as started:
        yield started


@contextlib.contextmanager
def running(command, log_path, environment=None):
    """A server command, given `--port` and a free port, in a process group of its own; yields (base URL, seconds
    until /health answered); the group is stopped on exit."""
    port, started = free_port(), time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                   env=environment, start_new_session=True)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: {open(log_path).read()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", time.perf_counter() - started
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)


def generate(output, limit, max_new_tokens, url=None):
    """Run 01 as a user would; returns (tokens/s from its summary, wall seconds, records)."""
    command = [sys.executable, os.path.join(REPO, "01_generate.py"), "--prompts", os.path.join(REPO, "data", "prompts"),
               "--langs", "en,es,de,fr", "--limit", str(limit), "--max-new-tokens", str(max_new_tokens),
               "--repetition-penalty", "1.0", "--output", output, *(["--server", url] if url else [])]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    rate = float(re.search(r"\(([\d.]+) tokens/s\)", result.stdout).group(1))
    with open(output, encoding="utf-8") as handle:
        records = [{k: v for k, v in json.loads(line).items() if k != "engine"} for line in handle]
    return rate, wall, records


def run(quick=False, rounds=None):
    import common
    limit, max_new_tokens = (2, 32) if quick else (8, 64)
    rounds = rounds or (2 if quick else 3)
    model_dir = common.embedded_model_dir()
    rates, walls, reference = {}, {}, None
    with tempfile.TemporaryDirectory() as work, \
            server(model_dir, [], os.path.join(work, "plain.log")) as (plain_url, plain_start), \
            server(model_dir, ["--continuous-batching"], os.path.join(work, "cb.log")) as (cb_url, cb_start):
        variants = {"in-process": None, "server": plain_url, "server-cb": cb_url}
        for round_number in range(rounds):
            for name, url in variants.items():
                output = os.path.join(work, f"{name}-{round_number}.jsonl")
                rate, wall, records = generate(output, limit, max_new_tokens, url)
                rates.setdefault(name, []).append(rate)
                walls.setdefault(name, []).append(wall)
                reference = reference or records
                if records != reference:  # greedy: every engine must give the same answers
                    print(f"note: {name} answers differ from in-process ones in round {round_number}",
                          file=sys.stderr)
    prompts = 4 * limit
    median = {name: statistics.median(values) for name, values in rates.items()}
    rows = []
    for name, startup in (("server", plain_start), ("server-cb", cb_start)):
        rows.append({"stage": "01 generate", "peak_memory_mb": "-",
                     "metric": f"tokens/s, `transformers serve`{' --continuous-batching' if name == 'server-cb' else ''}"
                               f" vs in-process ({prompts} prompts, {max_new_tokens} tokens, median of {rounds}; "
                               f"command wall {statistics.median(walls[name]):.0f}s vs "
                               f"{statistics.median(walls['in-process']):.0f}s; server start {startup:.0f}s)",
                     "ours": median[name], "baseline": median["in-process"], "ratio": median[name] / median["in-process"]})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer prompts, tokens and rounds")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the three variants")
    args = parser.parse_args()
    print(f"command: python bench/bench_serve.py{' --quick' if args.quick else ''}")
    for row in run(args.quick, args.rounds):
        print(f"{row['metric']}: server {row['ours']:.1f}, in-process {row['baseline']:.1f}, ratio {row['ratio']:.2f}x")
