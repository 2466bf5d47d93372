"""The GPU check: the loop's in-process path on one CUDA GPU, in bf16, at real shapes, in a few minutes.

    python bench/gpu_check.py --out gpu-check                 # on a GPU machine: every row below
    python bench/gpu_check.py --cpu-smoke --out /tmp/smoke    # the same code paths, tiny shapes, CPU, < 1 min

Nothing is downloaded: the models are Llama configs with random weights, built on the device, and the
tokenizer is read from --tokenizer (default: the embedded model's converted directory; on a machine without
it, copy its tokenizer*.json and chat_template.jinja into a folder and name it). Rows:
  1. correctness, a small random model in bf16 (04 and 03 run as the user runs them, as subprocesses):
     04's step 1 is ln 2 with reward accuracy 0 (policy == reference); 03's implicit reward of a model against
     an identical copy is 0; greedy generation of the same prompts at batch 1 and batch 32 agrees token by token.
  2. speed and memory, Llama shapes of 1B and 8B (random weights):
     generation (common.generate_batches, 64 prompts x 256 new tokens, greedy) against HF model.generate on the
     same prompts in the same batch, and against the engine before (bench_batching.static_batch: transformers'
     DynamicCache, copied whole at every step), alternated; the scorer (common.score_sequences) on 256 sequences of 512
     tokens; 04's optimizer step (fp32 master weights, bf16 autocast, fused AdamW, gradient checkpointing) on 16
     pairs of 512 tokens: seconds, peak memory, tokens/s, model FLOPs utilisation (6 x params x tokens / time /
     989 TFLOP/s, the H100/H200 bf16 dense peak). A shape whose training does not fit says why, with the memory
     arithmetic, and the next smaller shape is measured instead.
  3. 04 --lora-rank 16 at Llama-3-8B's shape, as 04 runs it on one GPU: the frozen model stored in bf16, fp32
     adapters on every attention and MLP projection, the same 16 pairs x 512 tokens: step 1 is ln 2, then
     seconds, peak memory, tokens/s and MFU (4 x params x tokens: the frozen weights get no gradient).
Each row goes to --out as results.json and results.md. --cpu-smoke asserts the correctness rows.

What it needs: torch with CUDA, transformers >= 5.24, and the tokenizer files (tokenizer.json,
tokenizer_config.json, chat_template.jinja from ~/.cache/multilingual-loop/SmolLM2-135M-Instruct/, copied into a
folder such as .gpu/tokenizer). On a machine with no network whose image has an older transformers, download the
wheels it lacks elsewhere, for the GPU machine's Python and platform:
    pip download --no-deps -d .whl transformers==5.25.0 huggingface_hub==2.4.0 kernels==0.19.1 httpx2 httpcore2 \
        truststore tomlkit hf-xet click regex
copy .whl and .gpu over, then
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python bench/gpu_check.py --out gpu-check --tokenizer .gpu/tokenizer
"""
import argparse
import gc
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import common  # noqa: E402
from bench_batching import static_batch  # noqa: E402  (the engine before common's, kept to compare)

spec = importlib.util.spec_from_file_location("dpo", os.path.join(REPO, "04_dpo.py"))  # a numbered file name
dpo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dpo)

# Llama shapes (Llama-3.2-1B, Llama-3.2-3B, Llama-3-8B) and the tiny one of the CPU smoke run.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM, dense bf16
# What each size of run does: (correctness shape, speed shapes, training shapes to try in order, sizes).
PLANS = {
    "gpu": dict(correct="small", speed=["1b", "8b"], train=["8b", "3b", "1b"], lora=["8b"], prompts=64,
                new_tokens=256, score_rows=256, length=512, pairs=16, micro_batch=4, agreement_tokens=64),
    "cpu-smoke": dict(correct="tiny", speed=["tiny"], train=["tiny"], lora=["tiny"], prompts=4, new_tokens=8,
                      score_rows=8, length=64, pairs=4, micro_batch=1, agreement_tokens=16),
}


def build_model(shape, tokenizer, dtype, device, init_std=0.02, seed=0):
    """A random Llama of `shape`, built directly on the device (no download, no file)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, initializer_range=init_std,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured(function, device):
    """(result, seconds, peak memory in GiB or None on CPU) of function()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = function()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return result, time.perf_counter() - started, peak


