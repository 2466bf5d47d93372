"""Each stage's peak memory at Llama-3-8B's shape, measured on a CPU with a few layers, extrapolated to 32.

    python bench/memory_8b.py                         # layers 1 and 2, every stage (about 15 minutes on 2 cores)
    python bench/memory_8b.py --layers 1 2 --stages train --out /tmp/memory.json

Each (stage, layers) runs in a fresh process. It builds a Llama with Llama-3-8B's width (4096), heads (32, 8 of
them for keys and values), MLP (14336) and untied 128256-token vocabulary, random weights, `layers` decoder
layers, directly in the stage's precision; then resets the process's peak resident memory (VmHWM, through
/proc/self/clear_refs), runs the stage's own functions at the workload below, and reports the peak above the
resident memory before the model was built. Two layer counts separate the per-layer cost (weights, KV cache,
checkpointed activations, adapters) from the fixed one (embeddings, output layer, logits, one layer's
transient activations): fixed + 32 x per-layer is the 8B estimate.

The stages as they run on one GPU with LORA_RANK=16 (a LoRA policy: the base plus its fp32 adapter):
  generate  01, 02 and 05's answers: common.generate_batches, bf16 base + rank-16 fp32 adapter, 32 prompts
            (01's --batch-size) of 128 tokens, 64 new tokens each, greedy
  score     03's implicit reward: ONE fp32 base with the two policies' adapters (load_scorers), one pass of
            common.score_sequences at 03's --token-budget 8192: 16 rows of 384 prompt + 128 answer tokens (the
            second policy's pass reuses the same memory)
  train     04 --lora-rank 16 --gradient-checkpointing: bf16 base, fp32 adapters, fused AdamW, one step of 4 pairs
            (04's --batch-size) of 384 + 128 tokens, chosen and rejected in one forward, under bf16 autocast
  judge     05's local judge: the model in fp32, common.next_token_logps at 05's --token-budget 8192 (16 x 512)
What a CPU cannot say: a GPU adds its CUDA context (about 0.5 GiB) and its allocator's slack, and its kernels
keep other workspaces. The KV cache grows with the tokens in flight: 4 KiB per token per layer in bf16
(2 x 8 heads x 128 x 2 bytes), so 01 at 32 prompts of 256 + 1024 tokens adds 32 x 1280 x 4 KiB x 32 layers =
5 GiB to the generate row's 32 x 192 tokens.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0)
STAGES = ("generate", "score", "train", "judge")
CARDS_GB = (24, 48, 80)  # a card's GB are 1e9 bytes: 22.4, 44.7 and 74.5 GiB
CUDA_CONTEXT_GIB = 0.5
GIB = 2 ** 30


def resident(field):
    """VmRSS or VmHWM (the peak) of this process, in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def build(layers, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(**LLAMA_3_8B, num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def run_stage(stage, layers):
    """Measure one stage in this process: {"peak_gib", "weights_gib"}."""
    import torch
    import common
    spec = importlib.util.spec_from_file_location("dpo", os.path.join(REPO, "04_dpo.py"))
    dpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dpo)
    before = resident("VmRSS")
    model = build(layers, torch.float32 if stage in ("score", "judge") else torch.bfloat16)
    if stage != "judge":  # a LoRA policy: rank 16, alpha 32, every attention and MLP projection
        common.add_lora(model, 16, 32.0)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ids = lambda rows, length, start=3: [[start + (7 * r + t) % 30000 for t in range(length)]  # noqa: E731
                                         for r in range(rows)]
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak starts again from here: what building the model took does not count
    if stage == "generate":
        list(common.generate_batches(model, common.load_tokenizer(common.EMBEDDED_MODEL), ids(32, 128),
                                     max_new_tokens=64, batch_size=32, show_progress=False))
    elif stage == "score":
        common.score_sequences(model, [(row, 384) for row in ids(16, 512)], token_budget=8192,
                               show_progress=False)
    elif stage == "train":
        args = dpo.parse_args(["--lora-rank", "16", "--batch-size", "4", "--grad-accum", "1",
                               "--gradient-checkpointing"])
        model.train()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        pairs = [{"sequences": [(row, 384), (row[:384] + row[:128], 384)], "response_tokens": [128, 128],
                  "reference_logps": [0.0, 0.0]} for row in ids(4, 512)]
        optimizer = dpo.make_optimizer(model, args)
        dpo.train_step(model, optimizer, pairs, args, rank=0, world=1)
    else:
        common.next_token_logps(model, ids(16, 512), candidates=[10, 11], token_budget=8192)
    return {"peak_gib": (resident("VmHWM") - before) / GIB, "weights_gib": weights / GIB}


def measure(stages, layer_counts):
    results = {}
    for stage in stages:
        for layers in layer_counts:
            process = subprocess.run([sys.executable, __file__, "--child", stage, str(layers)], cwd=REPO,
                                     capture_output=True, text=True)
            if process.returncode != 0:
                raise RuntimeError(f"{stage} at {layers} layers failed:\n{process.stderr[-3000:]}")
            results[f"{stage}/{layers}"] = json.loads(process.stdout.strip().splitlines()[-1])
            print(f"{stage:<9} {layers} layers: peak {results[f'{stage}/{layers}']['peak_gib']:.2f} GiB", flush=True)
    return results


def table(results, stages, layer_counts):
    """Per stage: fixed and per-layer GiB from the first and last layer counts, and the 32-layer estimate."""
    low, high = min(layer_counts), max(layer_counts)
    rows = []
    for stage in stages:
        peaks = [results[f"{stage}/{layers}"]["peak_gib"] for layers in (low, high)]
        per_layer = (peaks[1] - peaks[0]) / (high - low)
        fixed = peaks[0] - low * per_layer
        at_32 = fixed + 32 * per_layer
        rows.append({"stage": stage, "fixed_gib": fixed, "per_layer_gib": per_layer, "gib_32_layers": at_32,
                     "fits": {f"{card} GB": at_32 + CUDA_CONTEXT_GIB < card * 1e9 / GIB for card in CARDS_GB}})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 2], help="two or more layer counts")
    parser.add_argument("--out", default=None, help="write the measurements and the table here (JSON)")
    parser.add_argument("--table-from", default=None, help="print the table of an earlier --out file again")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # one measurement, in its own process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_stage(args.child[0], int(args.child[1]))))
        return
    if len(set(args.layers)) < 2:
        parser.error("--layers: give two different layer counts (the fixed and per-layer costs need both)")
    print(f"command: python bench/memory_8b.py --stages {' '.join(args.stages)} "
          f"--layers {' '.join(map(str, args.layers))}")
    if args.table_from:
        with open(args.table_from) as handle:
            results = json.load(handle)["measurements"]
    else:
        results = measure(args.stages, args.layers)
    rows = table(results, args.stages, args.layers)
    print("\n| stage | fixed GiB | per layer GiB | 32 layers GiB | fits 24 / 48 / 80 GB (22.4 / 44.7 / 74.5 GiB, "
          f"less {CUDA_CONTEXT_GIB} for CUDA) |\n|---|---|---|---|---|")
    for row in rows:
        fits = " / ".join("yes" if ok else "no" for ok in row["fits"].values())
        print(f"| {row['stage']} | {row['fixed_gib']:.2f} | {row['per_layer_gib']:.3f} | "
              f"{row['gib_32_layers']:.1f} | {fits} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"measurements": results, "table": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
