"""The CPU demo's levers, each measured alone against the path it would replace, alternated in one run.

  decode precision  our decode loop (01's: greedy, repetition penalty 1.1, batch 32, longest first) on the demo's
                    01 input (the first 24 alpagasus prompts of en, es, de, fr), fp32 weights vs bf16 weights;
                    and how many answers come out identical, and in the same language (py3langid)
  decode cache      the same loop in fp32 (common.generate_batches: continuous batching, its own cache written in
                    place) vs static batches on transformers' preallocated StaticCache, finished rows dropped with
                    reorder_cache (the lever tried before common's engine had a cache of its own)
  decode batch      bf16 weights, 32 vs 64 rows decoded at once
  forward roofline  one forward over 8 x 256 tokens in fp32 and in bf16: what a decode rate is measured against
  04 step           04_dpo.py on 32 made-up pairs (4 a step, plain DPO), LOOP_BF16=0 vs LOOP_BF16=1: training
                    tokens/s, and step 1's loss minus ln 2 (the policy is its own reference there)
  --compile         bf16 weights, eager vs the model's forward under torch.compile(dynamic=True), 32 prompts x 64
                    tokens, the compile's own time reported (alone: ~7 min on 2 cores)
  --fp32            what bounds the fp32 decode: GFLOP/s of fp32 and bf16 matrix products at 8 to 512 rows (the
                    decode multiplies 32-96 rows by each weight matrix), and fp32 decode at batch 32 vs 96
Each pair runs A, B, A, B; a rate is the better of its two rounds. The thread count torch uses is printed first.

    python bench/bench_cpu.py            # the demo's sizes (~15 min on 2 cores)
    python bench/bench_cpu.py --quick    # 32 prompts, 48 new tokens, 8 pairs
    python bench/bench_cpu.py --compile  # the torch.compile row only
    python bench/bench_cpu.py --fp32     # what bounds the fp32 decode: matrix products by rows; batch 32 vs 96
"""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import common  # noqa: E402


