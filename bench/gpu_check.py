"""The GPU check: what the in-process path does in bf16 on CUDA, in a few minutes, as one table.

    python bench/gpu_check.py                 # the embedded SmolLM2-135M (or --model any local dir / hub id)

Rows:
  - 04 step 1 in bf16: DPO loss minus ln 2 and reward accuracy on 16 pairs (policy == reference, so both
    must be exactly ln 2 and 0 whatever the dtype: the reference is scored in the policy's own micro-batches)
  - the scorer (common.score): tokens/s and peak GPU memory, bf16 and fp32 weights
  - generation (common.generate_batches, 32 prompts x 128 new tokens, greedy): tokens/s and peak memory
  - with two or more GPUs: the same step 1 under torchrun with NCCL, DDP and FSDP
On a machine without CUDA it says so and stops: CPU numbers are in bench/bench_*.py.
"""
import argparse
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


def pairs_file(path, tokenizer_prompts):
    with open(path, "w", encoding="utf-8") as handle:
        for index, prompt in enumerate(tokenizer_prompts):
            handle.write(json.dumps({"id": f"g{index}", "prompt": prompt, "chosen": f"A careful answer to: {prompt}",
                                     "rejected": "I do not know."}, ensure_ascii=False) + "\n")
    return path


def step_one(model, pairs, output, launcher, extra=()):
    """04 for one step; returns (loss - ln 2, rewards/accuracies) of step 1."""
    command = launcher + [os.path.join(REPO, "04_dpo.py"), "--model", model, "--input", pairs, "--output", output,
                          "--eval-frac", "0", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "1",
                          "--save-every", "0", *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        return f"failed: {result.stderr.strip().splitlines()[-1][:80]}", ""
    with open(os.path.join(output, "metrics.jsonl"), encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    return f"{first['loss'] - math.log(2):+.2e}", f"{first['rewards/accuracies']:.3f}"


def timed(function):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    tokens = function()
    torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started), torch.cuda.max_memory_allocated() / 2 ** 20


def speed_rows(name, dtype, prompts):
    """The scorer's and generation's tokens/s and peak memory with `name` loaded in `dtype`."""
    model, tokenizer = common.load_model(name, dtype=dtype)
    rate, peak = timed(lambda: int(common.score(model, tokenizer, prompts[:128], prompts[64:192],
                                                show_progress=False)[1].sum()))
    rows = [(f"scorer, {str(dtype)[6:]} weights", f"{rate:.0f} response tokens/s", f"peak {peak:.0f} MiB",
             "128 pairs, token budget 8192")]
    ids = [common.chat_prompt_ids(tokenizer, prompt) for prompt in prompts[:32]]
    rate, peak = timed(lambda: sum(s["new_tokens"] for batch in common.generate_batches(
        model, tokenizer, ids, max_new_tokens=128, batch_size=32, show_progress=False) for _, samples in batch
        for s in samples))
    return rows + [(f"generation, {str(dtype)[6:]} weights", f"{rate:.0f} tokens/s", f"peak {peak:.0f} MiB",
                    "32 prompts x 128 new tokens, greedy")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=common.EMBEDDED_MODEL, help="model to check (default: %(default)s)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (the CPU figures are in bench/bench_*.py)")
        return
    rows = [("device", torch.cuda.get_device_name(0), f"bf16 {torch.cuda.is_bf16_supported()}",
             f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)")]
    prompts = [p["prompt"] for p in common.load_prompts(os.path.join(REPO, "data", "prompts"), langs=["en", "es",
                                                                                                     "de", "fr"])]
    with tempfile.TemporaryDirectory() as scratch:
        pairs = pairs_file(os.path.join(scratch, "pairs.jsonl"), prompts[:16])
        loss, accuracy = step_one(args.model, pairs, os.path.join(scratch, "one"), [sys.executable])
        rows.append(("04 step 1, 1 GPU", f"loss - ln 2 {loss}", f"accuracy {accuracy}", "must be 0 and 0"))
        if torch.cuda.device_count() >= 2:
            for flag in ([], ["--fsdp"]):
                launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                loss, accuracy = step_one(args.model, pairs, os.path.join(scratch, f"two{len(flag)}"), launcher, flag)
                rows.append((f"04 step 1, 2 GPUs {'FSDP' if flag else 'DDP'}", f"loss - ln 2 {loss}",
                             f"accuracy {accuracy}", "NCCL"))
    for dtype in (torch.bfloat16, torch.float32):
        rows += speed_rows(args.model, dtype, prompts)
        torch.cuda.empty_cache()
    print(f"command: python bench/gpu_check.py --model {args.model}")
    for row in rows:
        print(" | ".join(f"{cell:<34}" for cell in row))


if __name__ == "__main__":
    main()
