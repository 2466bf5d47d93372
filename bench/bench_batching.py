"""common.generate_batches (continuous batching, a KV cache written in place) against the engine it replaced.

The engine before (`static` below, kept here only to compare): prompts longest first, batch_size at a time, left-
padded; a finished row leaves its batch and nothing takes its place, and transformers' DynamicCache grows by
copying itself whole at every step. common's engine now (`continuous`): a finished row's place goes to the next
prompt at once, and each row's keys and values are written in place, at the row's own length (common.RowCache).
Both run in one process on the embedded model in fp32, alternated round after round (A B B A ...), the median
round kept; the answers are compared text for text (sampled rows draw from the same per-row generators in both).
Shapes (the demo's, and a small one):
  iteration 1    01's greedy answers to 24 alpagasus ids x en, es, de, fr = 96 prompts, 128 new tokens, batch 32
  iteration 2    01's 3 samples each (temperature 0.9) to the same 96 prompts, 128 new tokens, batch 32 (96 rows)
  eval           05's greedy answers to 60 x-alpacaeval ids x 4 languages = 240 prompts, 48 new tokens, batch 16
  small          8 prompts (2 ids x 4 languages), 64 new tokens, batch 32 (one batch: nothing waits)
The forward roofline is the rate of one forward over 8 x 256 tokens (no cache): what a decode could reach if every
step were a long matrix product. Tokens/s counts answer tokens (end-of-turn included). --steps times single decode
steps instead (rows x cached columns, both caches), and the output layer's matrix product alone: where a step's
time goes as the batch grows.

    python bench/bench_batching.py                    # all shapes, 3 rounds (~25 min on 2 cores)
    python bench/bench_batching.py --shapes small --rounds 2
    python bench/bench_batching.py --steps            # one decode step at 8 to 96 rows
    python bench/bench_batching.py --shapes small --profile   # CPU time per kind of work, each engine
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


@torch.inference_mode()
def static_batch(model, prompts, num_samples, pad_id, stop_ids, temperature, top_p, repetition_penalty,
                 max_new_tokens, seeds):
    """The engine before, for one batch: N samples of each prompt, left-padded; rows that end leave the batch
    (and the cache); transformers' DynamicCache. Returns, per prompt, N lists of new token ids."""
    device = next(model.parameters()).device
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[pad_id] * (longest - len(ids)) + ids for ids in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1)
    cache = output.cache
    cache.batch_repeat_interleave(num_samples)
    logits = output.logits[:, -1].float().repeat_interleave(num_samples, dim=0)
    seen = torch.zeros(len(prompts), logits.shape[-1], dtype=torch.bool, device=device).scatter_(
        1, torch.where(mask.bool(), input_ids, input_ids[:, -1:]), True)
    seen, mask, positions = (t.repeat_interleave(num_samples, dim=0) for t in (seen, mask, positions[:, -1:]))
    owners = [(prompt, sample) for prompt in range(len(prompts)) for sample in range(num_samples)]
    generators = [torch.Generator().manual_seed(seeds[p] + s) for p, s in owners] if temperature > 0 else []
    new_tokens = [[[] for _ in range(num_samples)] for _ in prompts]
    for step in range(max(max_new_tokens)):
        scores = logits
        if repetition_penalty != 1.0:
            scores = torch.where(seen, torch.where(scores < 0, scores * repetition_penalty,
                                                   scores / repetition_penalty), scores)
        uniforms = torch.cat([torch.rand(1, generator=g) for g in generators]) if generators else None
        next_token = common.sample_next(scores, temperature, top_p, uniforms)
        tokens = next_token.tolist()
        for (prompt, sample), token in zip(owners, tokens):
            new_tokens[prompt][sample].append(token)
        keep = [row for row, ((prompt, _), token) in enumerate(zip(owners, tokens))
                if token not in stop_ids and step + 1 < max_new_tokens[prompt]]
        if not keep:
            break
        seen[torch.arange(len(tokens), device=device), next_token] = True
        if len(keep) < len(tokens):
            rows = torch.tensor(keep, device=device)
            cache.batch_select_indices(rows)
            next_token, seen, mask, positions = (t[rows] for t in (next_token, seen, mask, positions))
            owners, generators = [owners[r] for r in keep], [generators[r] for r in keep] if generators else []
        mask = torch.cat([mask, mask.new_ones(len(keep), 1)], dim=1)
        positions = positions + 1
        logits = model(input_ids=next_token[:, None], attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True).logits[:, -1].float()
    return new_tokens


