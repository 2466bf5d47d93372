"""Continuous batching (common.generate_batches, what 01, 02 and 05 run) against the static batches it replaced.

Both engines in one process, on the embedded model in fp32, alternated round after round (A B B A ...), the median
round kept; the answers are compared text for text. The static engine is the loop the project ran before: prompts
longest first, batch_size at a time, a finished row leaves the batch and nothing takes its place, so a batch's last
steps run at a few rows. Shapes (the demo's, and a small one):
  iteration 1    01's greedy answers to 24 alpagasus ids x en, es, de, fr = 96 prompts, 128 new tokens, batch 32
  iteration 2    01's 3 samples each (temperature 0.9) to the same 96 prompts, 128 new tokens, batch 32 (96 rows)
  eval           05's greedy answers to 60 x-alpacaeval ids x 4 languages = 240 prompts, 48 new tokens, batch 16
  small          8 prompts (2 ids x 4 languages), 64 new tokens, batch 32 (one batch: nothing waits)
The forward roofline is the rate of one forward over 8 x 256 tokens (no cache): what a decode could reach if every
step were a long matrix product. Tokens/s counts answer tokens (end-of-turn included).

    python bench/bench_batching.py                    # all shapes, 3 rounds (~20 min on 2 cores)
    python bench/bench_batching.py --shapes small --rounds 2
    python bench/bench_batching.py --shapes small --profile   # where continuous batching's time goes
"""
import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import common  # noqa: E402

SHAPES = {"iteration 1": ("alpagasus", 24, 128, 32, 1), "iteration 2": ("alpagasus", 24, 128, 32, 3),
          "eval": ("x-alpacaeval", 60, 48, 16, 1), "small": ("alpagasus", 2, 64, 32, 1)}