def row(rows, check, shape, value, unit, detail=""):
    rows.append({"check": check, "shape": shape, "value": value, "unit": unit, "detail": detail})
    print(f"{check:<44} {shape:<6} {value!s:>14} {unit:<16} {detail}", flush=True)


# ----------------------------------------------------------------------------
# 1. Correctness: 04 and 03 as subprocesses, greedy agreement in-process


def run_stage(script, *args, environment=None):
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, **(environment or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{result.stderr[-2000:]}")
    return result


def correctness(rows, plan, tokenizer, tokenizer_dir, device, scratch, prompts):
    shape = plan["correct"]
    model = build_model(shape, tokenizer, torch.float32, "cpu", init_std=0.2)  # saved as fp32, as 04 saves
    directories = [os.path.join(scratch, name) for name in ("model-a", "model-b")]
    for directory in directories:  # two identical copies: 03 refuses one model as both of its models
        model.save_pretrained(directory)
        for name in os.listdir(tokenizer_dir):
            if name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(os.path.join(tokenizer_dir, name), directory)
    # 04, step 1: policy == reference, so the loss is ln 2 and no pair is won, in bf16 as in fp32.
    pairs = os.path.join(scratch, "pairs.jsonl")
    common.write_jsonl(pairs, [{"id": f"g{k}", "prompt": p, "chosen": f"A careful answer: {p}",
                                "rejected": "I do not know."} for k, p in enumerate(prompts[:16])])
    run_stage("04_dpo.py", "--model", directories[0], "--input", pairs, "--output", os.path.join(scratch, "dpo"),
              "--eval-frac", "0", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "1", "--save-every", "0")
    first = common.read_jsonl(os.path.join(scratch, "dpo", "metrics.jsonl"))[0][1]
    dtype = str(common.pick_device()[1]).replace("torch.", "")
    row(rows, f"04 step 1: loss - ln 2 ({dtype} autocast)", shape, f"{first['loss'] - math.log(2):.1e}", "nats",
        "plain DPO; must be within 1e-6 of 0")
    row(rows, "04 step 1: reward accuracy", shape, first["rewards/accuracies"], "", "must be 0")
    # 03, implicit reward: a model against an identical copy scores every answer 0 (log-probs in fp32).
    responses = os.path.join(scratch, "responses.jsonl")
    common.write_jsonl(responses, [{"id": f"r{k}", "lang": lang, "prompt": p, "responses": [f"{p} Yes.", "No."]}
                                   for k, p in enumerate(prompts[:8]) for lang in ("en", "es")])
    run_stage("03_reward.py", "--method", "implicit", "--input", responses, "--output",
              os.path.join(scratch, "pairs-implicit.jsonl"), "--dpo-model", directories[0], "--ref-model",
              directories[1])
    scores = [record for _, record in common.read_jsonl(os.path.join(scratch, "pairs-implicit.scores.jsonl"))]
    largest = max(abs(d - r) for record in scores for d, r in zip(record["dpo_logps"], record["ref_logps"]))
    row(rows, "03 implicit reward, model vs its copy", shape, f"{largest:.1e}", "nats (max |r|)",
        f"{sum(len(r['dpo_logps']) for r in scores)} answers; must be within 1e-6 of 0")
    # Greedy decoding at batch 1 and 32: padding and batch shape change the rounding, rarely the argmax.
    ids, agreement = [common.chat_prompt_ids(tokenizer, p) for p in prompts[:32]], {}
    for dtype in dict.fromkeys([common.pick_device()[1], torch.float32]):  # the loop's dtype, then fp32
        model, _ = common.load_model(directories[0], dtype=dtype)
        outputs = []
        for batch_size in (1, 32):
            samples = {index: s[0] for batch in common.generate_batches(
                model, tokenizer, ids, max_new_tokens=plan["agreement_tokens"], batch_size=batch_size,
                show_progress=False) for index, s in batch}
            outputs.append([tokenizer(samples[k]["text"], add_special_tokens=False).input_ids
                            for k in range(len(ids))])
        same = sum(a == b for one, other in zip(*outputs) for a, b in zip(one, other))
        total = sum(max(len(one), len(other)) for one, other in zip(*outputs))
        agreement[dtype] = same / max(total, 1)
        row(rows, f"greedy tokens equal at batch 1 and 32 ({str(dtype)[6:]})", shape, f"{agreement[dtype]:.3f}",
            "share", f"{len(ids)} prompts x {plan['agreement_tokens']} tokens; aim >= 0.90")
        del model
    return first, largest, agreement[common.pick_device()[1]]


# ----------------------------------------------------------------------------
# 2. Speed and memory at real shapes


def generation_rows(rows, shape, model, tokenizer, plan, device, prompts):
    """Our decode loop against HF generate(), the same prompts in one batch, alternated twice."""
    ids = [common.chat_prompt_ids(tokenizer, p) for p in prompts[:plan["prompts"]]]
    stops = common.end_of_turn_ids(tokenizer)

    def ours():
        return sum(s["new_tokens"] for batch in common.generate_batches(
            model, tokenizer, ids, max_new_tokens=plan["new_tokens"], batch_size=len(ids), show_progress=False)
            for _, samples in batch for s in samples)

    def library():
        longest = max(len(i) for i in ids)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(i)) + i for i in ids], device=device)
        mask = torch.tensor([[0] * (longest - len(i)) + [1] * len(i) for i in ids], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=plan["new_tokens"],
                                 do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
        new = out[:, longest:].tolist()  # a row's tokens up to and including its end-of-turn token
        return sum(next((k + 1 for k, t in enumerate(r) if t in stops), len(r)) for r in new)

    def before():
        return sum(len(sample) for row in static_batch(model, ids, 1, tokenizer.pad_token_id, stops, 0.0, 1.0, 1.0,
                                                       [plan["new_tokens"]] * len(ids), [0] * len(ids))
                   for sample in row)

    results = {"ours": [], "generate()": [], "the engine before": []}
    for _ in range(2):
        for name, function in (("ours", ours), ("generate()", library), ("the engine before", before)):
            results[name].append(measured(function, device))
    for name, runs in results.items():
        tokens, seconds, peak = min(runs, key=lambda r: r[1])
        row(rows, f"generation, {name}", shape, f"{tokens / seconds:.0f}", "new tokens/s",
            f"{len(ids)} prompts x {plan['new_tokens']}, batch {len(ids)}, greedy, bf16; peak {peak_text(peak)}; "
            f"best of 2, alternated")
    best = {name: max(r[0] / r[1] for r in runs) for name, runs in results.items()}
    row(rows, "generation, ours / generate()", shape, f"{best['ours'] / best['generate()']:.2f}", "x")
    row(rows, "generation, ours / the engine before", shape, f"{best['ours'] / best['the engine before']:.2f}", "x")


def peak_text(peak):
    return "n/a (CPU)" if peak is None else f"{peak:.1f} GiB"


def scorer_rows(rows, shape, model, plan, device):
    generator = torch.Generator().manual_seed(0)
    length, n = plan["length"], plan["score_rows"]
    sequences = [(torch.randint(100, 40000, (length,), generator=generator).tolist(), length // 4) for _ in range(n)]
    common.score_sequences(model, sequences[:2], show_progress=False)  # warm-up: kernels, allocator
    _, seconds, peak = measured(lambda: common.score_sequences(model, sequences, token_budget=16384,
                                                               show_progress=False), device)
    row(rows, "scorer (score_sequences), bf16 weights", shape, f"{n * length / seconds:.0f}", "tokens/s",
        f"{n} x {length} tokens, token budget 16384; peak {peak_text(peak)}")


def dpo_part(metrics):
    """A DPO+NLL step's loss without its NLL term (nll_weight 1): at step 1, ln 2."""
    return metrics["loss"] - metrics["nll_loss"]


def training_memory_text(parameters, dtype_bytes=4):
    """The memory arithmetic of the precision policy: fp32 weights, fp32 gradients, two fp32 AdamW moments,
    plus autocast's bf16 copy of the weights during each forward."""
    gib = parameters / 2 ** 30
    return (f"{parameters / 1e9:.2f}B params: weights {gib * dtype_bytes:.0f} + grads {gib * 4:.0f} + AdamW "
            f"{gib * 8:.0f} + bf16 weight copies {gib * 2:.0f} = {gib * 18:.0f} GiB before activations")


def lora_memory_text(parameters, adapters):
    """The memory arithmetic of 04 --lora-rank on a GPU: bf16 frozen weights; fp32 adapters, their gradients
    and AdamW moments (16 bytes each)."""
    gib = 2 ** 30
    return (f"{parameters / 1e9:.2f}B params: bf16 weights {parameters * 2 / gib:.1f} GiB + adapters "
            f"({adapters / 1e6:.0f}M) with grads and AdamW {adapters * 16 / gib:.1f} GiB before activations")


def training_rows(rows, shapes, tokenizer, plan, device, lora_rank=0):
    """04's train_step at the largest shape that fits: step 1 is ln 2, then two timed steps. With lora_rank:
    04 --lora-rank's step (the model frozen in bf16, fp32 adapters, AdamW over the adapters)."""
    args = argparse.Namespace(batch_size=plan["micro_batch"], grad_accum=plan["pairs"] // plan["micro_batch"],
                              loss="sigmoid", beta=0.1, label_smoothing=0.0, nll_weight=1.0, max_grad_norm=1.0,
                              lr=5e-7, weight_decay=0.0)
    name = f"04 LoRA r{lora_rank} step" if lora_rank else "04 train step"
    generator = torch.Generator().manual_seed(1)
    length, prompt_length = plan["length"], plan["length"] // 4
    examples = []
    for _ in range(plan["pairs"]):
        prompt = torch.randint(100, 40000, (prompt_length,), generator=generator).tolist()
        answers = [prompt + torch.randint(100, 40000, (length - prompt_length,), generator=generator).tolist()
                   for _ in range(2)]
        examples.append({"sequences": [(ids, prompt_length) for ids in answers], "length": length,
                         "response_tokens": [length - prompt_length] * 2})
    for shape in shapes:
        model = optimizer = None
        gc.collect()  # a shape that did not fit is freed before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            model = build_model(shape, tokenizer, common.pick_device()[1] if lora_rank else torch.float32, device)
            parameters = sum(p.numel() for p in model.parameters())
            if lora_rank:  # as 04's load_policy does on a GPU
                common.add_lora(model, lora_rank, 2.0 * lora_rank)
            adapters = sum(p.numel() for p in model.parameters() if p.requires_grad) if lora_rank else 0
            memory_text = lora_memory_text(parameters, adapters) if lora_rank else training_memory_text(parameters)
            model.train()
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
            with torch.no_grad():  # the reference: the policy before its first step, in the step's micro-batches
                for k in range(0, len(examples), args.batch_size):
                    batch = examples[k:k + args.batch_size]
                    logps = dpo.batch_logps(model, batch).cpu()
                    for i, example in enumerate(batch):
                        example["reference_logps"] = [logps[i].item(), logps[len(batch) + i].item()]
            optimizer = dpo.make_optimizer(model, args)
            first, _, _ = measured(lambda: dpo.train_step(model, optimizer, examples, args, 0, 1), device)
            timed = [measured(lambda: dpo.train_step(model, optimizer, examples, args, 0, 1), device)
                     for _ in range(2)]
        except torch.OutOfMemoryError:
            parameters = sum(p.numel() for p in model.parameters()) if model is not None else 0
            del model, optimizer
            torch.cuda.empty_cache()
            text = lora_memory_text(parameters, 0) if lora_rank else training_memory_text(parameters)
            row(rows, f"{name}: does not fit", shape, "OOM", "", text +
                f" (of {torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB)")
            continue
        tokens = sum(len(ids) for example in examples for ids, _ in example["sequences"])
        seconds, peak = min(t[1] for t in timed), max(t[2] or 0 for t in timed)
        flops = 4 if lora_rank else 6  # per parameter and token: forward 2, backward 2 (+ 2 for weight grads)
        row(rows, f"{name.replace(' step', ' step 1')}: loss - NLL - ln 2", shape,
            f"{dpo_part(first) - math.log(2):.1e}", "nats", "DPO+NLL; the reference scored in the step's micro-batches")
        row(rows, f"{name}: seconds", shape, f"{seconds:.2f}", "s/step",
            f"{plan['pairs']} pairs x {length} tokens, micro-batch {args.batch_size} pair(s) x {args.grad_accum}")
        row(rows, f"{name}: tokens/s", shape, f"{tokens / seconds:.0f}", "tokens/s")
        row(rows, f"{name}: peak memory", shape, peak_text(peak if device.type == "cuda" else None), "", memory_text)
        row(rows, f"{name}: MFU", shape, f"{flops * parameters * tokens / seconds / PEAK_BF16_FLOPS:.1%}",
            "", f"{flops} x params x tokens / s / 989 TFLOP/s (checkpointing's recompute not counted)")
        return first
    return None


# ----------------------------------------------------------------------------


def write_results(out, rows, command):
    os.makedirs(out, exist_ok=True)
    common.write_json(os.path.join(out, "results.json"), {"command": command, "rows": rows})
    lines = [f"`{command}`", "", "| check | shape | value | unit | detail |", "|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['shape']} | {r['value']} | {r['unit']} | {r['detail']} |" for r in rows]
    common.write_atomic(os.path.join(out, "results.md"), lambda handle: handle.write("\n".join(lines) + "\n"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--tokenizer", default=None, help="a folder with the tokenizer files (default: the "
                        "embedded model's converted directory)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: the code paths, < 1 min")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: correctness,speed,train "
                        "(train: both the full and the LoRA rows)")
    parser.add_argument("--train", default=None, help="training shapes to try, in order (default: 8b,3b,1b)")
    parser.add_argument("--micro-batch", type=int, default=None, help="pairs per micro-batch in the training rows "
                        "(default: 4 on a GPU, 1 in --cpu-smoke; 16 pairs a step)")
    args = parser.parse_args()
    command = "python bench/gpu_check.py " + " ".join(sys.argv[1:])
    if args.cpu_smoke:
        os.environ["LOOP_BF16"] = "1"  # the CPU takes the GPU's precision path: bf16 weights, bf16 autocast
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --cpu-smoke, or on a GPU machine")
    plan, device = dict(PLANS["cpu-smoke" if args.cpu_smoke else "gpu"]), common.pick_device()[0]
    plan.update({"train": args.train.split(",")} if args.train else {},
                **{"micro_batch": args.micro_batch} if args.micro_batch else {})
    tokenizer_dir = args.tokenizer or common.embedded_model_dir()
    tokenizer = common.load_tokenizer(tokenizer_dir)
    prompts = [p["prompt"] for p in common.load_prompts(os.path.join(REPO, "data", "prompts"),
                                                        langs=["en", "es", "de", "fr"])]
    rows = []
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    row(rows, "device", "", name, "", f"torch {torch.__version__}, {common.pick_device()[1]}")
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        if "correctness" not in skip:
            first, largest, agreement = correctness(rows, plan, tokenizer, tokenizer_dir, device, scratch, prompts)
            if args.cpu_smoke:  # what the check asserts; on a GPU the rows report it
                assert abs(first["loss"] - math.log(2)) < 1e-6 and first["rewards/accuracies"] == 0, first
                assert largest < 1e-6 and agreement >= 0.9, (largest, agreement)
        write_results(args.out, rows, command)
        for shape in plan["speed"] if "speed" not in skip else []:
            model = build_model(shape, tokenizer, common.pick_device()[1], device)
            generation_rows(rows, shape, model, tokenizer, plan, device, prompts)
            scorer_rows(rows, shape, model, plan, device)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_results(args.out, rows, command)
        if "train" not in skip:
            first = training_rows(rows, plan["train"], tokenizer, plan, device)
            if args.cpu_smoke:
                assert first is not None and abs(dpo_part(first) - math.log(2)) < 1e-6, first
            write_results(args.out, rows, command)
            first = training_rows(rows, plan["lora"], tokenizer, plan, device, lora_rank=16)
            if args.cpu_smoke:
                assert first is not None and abs(dpo_part(first) - math.log(2)) < 1e-6, first
    write_results(args.out, rows, command)
    print(f"wrote {os.path.join(args.out, 'results.md')}")


if __name__ == "__main__":
    main()