def forward_times(model):
    """{"prefill" | "decode step": [forwards, seconds, rows]}, filled by hooks on the model's forward until
    the returned remove() is called."""
    times, started = {"prefill": [0, 0.0, 0], "decode step": [0, 0.0, 0]}, []

    def after(module, args, kwargs, output):
        kind = times["prefill" if kwargs["input_ids"].shape[1] > 1 else "decode step"]
        kind[0] += 1
        kind[1] += time.perf_counter() - started.pop()
        kind[2] += kwargs["input_ids"].shape[0]
    hooks = [model.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()), with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    return times, lambda: [hook.remove() for hook in hooks]


def run_engine(engine, model, tokenizer, ids, num_samples, max_new_tokens, batch_size, forwards=None):
    """(tokens/s, texts in prompt order) for one engine on one shape; `forwards` (a dict) gets the engine's
    forward_times."""
    settings = dict(temperature=0.9 if num_samples > 1 else 0.0, top_p=1.0, repetition_penalty=1.1)
    times, remove = forward_times(model)
    started = time.perf_counter()
    if engine == "continuous":
        done = dict(pair for batch in common.generate_batches(
            model, tokenizer, ids, num_samples, **settings, max_new_tokens=max_new_tokens, batch_size=batch_size,
            show_progress=False) for pair in batch)
    else:
        stop_ids, done = common.end_of_turn_ids(tokenizer), {}
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            seeds = [int(common.content_key(0, ids[i]), 16) % 2 ** 62 for i in batch]  # as generate_batches's
            rows = static_batch(model, [ids[i] for i in batch], num_samples, tokenizer.pad_token_id, stop_ids,
                                max_new_tokens=[max_new_tokens] * len(batch), seeds=seeds, **settings)
            done.update((i, common.decode_samples(tokenizer, row, stop_ids)) for i, row in zip(batch, rows))
    seconds = time.perf_counter() - started
    remove()
    if forwards is not None:
        forwards[engine] = times
    samples = [done[i] for i in range(len(ids))]
    return sum(s["new_tokens"] for row in samples for s in row) / seconds, [[s["text"] for s in row] for row in samples]


def profile(model, tokenizer, ids, num_samples, max_new_tokens, batch_size, shape):
    """Self CPU time of each engine by kind of work: matrix products, attention, copies of the KV cache,
    sampling and the rest, beside the wall time (the rest of it is Python between the ops)."""
    kinds = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm"),
             "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax"),
             "cache and batch copies": ("aten::cat", "aten::index", "aten::copy_", "aten::index_put_",
                                        "aten::_index_put_impl_", "aten::repeat_interleave", "aten::index_select"),
             "sampling": ("aten::sort", "aten::argmax", "aten::searchsorted", "aten::cumsum", "aten::where")}
    for engine in ("static", "continuous"):
        started = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            run_engine(engine, model, tokenizer, ids, num_samples, max_new_tokens, batch_size)
        wall = (time.perf_counter() - started) * 1e6
        events = profiler.key_averages()
        shares = {kind: sum(e.self_cpu_time_total for e in events if e.key in names) for kind, names in kinds.items()}
        shares["other ops"] = sum(e.self_cpu_time_total for e in events) - sum(shares.values())
        print(f"{shape}, {engine}: wall {wall / 1e6:.1f} s under the profiler; " + ", ".join(
            f"{kind} {value / 1e6:.1f} s" for kind, value in shares.items()) + " (self CPU time of the ops; the "
            "rest of the wall time is Python between them)", flush=True)


def median_ms(work, repeats=7):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


