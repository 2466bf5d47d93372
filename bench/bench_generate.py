"""Benchmark 01's batched generation against a one-prompt-at-a-time loop.

Same model, same prompts, same settings (01's defaults: greedy, repetition penalty 1.1,
256 new tokens), measured in one run. The prompts are what loop.sh's demo gives 01: the first
24 bundled prompts of en, es, de and fr (96 prompts, 32 decoded at once, longest first).
  ours         common.generate_batches at batch 32 (what 01 runs)
  single       model.generate() one prompt at a time: the loop a newcomer writes first
  hf-batch     model.generate() at batch 32, left padded, the same batches: shows what our
               decode loop's dropping finished rows from the batch is worth
Each variant runs in its own subprocess so its peak resident memory (ru_maxrss) is its
own. Tokens/s counts answer tokens only (end-of-turn included; padding and the steps of
rows that already stopped do not count).

    python bench/bench_generate.py                     # 96 prompts, 256 new tokens (~18 min on 2 cores)
    python bench/bench_generate.py --num-prompts 32    # one batch of 32 (~8 min)
    python bench/bench_generate.py --quick             # 8 prompts, 64 new tokens
    python bench/bench_generate.py --sweep             # ours vs generate() at the sizes the demo decodes at
    python bench/bench_generate.py --sweep --sizes 8x64 --rounds 6   # one size, more rounds

--sweep runs, for each size (prompts x new tokens, all prompts in one batch): 8 x 64 (a small --limit),
32 x 128 (01's batch in the demo), 96 x 128 (01's 32 prompts x 3 samples in iteration 2, as 96 rows) and
64 x 64 (05's batch); our loop and generate() in one process, alternated (a warm-up pair first, then
--rounds pairs, the order flipped each round), the fastest of each kept.
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


def library_generate(model, tokenizer, batch, max_new_tokens):
    """model.generate() on left-padded prompts (greedy, repetition penalty 1.1) -> our sample records."""
    import torch

    import common
    stop_ids = common.end_of_turn_ids(tokenizer)
    longest = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(ids)) + ids for ids in batch])
    attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in batch])
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                max_new_tokens=max_new_tokens, repetition_penalty=1.1, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id)
    return [common.decode_samples(tokenizer, [row], stop_ids) for row in output[:, longest:].tolist()]


def measure(variant, num_prompts, batch_size, max_new_tokens):
    """Run in a child process: generate, print one JSON line with tokens, seconds, peak memory."""
    import torch

    import common
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.EMBEDDED_MODEL)
    languages = ["en", "es", "de", "fr"]
    if num_prompts == 96:  # the demo's input to 01
        prompts = common.load_prompts(os.path.join(REPO, "data", "prompts"), langs=languages, limit=24)
    else:  # spread over all bundled prompts of the four languages
        prompts = common.load_prompts(os.path.join(REPO, "data", "prompts"), langs=languages)
        prompts = prompts[::max(1, len(prompts) // num_prompts)][:num_prompts]
    prompt_ids = [common.chat_prompt_ids(tokenizer, p["prompt"]) for p in prompts]
    settings = dict(max_new_tokens=max_new_tokens, repetition_penalty=1.1, show_progress=False)

    def hf_generate(batch):
        return library_generate(model, tokenizer, batch, max_new_tokens)
    start = time.perf_counter()
    if variant == "ours":
        outputs = [s for batch in common.generate_batches(model, tokenizer, prompt_ids, batch_size=batch_size,
                                                          **settings) for _, s in batch]
    elif variant == "hf-batch":  # the same batches as ours: longest first
        by_length = sorted(prompt_ids, key=len, reverse=True)
        outputs = [s for first in range(0, len(by_length), batch_size)
                   for s in hf_generate(by_length[first:first + batch_size])]
    else:
        outputs = [s for ids in prompt_ids for s in hf_generate([ids])]
    seconds = time.perf_counter() - start
    tokens = sum(sample["new_tokens"] for samples in outputs for sample in samples)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": tokens, "seconds": seconds, "peak_memory_mb": peak_mb}))


def sweep(sizes, rounds):
    """Ours vs generate() at each (prompts, new tokens), all prompts one batch; alternated in one process."""
    import common
    model, tokenizer = common.load_model(common.EMBEDDED_MODEL)
    prompts = common.load_prompts(os.path.join(REPO, "data", "prompts"), langs=["en", "es", "de", "fr"])
    rows = []
    for num_prompts, max_new_tokens in sizes:
        picked = (prompts * 2)[::max(1, len(prompts) // num_prompts)][:num_prompts]
        ids = sorted([common.chat_prompt_ids(tokenizer, p["prompt"]) for p in picked], key=len, reverse=True)

        def ours():
            return [sample["text"] for batch in common.generate_batches(
                model, tokenizer, ids, batch_size=len(ids), max_new_tokens=max_new_tokens, repetition_penalty=1.1,
                show_progress=False) for _, samples in batch for sample in samples]

        def library():
            return [samples[0]["text"] for samples in library_generate(model, tokenizer, ids, max_new_tokens)]
        best, texts = {"ours": float("inf"), "generate()": float("inf")}, {}
        for round_ in range(rounds + 1):  # round 0 warms both up and is not counted
            order = [("ours", ours), ("generate()", library)]
            for name, function in order if round_ % 2 else order[::-1]:
                start = time.perf_counter()
                texts[name] = function()
                if round_:
                    best[name] = min(best[name], time.perf_counter() - start)
        same = sum(a == b for a, b in zip(texts["ours"], texts["generate()"]))
        rows.append({"stage": "01 generate", "metric": f"seconds, {num_prompts} prompts x {max_new_tokens} new "
                     f"tokens in one batch: generate() / ours ({same} of {num_prompts} answers identical)",
                     "ours": best["ours"], "baseline": best["generate()"],
                     "ratio": best["generate()"] / best["ours"], "peak_memory_mb": "-"})
    return rows


def run_variant(variant, num_prompts, batch_size, max_new_tokens):
    command = [sys.executable, __file__, "--child", variant, "--num-prompts", str(num_prompts),
               "--batch-size", str(batch_size), "--max-new-tokens", str(max_new_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(quick=False, num_prompts=96):
    """The three variants, one after the other; returns the table rows."""
    num_prompts, max_new_tokens = (8, 64) if quick else (num_prompts, 256)
    results = {variant: run_variant(variant, num_prompts, 32, max_new_tokens)
               for variant in ("ours", "single", "hf-batch")}
    rate = {variant: r["tokens"] / r["seconds"] for variant, r in results.items()}
    memory = {variant: f"{r['peak_memory_mb']:.0f}" for variant, r in results.items()}
    return [{"stage": "01 generate", "metric": f"tokens/s, ours at batch 32 vs generate() one at a time "
             f"({num_prompts} prompts, {max_new_tokens} new)", "ours": rate["ours"], "baseline": rate["single"],
             "ratio": rate["ours"] / rate["single"], "peak_memory_mb": f"{memory['ours']} vs {memory['single']}"},
            {"stage": "01 generate", "metric": "tokens/s, ours at batch 32 vs generate() at batch 32",
             "ours": rate["ours"], "baseline": rate["hf-batch"], "ratio": rate["ours"] / rate["hf-batch"],
             "peak_memory_mb": f"{memory['ours']} vs {memory['hf-batch']}"}]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens")
    parser.add_argument("--sweep", action="store_true", help="ours vs generate() at the demo's decode sizes")
    parser.add_argument("--rounds", type=int, default=2, help="--sweep: alternated pairs per size")
    parser.add_argument("--sizes", default="8x64,32x128,96x128,64x64", help="--sweep: PROMPTSxTOKENS,...")
    parser.add_argument("--child", choices=["ours", "single", "hf-batch"], help=argparse.SUPPRESS)
    parser.add_argument("--num-prompts", type=int, default=96,
                        help="96: the demo's prompts (24 per language); other counts: spread over all bundled prompts")
    parser.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child, args.num_prompts, args.batch_size, args.max_new_tokens)
    else:
        sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]
        for row in sweep(sizes, args.rounds) if args.sweep else run(args.quick, args.num_prompts):
            print(f"{row['stage']}: {row['metric']}: ours {row['ours']:.1f}, baseline {row['baseline']:.1f}, "
                  f"ratio {row['ratio']:.2f}x, peak MB {row['peak_memory_mb']}")
