"""Benchmark 05's proxy-tuned decoding (our three-model decode loop) against plain generation.

Proxy-tuning runs three models per generated token (large + alpha * (expert - antiexpert)),
so the ideal is one third of the plain speed. The baseline is common.generate_batches with the
large model alone (the same decode loop, one model); same prompts, greedy, same max new tokens, same batch.
Here all three models are the embedded one (what matters is the cost, not the answer).
Each variant runs in its own subprocess so its peak resident memory is its own.

    python bench/bench_eval.py            # 16 prompts, 64 new tokens
    python bench/bench_eval.py --quick    # 8 prompts, 32 new tokens
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(variant, num_prompts, max_new_tokens):
    """Child process: generate, print one JSON line with tokens, seconds and peak memory."""
    import common
    model, tokenizer = common.load_model(common.EMBEDDED_MODEL)
    prompts = common.load_prompts(os.path.join(REPO, "data", "prompts"), langs=["en", "es", "de", "fr"])
    prompts = prompts[::max(1, len(prompts) // num_prompts)][:num_prompts]
    prompt_ids = [common.chat_prompt_ids(tokenizer, p["prompt"]) for p in prompts]
    settings = dict(max_new_tokens=max_new_tokens, batch_size=num_prompts, show_progress=False)
    start = time.perf_counter()
    if variant == "proxy":
        expert, _ = common.load_model(common.EMBEDDED_MODEL)
        antiexpert, _ = common.load_model(common.EMBEDDED_MODEL)
        start = time.perf_counter()
        batches = list(common.generate_batches(model, tokenizer, prompt_ids, proxy=(expert, antiexpert, 1.0),
                                               **settings))
    else:
        batches = list(common.generate_batches(model, tokenizer, prompt_ids, **settings))
    seconds = time.perf_counter() - start
    tokens = sum(sample["new_tokens"] for batch in batches for _, samples in batch for sample in samples)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": tokens, "seconds": seconds, "peak_memory_mb": peak_mb}))


def run_variant(variant, num_prompts, max_new_tokens):
    command = [sys.executable, __file__, "--child", variant, "--num-prompts", str(num_prompts),
               "--max-new-tokens", str(max_new_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick=False):
    """Both variants, one after the other; returns the table rows."""
    num_prompts, max_new_tokens = (8, 32) if quick else (16, 64)
    proxy = run_variant("proxy", num_prompts, max_new_tokens)
    plain = run_variant("plain", num_prompts, max_new_tokens)
    ours, baseline = (r["tokens"] / r["seconds"] for r in (proxy, plain))
    return [{"stage": "05 eval",
             "metric": f"tokens/s, proxy-tuned (3 models) vs plain generate ({num_prompts} prompts; ideal ratio 0.33)",
             "ours": ours, "baseline": baseline, "ratio": ours / baseline,
             "peak_memory_mb": f"{proxy['peak_memory_mb']:.0f} vs {plain['peak_memory_mb']:.0f}"}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens")
    parser.add_argument("--child", choices=["proxy", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--num-prompts", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.num_prompts, args.max_new_tokens)
    else:
        print(f"command: python bench/bench_eval.py{' --quick' if args.quick else ''}")
        for row in run(args.quick):
            print(f"{row['stage']}: {row['metric']}: ours {row['ours']:.1f}, baseline {row['baseline']:.1f}, "
                  f"ratio {row['ratio']:.2f}x, peak MB {row['peak_memory_mb']}")
