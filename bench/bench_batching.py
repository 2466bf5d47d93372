"""Continuous batching in-process (the lever, written here) against common.generate_batches (what 01, 02, 05 run).

Both engines in one process, on the embedded model in fp32, alternated round after round (A B B A ...), the median
round kept; the answers are compared text for text (sampled rows draw from the same per-row generators in both).
common's engine takes prompts longest first, batch_size at a time; a finished row leaves the batch and nothing takes
its place, so a batch's last steps run at a few rows. The continuous engine below gives a finished row's slot to the
next prompt at once (prefilled alone, written into the batch's transformers KV cache in place), so every step runs
the full batch until the prompts run out. Shapes (the demo's, and a small one):
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
import collections
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402

SHAPES = {"iteration 1": ("alpagasus", 24, 128, 32, 1), "iteration 2": ("alpagasus", 24, 128, 32, 3),
          "eval": ("x-alpacaeval", 60, 48, 16, 1), "small": ("alpagasus", 2, 64, 32, 1)}


Row = collections.namedtuple("Row", "prompt sample tokens generator")  # one sample being decoded


@torch.inference_mode()
def decode(models, prompts, seeds, num_samples, batch_size, pad_id, stop_ids, temperature, top_p,
           repetition_penalty, max_new_tokens, alpha=0.0):
    """Continuous batching: yields [(prompt index, N lists of new token ids)] as prompts finish.

    The batch has batch_size * N rows (slots). When a row's answer ends, its slot goes to the next prompt
    (longest first) at once, written in place, so every step runs the full batch until the prompts run out.
    A list ends with its end-of-turn token, or has its prompt's max_new_tokens (one per prompt) tokens.
    models: [model] or [model, expert, antiexpert] (proxy-tuned: model + alpha * (expert - antiexpert)).
    seeds: one per prompt, for sampling. The batch is right-aligned: every row's newest token is in the last
    column of the KV caches, with padding (masked) on the left.
    """
    if any(len(ids) < 2 for ids in prompts):
        raise ValueError("decode needs prompts of at least 2 tokens (a chat prompt has more)")
    device = next(models[0].parameters()).device
    vocab = min(model.get_output_embeddings().out_features for model in models)
    waiting = collections.deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    rows, answers = [], {}  # a Row per slot (None: free); per prompt, its N token lists (None until one ends)
    while True:
        # 1. Admit as many waiting prompts as there are free slots for. Each is prefilled but for its last token,
        #    which goes into the next step with the running rows (so that step runs full); N samples share a
        #    prefill. The first prompts make the batch; later ones are written into the slots of ended rows.
        free = [slot for slot, row in enumerate(rows) if row is None] if rows else range(batch_size * num_samples)
        admitted = [waiting.popleft() for _ in range(min(len(free) // num_samples, len(waiting)))]
        if admitted:
            heads = [prompts[i][:-1] for i in admitted]
            width = max(len(ids) for ids in heads)
            new_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in heads], device=device)
            new_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in heads], device=device)
            new_positions = (new_mask.cumsum(-1) - 1).clamp(min=0)  # real tokens only: padding changes nothing
            new_caches = [model(input_ids=new_ids, attention_mask=new_mask, position_ids=new_positions,
                                use_cache=True, logits_to_keep=1).cache for model in models]
            new_seen = torch.zeros(len(admitted), vocab, dtype=torch.bool, device=device)
            for row, prompt in enumerate(admitted):  # the tokens each row has seen, for the repetition penalty
                new_seen[row, prompts[prompt]] = True
            last = torch.tensor([prompts[i][-1] for i in admitted], device=device)
            new = [tensor.repeat_interleave(num_samples, dim=0) for tensor in (new_mask, last, new_seen,
                                                                                 new_positions[:, -1])]
            slots = free[:len(admitted) * num_samples]
            if not rows:  # the first prompts: the batch is theirs
                caches, (mask, inputs, seen, positions) = new_caches, new
                rows = [None] * len(slots)
                for cache in caches:
                    cache.batch_repeat_interleave(num_samples)
            else:
                # In place, right-aligned: prompts come longest first, so a new one fits in the batch's width.
                index = torch.tensor(slots, device=device)
                for cache, new_cache in zip(caches, new_caches):
                    for (keys, values, _), (new_keys, new_values, _) in zip(cache, new_cache):
                        pad = (0, 0, keys.shape[-2] - width, 0)
                        keys[index] = F.pad(new_keys, pad).repeat_interleave(num_samples, dim=0)
                        values[index] = F.pad(new_values, pad).repeat_interleave(num_samples, dim=0)
                new[0] = F.pad(new[0], (mask.shape[1] - width, 0))
                for tensor, value in zip((mask, inputs, seen, positions), new):
                    tensor[index] = value
            for slot, (prompt, sample) in zip(slots, [(p, s) for p in admitted for s in range(num_samples)]):
                rows[slot] = Row(prompt, sample, [], torch.Generator().manual_seed(seeds[prompt] + sample)
                                 if temperature > 0 else None)
            answers.update((prompt, [None] * num_samples) for prompt in admitted)
        if not rows:
            return
        # 2. Forward one token per row through every model, each with its own cache.
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        positions = positions + 1
        logits = [model(input_ids=inputs[:, None], attention_mask=mask, position_ids=positions[:, None],
                        cache=cache, use_cache=True).logits[:, -1, :vocab].float()
                  for model, cache in zip(models, caches)]
        # 3. Sample: the proxy's logit arithmetic, the repetition penalty, then greedy or top-p.
        scores = logits[0] if len(models) == 1 else logits[0] + alpha * (logits[1] - logits[2])
        if repetition_penalty != 1.0:  # as in CTRL and HF: shrink the logit of every token already seen
            scores = torch.where(seen, torch.where(scores < 0, scores * repetition_penalty,
                                                   scores / repetition_penalty), scores)
        # A free slot (N > 1: waiting for more free slots) decodes too, its tokens never read.
        uniforms = torch.tensor([torch.rand(1, generator=row.generator).item() if row else 0.0 for row in rows])
        inputs = common.sample_next(scores, temperature, top_p, uniforms)  # each row's next input
        seen[torch.arange(len(rows), device=device), inputs] = True
        # 4. The step's one host sync: the new tokens come to the CPU; prompts whose samples all ended are done.
        finished = []
        for slot, (row, token) in enumerate(zip(rows, inputs.tolist())):
            if row is None:
                continue
            row.tokens.append(token)
            if token in stop_ids or len(row.tokens) == max_new_tokens[row.prompt]:
                rows[slot], answers[row.prompt][row.sample] = None, row.tokens  # the slot is free
                if all(answers[row.prompt]):
                    finished.append((row.prompt, answers.pop(row.prompt)))
        if finished:
            yield finished
        # 5. With no prompt waiting, ended rows leave the batch (and every KV cache) instead. Columns that are
        #    padding in every row are cut once they are a quarter of the batch's width.
        live = [slot for slot, row in enumerate(rows) if row is not None]
        if not waiting and len(live) < len(rows):
            index = torch.tensor(live, device=device, dtype=torch.long)
            inputs, seen, mask, positions = (tensor[index] for tensor in (inputs, seen, mask, positions))
            caches = [kv_cache(model, [(keys[index], values[index]) for keys, values, _ in cache])
                      for model, cache in zip(models, caches)]
            rows = [rows[slot] for slot in live]
        first = int(mask.any(0).int().argmax()) if rows else 0  # the first column a row uses
        if 4 * first >= mask.shape[1] > 0:
            caches, mask = cut_columns(models, caches, mask, first)


def cut_columns(models, caches, mask, count):
    """The batch's KV caches and mask without their first `count` columns."""
    return ([kv_cache(model, [(keys[..., count:, :], values[..., count:, :]) for keys, values, _ in cache])
             for model, cache in zip(models, caches)], mask[:, count:])


