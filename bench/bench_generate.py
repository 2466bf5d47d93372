"""Benchmark 01's batched generation against a one-prompt-at-a-time loop.

Same model, same prompts, same settings (greedy, repetition penalty 1.1, same
max new tokens), measured in one run. Each variant runs in its own subprocess so
its peak resident memory (ru_maxrss) is its own. Tokens/s counts generated answer
tokens only (padding and the tokens of rows that already stopped do not count).

    python bench/bench_generate.py            # 32 prompts, batch 32, 64 new tokens
    python bench/bench_generate.py --quick    # 8 prompts, 32 new tokens
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


def measure(variant, num_prompts, batch_size, max_new_tokens):
    """Run in a child process: generate, print one JSON line with tokens, seconds, peak memory."""
    import torch

    import common
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.EMBEDDED_MODEL)
    prompts = common.load_prompts(os.path.join(REPO, "data", "prompts"), langs=["en", "es", "de", "fr"])
    prompts = prompts[::max(1, len(prompts) // num_prompts)][:num_prompts]
    prompt_ids = [common.chat_prompt_ids(tokenizer, p["prompt"]) for p in prompts]
    settings = dict(max_new_tokens=max_new_tokens, repetition_penalty=1.1, show_progress=False)
    start = time.perf_counter()
    if variant == "batched":
        outputs = [s for batch in common.generate_batches(model, tokenizer, prompt_ids, batch_size=batch_size,
                                                          **settings) for _, s in batch]
    else:  # the loop a newcomer writes first: one prompt, one generate call
        outputs = [s for ids in prompt_ids for batch in common.generate_batches(model, tokenizer, [ids], batch_size=1,
                                                                                **settings) for _, s in batch]
    seconds = time.perf_counter() - start
    tokens = sum(sample["new_tokens"] for samples in outputs for sample in samples)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": tokens, "seconds": seconds, "peak_memory_mb": peak_mb}))


def run_variant(variant, num_prompts, batch_size, max_new_tokens):
    command = [sys.executable, __file__, "--child", variant, "--num-prompts", str(num_prompts),
               "--batch-size", str(batch_size), "--max-new-tokens", str(max_new_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick=False):
    """Both variants, one after the other; returns the table rows."""
    num_prompts, max_new_tokens = (8, 32) if quick else (32, 64)
    batched = run_variant("batched", num_prompts, 32, max_new_tokens)
    single = run_variant("single", num_prompts, 1, max_new_tokens)
    ours, baseline = (r["tokens"] / r["seconds"] for r in (batched, single))
    return [{"stage": "01 generate", "metric": f"tokens/s, batch 32 vs 1 ({num_prompts} prompts)",
             "ours": ours, "baseline": baseline, "ratio": ours / baseline,
             "peak_memory_mb": f"{batched['peak_memory_mb']:.0f} vs {single['peak_memory_mb']:.0f}"}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens")
    parser.add_argument("--child", choices=["batched", "single"], help=argparse.SUPPRESS)
    parser.add_argument("--num-prompts", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.num_prompts, args.batch_size, args.max_new_tokens)
    else:
        for row in run(args.quick):
            print(f"{row['stage']}: {row['metric']}: ours {row['ours']:.1f}, baseline {row['baseline']:.1f}, "
                  f"ratio {row['ratio']:.2f}x, peak MB {row['peak_memory_mb']}")