def static_batches(model, tokenizer, prompt_ids, num_samples, temperature, max_new_tokens, batch_size):
    """The engine before continuous batching: [(index, N token lists)], batch_size prompts at a time."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        rows = decode_batch(model, [prompt_ids[i] for i in batch], num_samples, tokenizer.pad_token_id,
                            set(common.end_of_turn_ids(tokenizer)), temperature, 1.1, max_new_tokens)
        yield from zip(batch, rows)


@torch.inference_mode()
def decode_batch(model, prompts, num_samples, pad_id, stops, temperature, repetition_penalty, max_new_tokens):
    """One static batch: prefill left-padded, decode until every row ended; rows that end leave the batch."""
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_id] * (longest - len(ids)) + ids for ids in prompts])
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1)
    output.cache.batch_repeat_interleave(num_samples)
    cache, logits = output.cache, output.logits[:, -1].float().repeat_interleave(num_samples, dim=0)
    seen = torch.zeros(len(prompts), logits.shape[-1], dtype=torch.bool).scatter_(
        1, torch.where(mask.bool(), input_ids, input_ids[:, -1:]), True)
    seen, mask, positions = (t.repeat_interleave(num_samples, dim=0) for t in (seen, mask, positions[:, -1:]))
    owners = [(p, s) for p in range(len(prompts)) for s in range(num_samples)]
    new_tokens = [[[] for _ in range(num_samples)] for _ in prompts]
    for step in range(max_new_tokens):
        scores = torch.where(seen, torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty),
                             logits)
        next_token = (scores.argmax(-1) if temperature <= 0 else
                      torch.multinomial(torch.softmax(scores / temperature, -1), 1).squeeze(-1))
        tokens = next_token.tolist()
        for (p, s), token in zip(owners, tokens):
            new_tokens[p][s].append(token)
        keep = [row for row, token in enumerate(tokens) if token not in stops]
        if not keep or step + 1 == max_new_tokens:
            return new_tokens
        seen[torch.arange(len(tokens)), next_token] = True
        if len(keep) < len(tokens):
            rows = torch.tensor(keep)
            cache.batch_select_indices(rows)
            next_token, seen, mask, positions = (t[rows] for t in (next_token, seen, mask, positions))
            owners = [owners[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones(len(keep), 1)], dim=1)
        positions = positions + 1
        logits = model(input_ids=next_token[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits[:, -1].float()
    return new_tokens


def run_engine(engine, model, tokenizer, ids, num_samples, max_new_tokens, batch_size):
    """(tokens/s, texts in prompt order) for one engine on one shape."""
    temperature = 0.9 if num_samples > 1 else 0.0
    started = time.perf_counter()
    if engine == "static":
        stop_ids = common.end_of_turn_ids(tokenizer)
        done = {index: common.decode_samples(tokenizer, rows, stop_ids) for index, rows in static_batches(
            model, tokenizer, ids, num_samples, temperature, max_new_tokens, batch_size)}
    else:
        done = dict(pair for batch in common.generate_batches(
            model, tokenizer, ids, num_samples, temperature, repetition_penalty=1.1, max_new_tokens=max_new_tokens,
            batch_size=batch_size, show_progress=False) for pair in batch)
    seconds = time.perf_counter() - started
    samples = [done[i] for i in range(len(ids))]
    return sum(s["new_tokens"] for row in samples for s in row) / seconds, [[s["text"] for s in row] for row in samples]


def profile(model, tokenizer, ids, num_samples, max_new_tokens, batch_size, shape):
    """Self CPU time of the continuous engine by kind of work: matrix products, attention, copies and joins of
    the KV cache, sampling and the rest, with the wall time the profiler does not see (Python between ops)."""
    kinds = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear"),
             "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax",
                           "aten::scaled_dot_product_attention"),
             "cache and batch copies": ("aten::cat", "aten::index", "aten::copy_", "aten::constant_pad_nd",
                                        "aten::repeat_interleave", "aten::index_select"),
             "sampling": ("aten::sort", "aten::argmax", "aten::searchsorted", "aten::cumsum", "aten::where")}
    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run_engine("continuous", model, tokenizer, ids, num_samples, max_new_tokens, batch_size)
    wall = (time.perf_counter() - started) * 1e6
    events = profiler.key_averages()
    shares = {kind: sum(e.self_cpu_time_total for e in events if e.key in names) for kind, names in kinds.items()}
    shares["other ops"] = sum(e.self_cpu_time_total for e in events) - sum(shares.values())
    print(f"{shape}: wall {wall / 1e6:.1f} s under the profiler; " + ", ".join(
        f"{kind} {value / wall:.0%}" for kind, value in shares.items()) + " of wall time (self CPU time of the "
        "ops; the rest of the wall time is Python between them)", flush=True)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    print("  top ops: " + ", ".join(f"{e.key} {e.self_cpu_time_total / wall:.0%}" for e in top), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of: " + ", ".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="the continuous engine once per shape, under "
                        "torch.profiler: the share of CPU time per kind of work")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.EMBEDDED_MODEL, dtype=torch.float32, scored=False)
    x = torch.randint(1000, 20000, (8, 256), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        roofline = 0.0
        for _ in range(3):
            started = time.perf_counter()
            model(input_ids=x, use_cache=False)
            roofline = max(roofline, x.numel() / (time.perf_counter() - started))
    print(f"threads {torch.get_num_threads()}; forward roofline (8 x 256, fp32): {roofline:.1f} tokens/s", flush=True)
    for shape in args.shapes.split(","):
        folder, limit, max_new_tokens, batch_size, num_samples = SHAPES[shape]
        prompts = common.load_prompts(os.path.join(REPO, "data", folder), langs=["en", "es", "de", "fr"], limit=limit)
        ids = [common.chat_prompt_ids(tokenizer, p["prompt"]) for p in prompts]
        if args.profile:
            profile(model, tokenizer, ids, num_samples, max_new_tokens, batch_size, shape)
            continue
        rates, texts = {"static": [], "continuous": []}, {}
        for round_ in range(args.rounds):
            for engine in ("static", "continuous") if round_ % 2 == 0 else ("continuous", "static"):
                rate, texts[engine] = run_engine(engine, model, tokenizer, ids, num_samples, max_new_tokens,
                                                 batch_size)
                rates[engine].append(rate)
        static, continuous = statistics.median(rates["static"]), statistics.median(rates["continuous"])
        same = sum(a == b for a, b in zip(texts["static"], texts["continuous"]))
        print(f"{shape}: {len(ids)} prompts x {num_samples} x {max_new_tokens} new tokens, batch {batch_size}: "
              f"static {static:.1f} tokens/s ({static / roofline:.2f} of roofline), continuous {continuous:.1f} "
              f"({continuous / roofline:.2f}), {continuous / static:.2f}x; answers identical {same} of {len(ids)}"
              f"{' (sampled: other random streams)' if num_samples > 1 else ''}; rounds "
              f"{[round(r, 1) for r in rates['static']]} / {[round(r, 1) for r in rates['continuous']]}", flush=True)


if __name__ == "__main__":
    main()