def kv_cache(model, layers):
    """A transformers DynamicCache for `model` that holds the given (keys, values) per layer."""
    from transformers import DynamicCache
    return DynamicCache(layers, config=model.config)


def run_engine(engine, model, tokenizer, ids, num_samples, max_new_tokens, batch_size):
    """(tokens/s, texts in prompt order) for one engine on one shape."""
    temperature = 0.9 if num_samples > 1 else 0.0
    started = time.perf_counter()
    if engine == "continuous":
        stop_ids = common.end_of_turn_ids(tokenizer)
        seeds = [int(common.content_key(0, prompt), 16) % 2 ** 62 for prompt in ids]  # as generate_batches's
        done = {index: common.decode_samples(tokenizer, rows, stop_ids) for finished in decode(
            [model], ids, seeds, num_samples, batch_size, tokenizer.pad_token_id, stop_ids, temperature, 1.0, 1.1,
            [max_new_tokens] * len(ids)) for index, rows in finished}
    else:
        done = dict(pair for batch in common.generate_batches(
            model, tokenizer, ids, num_samples, temperature, repetition_penalty=1.1, max_new_tokens=max_new_tokens,
            batch_size=batch_size, show_progress=False) for pair in batch)
    seconds = time.perf_counter() - started
    samples = [done[i] for i in range(len(ids))]
    return sum(s["new_tokens"] for row in samples for s in row) / seconds, [[s["text"] for s in row] for row in samples]


def profile(model, tokenizer, ids, num_samples, max_new_tokens, batch_size, shape):
    """Self CPU time of each engine by kind of work: matrix products, attention, copies of the KV cache,
    sampling and the rest, beside the wall time (the rest of it is Python between the ops)."""
    kinds = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear"),
             "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax",
                           "aten::scaled_dot_product_attention"),
             "cache and batch copies": ("aten::cat", "aten::index", "aten::copy_", "aten::constant_pad_nd",
                                        "aten::repeat_interleave", "aten::index_select"),
             "sampling": ("aten::sort", "aten::argmax", "aten::searchsorted", "aten::cumsum", "aten::where")}
    for engine in ("static", "continuous"):
        started = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            run_engine(engine, model, tokenizer, ids, num_samples, max_new_tokens, batch_size)
        wall = (time.perf_counter() - started) * 1e6
        events = profiler.key_averages()
        shares = {kind: sum(e.self_cpu_time_total for e in events if e.key in names) for kind, names in kinds.items()}
        shares["other ops"] = sum(e.self_cpu_time_total for e in events) - sum(shares.values())
        calls = sum(e.count for e in events if e.key == "aten::mm")
        print(f"{shape}, {engine}: wall {wall / 1e6:.1f} s under the profiler; " + ", ".join(
            f"{kind} {value / 1e6:.1f} s" for kind, value in shares.items()) + f" (self CPU time of the ops; "
            f"the rest of the wall time is Python between them); {calls} matrix products", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of: " + ", ".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="each engine once per shape, under "
                        "torch.profiler: CPU time per kind of work")
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
              f"{'' if num_samples > 1 else ''}; rounds "
              f"{[round(r, 1) for r in rates['static']]} / {[round(r, 1) for r in rates['continuous']]}", flush=True)


if __name__ == "__main__":
    main()
