"""Benchmark 02's translation batching: requests sorted by their own length cap vs one shared cap.

Every translation request has its own cap on new tokens (about 2x its source, more for
languages the tokenizer spends more tokens on). 02 sorts requests by cap and gives each
batch the cap of its longest row. The baseline is what plain batched generation does:
the same batches in prompt order, with one cap, the largest, for everyone. A row that never
stops (a model that loops, or never closes the <translated> tag) then runs to the largest cap
however short its source was. Same model, same texts, greedy, batch 16; each variant in its
own subprocess so its peak resident memory is its own.

    python bench/bench_translate.py            # 48 texts, mixed directions
    python bench/bench_translate.py --quick    # 16 texts
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def load_translate():
    spec = importlib.util.spec_from_file_location("translate", os.path.join(REPO, "02_translate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(variant, num_texts, batch_size):
    """Run in a child process: translate, print one JSON line with texts, tokens, seconds, peak memory."""
    import torch
    from tqdm import tqdm

    import common
    translate = load_translate()
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.EMBEDDED_MODEL)
    prompts = common.load_prompts(os.path.join(REPO, "data", "prompts"), langs=["en", "es", "ru", "zh"])
    ratios = translate.token_ratios(prompts, tokenizer)
    # Mixed directions, as in a real run: English into es/ru/zh, and es/ru/zh into English.
    english = [p for p in prompts if p["lang"] == "en"]
    others = [p for p in prompts if p["lang"] != "en"]
    jobs = [(p["prompt"], "en", target) for p, target in zip(english, ["es", "ru", "zh"] * len(english))]
    jobs = [job for pair in zip(jobs, [(p["prompt"], p["lang"], "en") for p in others]) for job in pair][:num_texts]
    requests = []
    for text, source, target in jobs:
        ids = common.chat_prompt_text(tokenizer, translate.translation_request(text, target),
                                      assistant_prefix=translate.OPEN_TAG)
        cap = translate.max_new_tokens(len(tokenizer(text, add_special_tokens=False).input_ids),
                                       ratios.get((source, target), 1.0))
        requests.append((ids, cap))
    sampling = dict(temperature=0.0, top_p=1.0, repetition_penalty=1.0)
    start = time.perf_counter()
    if variant == "ours":
        progress = tqdm(disable=True)
        results = translate.generate_translations(model, tokenizer, requests, batch_size, sampling, progress)
    else:  # one cap for all, batches as they come
        largest = max(cap for _, cap in requests)
        results = [None] * len(requests)
        for batch in common.generate(model, tokenizer, [ids for ids, _ in requests], max_new_tokens=largest,
                                             batch_size=batch_size, show_progress=False, **sampling):
            for index, samples in batch:
                results[index] = samples[0]
    seconds = time.perf_counter() - start
    translated = sum(translate.extract_translation(sample["text"])[0] is not None for sample in results)
    print(json.dumps({"texts": len(results), "closed_tag": translated, "tokens": sum(s["new_tokens"] for s in results),
                      "seconds": seconds, "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_variant(variant, num_texts, batch_size, threads=None):
    command = [sys.executable, __file__, "--child", variant, "--num-texts", str(num_texts),
               "--batch-size", str(batch_size)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"# {variant}: {row}", file=sys.stderr)
    return row


def run(quick=False, threads=None):
    """Both variants, one after the other; returns the table rows."""
    num_texts, batch_size = (16, 8) if quick else (48, 16)
    ours = run_variant("ours", num_texts, batch_size, threads)
    shared = run_variant("shared-cap", num_texts, batch_size, threads)
    ours_rate, shared_rate = (r["texts"] / r["seconds"] for r in (ours, shared))
    metric = (f"texts/s, cap-sorted vs one shared cap ({num_texts} texts, batch {batch_size}; "
              f"closed tag {ours['closed_tag']} vs {shared['closed_tag']})")
    return [{"stage": "02 translate", "metric": metric,
             "ours": ours_rate, "baseline": shared_rate, "ratio": ours_rate / shared_rate,
             "peak_memory_mb": f"{ours['peak_memory_mb']:.0f} vs {shared['peak_memory_mb']:.0f}"}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 texts, batch 8")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per variant (OMP_NUM_THREADS); 1 on a machine shared with other jobs")
    parser.add_argument("--child", choices=["ours", "shared-cap"], help=argparse.SUPPRESS)
    parser.add_argument("--num-texts", type=int, default=48, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.num_texts, args.batch_size)
    else:
        command = "python bench/bench_translate.py" + (" --quick" if args.quick else "") + (
            f" --threads {args.threads}" if args.threads else "")
        print(f"# {command}")
        print(f"{'stage':<14}{'metric':<80}{'ours':>8}{'baseline':>10}{'ratio':>8}  peak MB (ours vs baseline)")
        for row in run(args.quick, args.threads):
            print(f"{row['stage']:<14}{row['metric']:<80}{row['ours']:>8.2f}{row['baseline']:>10.2f}"
                  f"{row['ratio']:>7.2f}x  {row['peak_memory_mb']}")
