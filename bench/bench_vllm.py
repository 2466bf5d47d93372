"""Benchmark 01 in-process against 01 through vLLM's CPU build, on the same cores, on this machine.

The same command a user runs: `01_generate.py` on the embedded model, fp32, greedy, repetition penalty 1.1 (01's
default; vLLM takes it), on the first N Alpagasus prompt ids in en, es, de and fr. Two shapes:
  demo    24 ids x 4 languages = 96 prompts, 128 new tokens (the demo's iteration-1 generation)
  small    2 ids x 4 languages =  8 prompts,  64 new tokens
Variants, alternated round after round so a noisy machine slows them alike (the table gives the median):
  in-process   our decode loop, 32 prompts a batch (01's default); with --batch-sizes 32,96 also 96 a batch, as
               many rows as vLLM runs at once on the demo shape (its scheduler takes up to 256 requests)
  vllm         `vllm serve` fp32 (README, "Paper scale on GPUs": the tested CPU form), its engine's threads
               bound to both cores (VLLM_CPU_OMP_THREADS_BIND=0-1; by default it keeps one core for its API
               server); 01 sends every prompt as a request, 64 in flight
Tokens/s is 01's own summary (answer tokens over generation time; model load and server start are not in it).
Every variant's records are checked equal to in-process ones (fp32 greedy), so it is the same work.

    bash .ci/vllm-cpu-env                          # vLLM's CPU build in .venv-vllm (once)
    python bench/bench_vllm.py                     # both shapes, 3 rounds
    python bench/bench_vllm.py --shapes small --rounds 2
    python bench/bench_vllm.py --shapes demo --rounds 2 --batch-sizes 32,96
"""
import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
from bench_serve import running  # noqa: E402  (the same server start and stop as the transformers serve bench)
SHAPES = {"demo": (24, 128), "small": (2, 64)}  # prompt ids per language, new tokens


@contextlib.contextmanager
def vllm_server(vllm, model_dir, log_path):
    """`vllm serve` in fp32 on a free port; yields (base URL, seconds until /health answered)."""
    command = [vllm, "serve", model_dir, "--host", "127.0.0.1", "--dtype", "float32", "--enforce-eager"]
    environment = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_KVCACHE_SPACE="4")
    with running(command, log_path, environment) as started:
        yield started


def generate(output, limit, max_new_tokens, url=None, batch_size=32):
    """Run 01 as a user would; returns (tokens/s from its summary, records without their engine)."""
    command = [sys.executable, os.path.join(REPO, "01_generate.py"), "--prompts", os.path.join(REPO, "data", "alpagasus"),
               "--langs", "en,es,de,fr", "--limit", str(limit), "--max-new-tokens", str(max_new_tokens),
               "--output", output, "--batch-size", str(batch_size), *(["--server", url] if url else [])]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    rate = float(re.search(r"\(([\d.]+) tokens/s\)", result.stdout).group(1))
    with open(output, encoding="utf-8") as handle:
        return rate, [{k: v for k, v in json.loads(line).items() if k != "engine"} for line in handle]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm", default=os.path.join(REPO, ".venv-vllm", "bin", "vllm"), help="the vllm command")
    parser.add_argument("--shapes", default="demo,small", help=f"comma-separated, from {','.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the variants (alternated)")
    parser.add_argument("--batch-sizes", default="32", help="01's --batch-size in-process, comma-separated")
    args = parser.parse_args()
    variants = [(f"in-process {size}", None, int(size)) for size in args.batch_sizes.split(",")]
    import common
    print(f"command: python bench/bench_vllm.py --shapes {args.shapes} --rounds {args.rounds} "
          f"--batch-sizes {args.batch_sizes}")
    with tempfile.TemporaryDirectory() as work, \
            vllm_server(args.vllm, common.embedded_model_dir(), os.path.join(work, "vllm.log")) as (url, startup):
        print(f"vllm serve up after {startup:.0f}s")
        for shape in args.shapes.split(","):
            limit, max_new_tokens = SHAPES[shape]
            rates, differing = {}, 0
            for round_number in range(args.rounds):
                records = {}
                order = [*variants, ("vllm", url, 32)]
                for name, server, batch_size in order if round_number % 2 == 0 else order[::-1]:
                    output = os.path.join(work, f"{shape}-{name}-{round_number}.jsonl".replace(" ", "-"))
                    rate, records[name] = generate(output, limit, max_new_tokens, server, batch_size)
                    rates.setdefault(name, []).append(rate)
                differing += sum(a != b for name, _, _ in variants for a, b in zip(records[name], records["vllm"]))
            theirs = statistics.median(rates["vllm"])
            ours = ", ".join(f"{name} {statistics.median(rates[name]):.1f} tokens/s "
                             f"({statistics.median(rates[name]) / theirs:.2f}x vLLM)" for name, _, _ in variants)
            print(f"{shape} ({4 * limit} prompts x {max_new_tokens} tokens, median of {args.rounds}): {ours}, vLLM "
                  f"{theirs:.1f} tokens/s; records differing from vLLM's {differing} of "
                  f"{4 * limit * args.rounds * len(variants)}; all rates {rates}")


if __name__ == "__main__":
    main()