@torch.inference_mode()
def static_cache_decode(model, prompts, pad_id, stop_ids, max_new_tokens, repetition_penalty):
    """A static batch's greedy decode on transformers' preallocated StaticCache: the comparison only."""
    from transformers import StaticCache
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_id] * (longest - len(ids)) + ids for ids in prompts])
    mask = torch.zeros(len(prompts), longest + max_new_tokens, dtype=torch.long)  # future columns filled in
    for row, ids in enumerate(prompts):
        mask[row, longest - len(ids):longest] = 1
    positions = (mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=longest + max_new_tokens)
    logits = model(input_ids=input_ids, attention_mask=mask[:, :longest], position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1].float()
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, input_ids, True)
    positions, owners, new_tokens = positions[:, -1:], list(range(len(prompts))), [[] for _ in prompts]
    for step in range(max_new_tokens):
        scores = torch.where(seen, torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty),
                             logits)
        next_token = scores.argmax(-1)
        tokens = next_token.tolist()
        for owner, token in zip(owners, tokens):
            new_tokens[owner].append(token)
        keep = [row for row, token in enumerate(tokens) if token not in stop_ids]
        if not keep or step + 1 == max_new_tokens:
            break
        seen[torch.arange(len(tokens)), next_token] = True
        if len(keep) < len(tokens):
            rows = torch.tensor(keep)
            cache.reorder_cache(rows)
            next_token, seen, mask, positions = next_token[rows], seen[rows], mask[rows], positions[rows]
            owners = [owners[row] for row in keep]
        mask[:, longest + step] = 1
        positions = positions + 1
        logits = model(input_ids=next_token[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits[:, -1].float()
    return new_tokens


def decode_rows(quick):
    """Rows for the decode levers: rate, ratio and agreement, each pair alternated."""
    model, tokenizer = common.load_model(common.EMBEDDED_MODEL, dtype=torch.float32, scored=False)
    model_bf16 = common.load_model(common.EMBEDDED_MODEL, dtype=torch.bfloat16, scored=False)[0]
    prompts = common.load_prompts(os.path.join(REPO, "data", "alpagasus"), langs=["en", "es", "de", "fr"],
                                  limit=8 if quick else 24)
    ids = [common.chat_prompt_ids(tokenizer, p["prompt"]) for p in prompts]
    max_new_tokens, stop_ids = (48 if quick else 128), common.end_of_turn_ids(tokenizer)

    def ours(model, batch_size):
        samples = [None] * len(ids)
        for batch in common.generate_batches(model, tokenizer, ids, max_new_tokens=max_new_tokens,
                                             repetition_penalty=1.1, batch_size=batch_size, show_progress=False):
            for index, (sample,) in batch:
                samples[index] = sample
        return samples

    def static(model, batch_size):
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        samples = [None] * len(ids)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            rows = static_cache_decode(model, [ids[i] for i in batch], tokenizer.pad_token_id, set(stop_ids),
                                       max_new_tokens, 1.1)
            for index, tokens in zip(batch, rows):
                samples[index] = common.decode_samples(tokenizer, [tokens], stop_ids)[0]
        return samples

    def timed(run, *arguments):
        started = time.perf_counter()
        samples = run(*arguments)
        return sum(s["new_tokens"] for s in samples) / (time.perf_counter() - started), samples

    pairs = {"decode precision": (("fp32", ours, model, 32), ("bf16", ours, model_bf16, 32)),
             "decode cache": (("growing cache", ours, model, 32), ("static cache", static, model, 32)),
             "decode batch": (("bf16 batch 32", ours, model_bf16, 32), ("bf16 batch 64", ours, model_bf16, 64))}
    rows, answers = [], {}
    for lever, variants in pairs.items():
        rates = {name: 0.0 for name, *_ in variants}
        for _ in range(2):  # A, B, A, B
            for name, run, variant_model, batch_size in variants:
                rate, answers[name] = timed(run, variant_model, batch_size)
                rates[name] = max(rates[name], rate)
        (base, *_), (new, *_) = variants
        rows.append({"lever": lever, "metric": f"answer tokens/s, {len(ids)} prompts x {max_new_tokens} new tokens",
                     "before": f"{base} {rates[base]:.1f}", "after": f"{new} {rates[new]:.1f}",
                     "ratio": rates[new] / rates[base]})
        print(rows[-1], flush=True)
    same = [a["text"] == b["text"] for a, b in zip(answers["fp32"], answers["bf16"])]
    language = [common.detect_language(a["text"]) == common.detect_language(b["text"])
                for a, b in zip(answers["fp32"], answers["bf16"])]
    static_same = sum(a["text"] == b["text"] for a, b in zip(answers["growing cache"], answers["static cache"]))
    rows.append({"lever": "decode precision", "metric": "bf16 answers identical to fp32's / in the same language",
                 "before": "", "after": f"{sum(same)} / {sum(language)} of {len(same)}", "ratio": ""})
    rows.append({"lever": "decode cache", "metric": "static-cache answers identical to the growing cache's",
                 "before": "", "after": f"{static_same} of {len(ids)}", "ratio": ""})
    x = torch.randint(1000, 20000, (8, 256), generator=torch.Generator().manual_seed(0))
    forward = {}
    with torch.inference_mode():
        for _ in range(2):
            for name, variant in (("fp32", model), ("bf16", model_bf16)):
                started = time.perf_counter()
                variant(input_ids=x, use_cache=False)
                forward[name] = max(forward.get(name, 0.0), x.numel() / (time.perf_counter() - started))
    rows.append({"lever": "forward roofline", "metric": "tokens/s of one forward, 8 x 256", "before":
                 f"fp32 {forward['fp32']:.0f}", "after": f"bf16 {forward['bf16']:.0f}",
                 "ratio": forward["bf16"] / forward["fp32"]})
    best = {name: max(float(r[key].split()[-1]) for r in rows[:3] for key in ("before", "after")
                      if r[key].startswith(name)) for name in ("fp32", "bf16")}
    rows.append({"lever": "decode / roofline", "metric": "decode tokens/s at batch 32 / forward tokens/s of fp32",
                 "before": f"fp32 {best['fp32'] / forward['fp32']:.0%}", "after":
                 f"bf16 {best['bf16'] / forward['fp32']:.0%} ({best['bf16'] / forward['bf16']:.0%} of bf16's)",
                 "ratio": ""})
    return rows


def fp32_rows():
    """What bounds the fp32 decode: matrix products at decode's row counts, and a larger decode batch."""
    rows, generator = [], torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):  # 60 of SmolLM2-135M's 576 x 1536 MLP matrices: past the caches
        weights = [torch.randn(576, 1536, generator=generator).to(dtype) for _ in range(60)]
        for count in (8, 32, 64, 128, 512):
            x = torch.randn(count, 576, generator=generator).to(dtype)
            best = math.inf
            for _ in range(3):
                started = time.perf_counter()
                for weight in weights:
                    x @ weight
                best = min(best, time.perf_counter() - started)
            rows.append({"lever": "matrix product", "metric": f"{str(dtype)[6:]} GFLOP/s, {count} rows x 576 x 1536",
                         "before": "", "after": f"{2 * count * 576 * 1536 * len(weights) / best / 1e9:.1f}",
                         "ratio": ""})
            print(rows[-1], flush=True)
    model, tokenizer = common.load_model(common.EMBEDDED_MODEL, dtype=torch.float32, scored=False)
    prompts = common.load_prompts(os.path.join(REPO, "data", "alpagasus"), langs=["en", "es", "de", "fr"], limit=24)
    ids = [common.chat_prompt_ids(tokenizer, p["prompt"]) for p in prompts]
    rates, texts = {32: 0.0, 96: 0.0}, {}
    for _ in range(2):  # A, B, A, B
        for batch_size in rates:
            started, samples = time.perf_counter(), {}
            for batch in common.generate_batches(model, tokenizer, ids, max_new_tokens=64, repetition_penalty=1.1,
                                                 batch_size=batch_size, show_progress=False):
                samples.update((index, sample) for index, (sample,) in batch)
            seconds = time.perf_counter() - started
            rates[batch_size] = max(rates[batch_size], sum(s["new_tokens"] for s in samples.values()) / seconds)
            texts[batch_size] = [samples[i]["text"] for i in range(len(ids))]
    same = sum(a == b for a, b in zip(texts[32], texts[96]))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in common.generate_batches(model, tokenizer, ids[:32], max_new_tokens=32, repetition_penalty=1.1,
                                         batch_size=32, show_progress=False):
            pass
    events = profile.key_averages()
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    rows.append({"lever": "decode profile", "metric": "fp32 decode of 32 rows: share of CPU time in matrix "
                 "products (torch.profiler, self time)", "before": "", "after":
                 f"{matmul / sum(e.self_cpu_time_total for e in events):.0%}", "ratio": ""})
    return rows + [{"lever": "decode batch", "metric": f"fp32 answer tokens/s, {len(ids)} prompts x 64 new tokens "
                    f"(answers identical: {same} of {len(ids)})", "before": f"batch 32 {rates[32]:.1f}",
                    "after": f"batch 96 {rates[96]:.1f}", "ratio": rates[96] / rates[32]}]


def compile_rows():
    """bf16 decode, eager vs torch.compile of the forward; the first compiled run includes the compile."""
    eager, tokenizer = common.load_model(common.EMBEDDED_MODEL, dtype=torch.bfloat16, scored=False)
    compiled = common.load_model(common.EMBEDDED_MODEL, dtype=torch.bfloat16, scored=False)[0]
    compiled.forward = torch.compile(compiled.forward, dynamic=True)
    prompts = common.load_prompts(os.path.join(REPO, "data", "alpagasus"), langs=["en", "es", "de", "fr"], limit=8)
    ids = [common.chat_prompt_ids(tokenizer, p["prompt"]) for p in prompts]

    def rate(model):
        started, tokens = time.perf_counter(), 0
        for batch in common.generate_batches(model, tokenizer, ids, max_new_tokens=64, repetition_penalty=1.1,
                                             batch_size=32, show_progress=False):
            tokens += sum(sample["new_tokens"] for _, (sample,) in batch)
        return tokens / (time.perf_counter() - started), time.perf_counter() - started

    _, first_seconds = rate(compiled)
    rates = {"eager": 0.0, "compiled": 0.0}
    for _ in range(2):
        for name, model in (("eager", eager), ("compiled", compiled)):
            rates[name] = max(rates[name], rate(model)[0])
    return [{"lever": "torch.compile", "metric": "bf16 answer tokens/s, 32 prompts x 64 new tokens",
             "before": f"eager {rates['eager']:.1f}", "after": f"compiled {rates['compiled']:.1f} (first run, "
             f"with the compile: {first_seconds:.0f} s)", "ratio": rates["compiled"] / rates["eager"]}]


def dpo_rows(quick):
    """04_dpo.py itself, LOOP_BF16=0 vs 1, alternated: tokens/s and step 1's loss - ln 2."""
    spec = importlib.util.spec_from_file_location("bench_dpo", os.path.join(REPO, "bench", "bench_dpo.py"))
    bench_dpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_dpo)
    rates, first_losses = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        pairs = os.path.join(scratch, "pairs.jsonl")
        bench_dpo.write_pairs(pairs, 8 if quick else 32)
        for round_ in range(2):
            for name, flag in (("fp32", "0"), ("bf16 autocast", "1")):
                output = os.path.join(scratch, f"{flag}-{round_}")
                subprocess.run([sys.executable, os.path.join(REPO, "04_dpo.py"), "--input", pairs, "--output",
                                output, "--batch-size", "4", "--grad-accum", "1", "--eval-frac", "0",
                                "--save-every", "0", "--lr", "3e-5", "--nll-weight", "0"], check=True, cwd=REPO,
                               env=dict(os.environ, LOOP_BF16=flag), capture_output=True)
                summary = common.read_json(os.path.join(output, "train_summary.json"))
                rates[name] = max(rates.get(name, 0.0), summary["tokens_per_second"])
                first = next(r for _, r in common.read_jsonl(os.path.join(output, "metrics.jsonl")))
                first_losses[name] = first["loss"] - math.log(2)
    return [{"lever": "04 precision", "metric": f"training tokens/s, {8 if quick else 32} pairs, 4 a step",
             "before": f"fp32 {rates['fp32']:.1f}", "after": f"bf16 autocast {rates['bf16 autocast']:.1f}",
             "ratio": rates["bf16 autocast"] / rates["fp32"]},
            {"lever": "04 precision", "metric": "step 1 loss - ln 2", "before": f"fp32 {first_losses['fp32']:.1e}",
             "after": f"bf16 autocast {first_losses['bf16 autocast']:.1e}", "ratio": ""}]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a first look")
    parser.add_argument("--compile", action="store_true", help="only the torch.compile row")
    parser.add_argument("--fp32", action="store_true", help="only the fp32 rows: matrix products by row count, "
                        "and the fp32 decode at batch 32 vs 96 (~3 min)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    flags = open("/proc/cpuinfo").read().split() if os.path.isfile("/proc/cpuinfo") else []
    print(f"torch {torch.__version__}: {torch.get_num_threads()} threads on {os.cpu_count()} cores; "
          f"bf16 in hardware: {'avx512_bf16' in flags or 'amx_bf16' in flags}", flush=True)
    rows = compile_rows() if args.compile else fp32_rows() if args.fp32 else \
        decode_rows(args.quick) + dpo_rows(args.quick)
    print("\n| lever | metric | before | after | after / before |\n|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] != "" else ""
        print(f"| {row['lever']} | {row['metric']} | {row['before']} | {row['after']} | {ratio} |")
    if args.json:
        common.write_json(args.json, rows)


if __name__ == "__main__":
    main()