@torch.inference_mode()
def steps(model, columns=200):
    """One decode step at 8 to 96 rows over `columns` cached tokens, through each cache, alternated; and the
    output layer's matrix product alone at those rows."""
    hidden, vocab = model.config.hidden_size, model.get_output_embeddings().weight.shape[0]
    for rows in (8, 16, 32, 64, 96):
        ids = torch.randint(1000, 20000, (rows, columns), generator=torch.Generator().manual_seed(rows))
        grown = model(input_ids=ids, use_cache=True, logits_to_keep=1).cache  # the static engine's cache
        in_place = common.RowCache(rows, columns + 1)
        every_token = (torch.arange(rows).repeat_interleave(columns), torch.arange(columns).repeat(rows),
                       torch.arange(rows * columns))
        common.cached_forward(model, in_place, ids, torch.arange(columns).expand(rows, -1),
                              torch.ones(rows, columns, columns, dtype=torch.bool).tril(), every_token)
        token, position = ids[:, -1:], torch.full((rows, 1), columns)

        def static_step():  # a step copies the cache into one a column wider; crop(-1) takes the view back
            model(input_ids=token, attention_mask=torch.ones(rows, columns + 1, dtype=torch.long),
                  position_ids=position, cache=grown, use_cache=True)
            grown.crop(-1)

        def in_place_step():  # writes column `columns` of each row, the same one each time
            common.cached_forward(model, in_place, token, position, torch.ones(rows, 1, columns + 1, dtype=torch.bool),
                                  (torch.arange(rows), position[:, 0], torch.arange(rows)), columns + 1)
        times = {"static": [], "in place": []}
        for round_ in range(2):
            for name, work in (("static", static_step), ("in place", in_place_step))[::1 if round_ == 0 else -1]:
                times[name].append(median_ms(work))
        states, weight = torch.randn(rows, hidden), model.get_output_embeddings().weight
        output_layer = median_ms(lambda: torch.nn.functional.linear(states, weight))
        static, in_place_ms = min(times["static"]), min(times["in place"])
        print(f"{rows} rows x {columns} columns: a step {static:.0f} ms with the growing cache, {in_place_ms:.0f} ms "
              f"in place ({rows / in_place_ms * 1000:.0f} tokens/s); the output layer alone {output_layer:.1f} ms "
              f"({2 * rows * hidden * vocab / output_layer / 1e6:.0f} GFLOP/s)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of: " + ", ".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="each engine once per shape, under "
                        "torch.profiler: CPU time per kind of work")
    parser.add_argument("--steps", action="store_true", help="single decode steps at 8 to 96 rows instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = common.load_model(common.EMBEDDED_MODEL, dtype=torch.float32, scored=False)
    x = torch.randint(1000, 20000, (8, 256), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        roofline = x.numel() / median_ms(lambda: model(input_ids=x, use_cache=False), 3) * 1000
    print(f"threads {torch.get_num_threads()}; forward roofline (8 x 256, fp32): {roofline:.1f} tokens/s", flush=True)
    if args.steps:
        return steps(model)
    for shape in args.shapes.split(","):
        folder, limit, max_new_tokens, batch_size, num_samples = SHAPES[shape]
        prompts = common.load_prompts(os.path.join(REPO, "data", folder), langs=["en", "es", "de", "fr"], limit=limit)
        ids = [common.chat_prompt_ids(tokenizer, p["prompt"]) for p in prompts]
        if args.profile:
            profile(model, tokenizer, ids, num_samples, max_new_tokens, batch_size, shape)
            continue
        rates, texts, forwards = {"static": [], "continuous": []}, {}, {}
        for round_ in range(args.rounds):
            for engine in ("static", "continuous") if round_ % 2 == 0 else ("continuous", "static"):
                rate, texts[engine] = run_engine(engine, model, tokenizer, ids, num_samples, max_new_tokens,
                                                 batch_size, forwards)
                rates[engine].append(rate)
        static, continuous = statistics.median(rates["static"]), statistics.median(rates["continuous"])
        same = sum(a == b for a, b in zip(texts["static"], texts["continuous"]))
        print(f"{shape}: {len(ids)} prompts x {num_samples} x {max_new_tokens} new tokens, batch {batch_size}: "
              f"static {static:.1f} tokens/s ({static / roofline:.2f} of roofline), continuous {continuous:.1f} "
              f"({continuous / roofline:.2f}), {continuous / static:.2f}x; answers identical {same} of {len(ids)}; "
              f"rounds {[round(r, 1) for r in rates['static']]} / {[round(r, 1) for r in rates['continuous']]}",
              flush=True)
        for engine, times in forwards.items():  # the last round's
            print(f"  {engine}, last round: " + "; ".join(
                f"{count} {kind}s, {seconds:.1f} s, {rows / max(count, 1):.1f} rows each"
                for kind, (count, seconds, rows) in times.items()), flush=True)


if __name__ == "__main__":
    main()
