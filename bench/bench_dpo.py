"""Benchmark 04's DPO training: precomputed vs in-loop reference, with and without gradient
checkpointing, and against TRL's DPOTrainer (also with and without it: TRL 1.x's DPOConfig turns
gradient checkpointing ON by default, so it is set explicitly here to compare like with like).

04 precomputes the reference log-probs. The in-loop way (a reference model kept in memory and run
on every micro-batch) and the forward-only rate exist here only, for comparison: `--child-in-loop`
trains with 04's own train_step and a reference forward before each step, and times the forwards.

Same model (the embedded SmolLM2-135M-Instruct, fp32, CPU or one GPU), same pairs (alpagasus prompts
with short made-up chosen/rejected answers, ~80 tokens per sequence), 4 pairs per step, max length
256, one epoch, lr 5e-7, beta 0.1, sigmoid loss. Each variant runs in its own subprocess under a small
wrapper that reads the child's peak resident memory (ru_maxrss of RUSAGE_CHILDREN).
Training tokens/s = tokens of prompt+chosen and prompt+rejected sequences (no padding) per second of
optimizer steps (reference precomputation and model loading excluded, for all variants).

TRL is never a project dependency: install it into a separate venv and pass its python, e.g.
    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl

    python bench/bench_dpo.py                                    # 32 pairs, 8 steps (+ TRL if found)
    python bench/bench_dpo.py --quick                            # 8 pairs, 2 steps
    python bench/bench_dpo.py --trl-python /tmp/trlvenv/bin/python

--lora: full training against --lora-rank 8, 16 and 64 (alpha 2 x rank), each 04 run as a user runs it, in
alternating order over --rounds rounds (full, r8, r16, r64, then backwards), the best tokens/s and the highest
peak resident memory of each; then, in this process, the bytes each variant's training state holds per model
parameter after one step (weights + gradients + AdamW moments, counted off the live tensors), fp32 as on a
CPU and with the frozen model in bf16 as on a GPU.

    python bench/bench_dpo.py --lora [--rounds 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPAGASUS = os.path.join(REPO, "data", "alpagasus")
DEFAULT_TRL_PYTHON = "/tmp/trlvenv/bin/python"
BATCH, MAX_LENGTH, LR, BETA = 4, 256, 5e-7, 0.1

CHOSEN = ("Here is a clear answer. Start with the main idea in one sentence, then give one concrete example "
          "that shows how it works in practice, and finish with a short summary that the reader can act on today.")
REJECTED = ("I am not sure about this one. Maybe you could search for it online or ask somebody who knows more "
            "about the topic, because it is hard to say anything useful without more details.")


def write_pairs(path, count):
    """`count` pairs: alpagasus prompts (en, es, de, fr in turn) with made-up chosen/rejected answers."""
    languages = ["en", "es", "de", "fr"]
    prompts = {}
    for lang in languages:
        with open(os.path.join(ALPAGASUS, f"{lang}.jsonl"), encoding="utf-8") as handle:
            prompts[lang] = [json.loads(line) for _, line in zip(range(count), handle)]
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            lang = languages[index % len(languages)]
            record = prompts[lang][index]
            prompt = record.get("instruction") or record["prompt"]
            handle.write(json.dumps({"id": record["id"], "lang": lang, "prompt": prompt.split("\n")[0][:200],
                                     "chosen": CHOSEN, "rejected": REJECTED, "method": "bench"},
                                    ensure_ascii=False) + "\n")


def measured(command, env=None):
    """Run `command` under a wrapper; returns (stdout, peak RSS of the command in MB)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {})))
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    peak_line = [line for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_KB")][-1]
    return result.stdout, int(peak_line.split()[1]) / 1024


def run_ours(pairs_path, scratch, name, extra_flags=()):
    output = os.path.join(scratch, name)
    command = [sys.executable, os.path.join(REPO, "04_dpo.py"), "--input", pairs_path, "--output", output,
               "--batch-size", str(BATCH), "--grad-accum", "1", "--epochs", "1", "--eval-frac", "0",
               "--save-every", "0", "--max-length", str(MAX_LENGTH), "--lr", str(LR), "--beta", str(BETA)]
    _, peak_mb = measured(command + list(extra_flags))
    with open(os.path.join(output, "train_summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    return {"tokens_per_second": summary["tokens_per_second"], "train_tokens": summary["train_tokens"],
            "steps": summary["steps"], "peak_memory_mb": peak_mb}


def run_in_loop(pairs_path):
    stdout, peak_mb = measured([sys.executable, os.path.abspath(__file__), "--child-in-loop", pairs_path])
    result = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    return dict(result, peak_memory_mb=peak_mb)


def in_loop_child(pairs_path):
    """04's train_step with the reference model in memory, run on each step's micro-batches just before it.
    Also the forward-only rate: the policy's forwards alone on the same micro-batches (the yardstick)."""
    import time
    from types import SimpleNamespace

    import torch
    sys.path.insert(0, REPO)
    import common
    dpo = load_dpo()
    args = SimpleNamespace(loss="sigmoid", beta=BETA, label_smoothing=0.0, nll_weight=0.0, max_length=MAX_LENGTH,
                           batch_size=BATCH, grad_accum=1, max_grad_norm=1.0, lr=LR, weight_decay=0.0,
                           gradient_checkpointing=False, fsdp=False, trust_remote_code=False, lora_rank=0)
    device, _ = common.pick_device()
    tokenizer = common.load_tokenizer(common.EMBEDDED_MODEL)
    examples, _ = dpo.read_examples(pairs_path, args, tokenizer, report=False)
    policy = dpo.load_policy(common.EMBEDDED_MODEL, device, args)
    reference = dpo.load_policy(common.EMBEDDED_MODEL, device, args, train=False).eval()
    optimizer = dpo.make_optimizer(policy, args)
    batches = dpo.epoch_batches([e["length"] for e in examples], BATCH, 0, 0)
    seconds = tokens = 0
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        step_examples = [examples[i] for i in batch]
        with torch.no_grad():  # the in-loop reference: one more forward per micro-batch, every step
            logps = dpo.batch_logps(reference, step_examples).cpu()
        for i, example in enumerate(step_examples):
            example["reference_logps"] = [logps[i].item(), logps[len(step_examples) + i].item()]
        for group in optimizer.param_groups:
            group["lr"] = dpo.learning_rate(step, len(batches), SimpleNamespace(lr=LR, min_lr=0.0, warmup_ratio=0.1,
                                                                                lr_schedule="cosine"))
        metrics = dpo.train_step(policy, optimizer, step_examples, args, 0, 1)
        seconds += time.perf_counter() - started
        tokens += metrics["tokens"]
    forward_tokens, forward_started = 0, time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            dpo.batch_logps(policy, [examples[i] for i in batch])
            forward_tokens += sum(len(ids) for i in batch for ids, _ in examples[i]["sequences"])
    forward_rate = forward_tokens / (time.perf_counter() - forward_started)
    print(json.dumps({"tokens_per_second": tokens / seconds, "train_tokens": tokens, "steps": len(batches),
                      "forward_tokens_per_second": forward_rate}))


def run_trl(trl_python, pairs_path, scratch, checkpointing=False):
    """TRL's DPOTrainer in its own venv; None and a printed reason when that python or trl is missing."""
    if not os.path.exists(trl_python):
        print(f"TRL row skipped: {trl_python} not found (python3 -m venv /tmp/trlvenv && "
              "/tmp/trlvenv/bin/pip install torch==2.13.0 trl)")
        return None
    if subprocess.run([trl_python, "-c", "import trl"], capture_output=True).returncode != 0:
        print(f"TRL row skipped: {trl_python} cannot import trl")
        return None
    sys.path.insert(0, REPO)
    import common
    command = [trl_python, os.path.abspath(__file__), "--child-trl", pairs_path, common.embedded_model_dir(),
               os.path.join(scratch, "trl"), str(int(checkpointing))]
    try:
        stdout, peak_mb = measured(command, env={"HF_DATASETS_CACHE": os.path.join(scratch, "datasets-cache")})
    except RuntimeError as error:  # a newer trl may have renamed a setting: say so, keep the other rows
        print(f"TRL row skipped: {error}")
        return None
    result = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    result.update(tokens_per_second=result["train_tokens"] / result["train_seconds"], peak_memory_mb=peak_mb)
    return result


def trl_child(pairs_path, model_dir, output, checkpointing):
    """Runs inside the TRL venv: DPOTrainer with the same pairs, batch, length and precomputed reference."""
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    with open(pairs_path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": row["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": row["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in rows])

    class StepTimer(TrainerCallback):
        seconds = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.started

    timer = StepTimer()
    config = DPOConfig(output_dir=output, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                       num_train_epochs=1, learning_rate=LR, beta=BETA, max_length=MAX_LENGTH,
                       precompute_ref_log_probs=True, lr_scheduler_type="cosine", warmup_steps=0.1, max_grad_norm=1.0,
                       logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
                       bf16=torch.cuda.is_available(), seed=0, dataloader_num_workers=0, disable_tqdm=True,
                       gradient_checkpointing=checkpointing == "1")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer])
    tokens = sum(2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])
                 for row in trainer.train_dataset)
    trainer.train()
    print(json.dumps({"train_tokens": tokens, "train_seconds": timer.seconds, "steps": trainer.state.global_step}))


def run(quick=False, trl_python=DEFAULT_TRL_PYTHON):
    """All variants, one after the other; returns the table rows."""
    count = 8 if quick else 32
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as scratch:
        pairs_path = os.path.join(scratch, "pairs.jsonl")
        write_pairs(pairs_path, count)
        precomputed = run_ours(pairs_path, scratch, "precomputed")
        in_loop = run_in_loop(pairs_path)
        checkpointed = run_ours(pairs_path, scratch, "checkpointed", ["--gradient-checkpointing"])
        trl = run_trl(trl_python, pairs_path, scratch)
        trl_checkpointed = run_trl(trl_python, pairs_path, scratch, checkpointing=True) if trl else None
    steps = precomputed["steps"]
    rows = [{"stage": "04 dpo", "metric": f"train tokens/s, precomputed vs in-loop reference ({count} pairs, "
                                          f"{steps} steps of {BATCH})",
             "ours": precomputed["tokens_per_second"], "baseline": in_loop["tokens_per_second"],
             "ratio": precomputed["tokens_per_second"] / in_loop["tokens_per_second"],
             "peak_memory_mb": f"{precomputed['peak_memory_mb']:.0f} vs {in_loop['peak_memory_mb']:.0f}"},
            {"stage": "04 dpo", "metric": "train tokens/s / forward-only tokens/s (forward+backward ~3 forwards)",
             "ours": precomputed["tokens_per_second"], "baseline": in_loop["forward_tokens_per_second"],
             "ratio": precomputed["tokens_per_second"] / in_loop["forward_tokens_per_second"],
             "peak_memory_mb": f"{precomputed['peak_memory_mb']:.0f}"}]
    rows.append({"stage": "04 dpo", "metric": "train tokens/s, --gradient-checkpointing vs without (both precomputed)",
                 "ours": checkpointed["tokens_per_second"], "baseline": precomputed["tokens_per_second"],
                 "ratio": checkpointed["tokens_per_second"] / precomputed["tokens_per_second"],
                 "peak_memory_mb": f"{checkpointed['peak_memory_mb']:.0f} vs {precomputed['peak_memory_mb']:.0f}"})
    if trl:
        pairings = [("", precomputed, trl), (", ours with --gradient-checkpointing, TRL without", checkpointed, trl)]
        if trl_checkpointed:
            pairings.append((", both with gradient checkpointing", checkpointed, trl_checkpointed))
        for label, ours, theirs in pairings:
            rows.append({"stage": "04 dpo", "metric": f"train tokens/s vs TRL DPOTrainer, precomputed ref{label} "
                                                      f"({steps} vs {theirs['steps']} steps, {ours['train_tokens']} vs "
                                                      f"{theirs['train_tokens']} tokens)",
                         "ours": ours["tokens_per_second"], "baseline": theirs["tokens_per_second"],
                         "ratio": ours["tokens_per_second"] / theirs["tokens_per_second"],
                         "peak_memory_mb": f"{ours['peak_memory_mb']:.0f} vs {theirs['peak_memory_mb']:.0f} "
                                           f"({ours['peak_memory_mb'] / theirs['peak_memory_mb']:.2f}x)"})
    return rows


LORA_RANKS = (8, 16, 64)


def state_bytes(lora_rank, base_dtype, pairs_path):
    """Bytes of 04's training state after one optimizer step, counted off the live tensors, and the model's
    parameter count: (weights, gradients, AdamW moments, parameters)."""
    from types import SimpleNamespace

    import torch
    sys.path.insert(0, REPO)
    import common
    dpo = load_dpo()
    args = SimpleNamespace(loss="sigmoid", beta=BETA, label_smoothing=0.0, nll_weight=0.0, max_length=MAX_LENGTH,
                           batch_size=BATCH, grad_accum=1, max_grad_norm=1.0, lr=LR, weight_decay=0.0)
    model = common.load_model(common.EMBEDDED_MODEL, torch.device("cpu"), base_dtype)[0].train()
    parameters = sum(p.numel() for p in model.parameters())
    if lora_rank:
        common.add_lora(model, lora_rank, 2.0 * lora_rank)
    examples, _ = dpo.read_examples(pairs_path, args, common.load_tokenizer(common.EMBEDDED_MODEL), report=False)
    for example in examples[:BATCH]:
        example["reference_logps"] = [-100.0, -100.0]
    optimizer = dpo.make_optimizer(model, args)
    # One step, then the gradients as they stand before zero_grad: step and keep them
    loss, _ = dpo.micro_batch_loss(model, examples[:BATCH], args, BATCH, 1)
    loss.backward()
    optimizer.step()
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    weights = size(model.parameters())
    gradients = size(p.grad for p in model.parameters() if p.grad is not None)
    moments = size(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.ndim)
    return weights, gradients, moments, parameters


def load_dpo():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dpo", os.path.join(REPO, "04_dpo.py"))
    dpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dpo)
    return dpo


def run_lora(rounds):
    """Full training against LoRA at each rank, alternated; then the bytes-per-parameter table."""
    import torch
    variants = [("full", [])] + [(f"r{rank}", ["--lora-rank", str(rank)]) for rank in LORA_RANKS]
    results = {name: [] for name, _ in variants}
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as scratch:
        pairs_path = os.path.join(scratch, "pairs.jsonl")
        write_pairs(pairs_path, 32)
        for round_index in range(rounds):
            for name, flags in variants if round_index % 2 == 0 else variants[::-1]:
                results[name].append(run_ours(pairs_path, scratch, f"{name}-{round_index}", flags))
        print(f"\n{'variant':<8} {'train tokens/s':>15} {'vs full':>8} {'peak RSS MB':>12}  (best of {rounds})")
        full = max(r["tokens_per_second"] for r in results["full"])
        for name, _ in variants:
            best = max(r["tokens_per_second"] for r in results[name])
            peak = max(r["peak_memory_mb"] for r in results[name])
            print(f"{name:<8} {best:>15.1f} {best / full:>7.2f}x {peak:>12.0f}")
        print(f"\n{'variant':<8} {'frozen':>8} {'weights':>8} {'grads':>8} {'AdamW':>8} {'total':>8}"
              "   bytes per model parameter, after one step")
        for base_dtype in (torch.float32, torch.bfloat16):
            for name, _ in variants:
                if name == "full" and base_dtype != torch.float32:
                    continue  # full training keeps fp32 master weights on every device
                rank = 0 if name == "full" else int(name[1:])
                weights, gradients, moments, parameters = state_bytes(rank, base_dtype, pairs_path)
                per = [value / parameters for value in (weights, gradients, moments)]
                frozen = str(base_dtype).replace("torch.", "") if rank else "-"
                print(f"{name:<8} {frozen:>8} {per[0]:>8.3f} {per[1]:>8.3f} {per[2]:>8.3f} {sum(per):>8.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 pairs (2 steps) instead of 32 (8 steps)")
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON,
                        help="python of a separate venv with trl installed; its row is skipped when absent")
    parser.add_argument("--child-trl", nargs=4, metavar=("PAIRS", "MODEL_DIR", "OUTPUT", "CHECKPOINTING"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--child-in-loop", metavar="PAIRS", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help="full training against LoRA at rank 8, 16, 64")
    parser.add_argument("--rounds", type=int, default=2, help="--lora: alternated rounds (best of each)")
    args = parser.parse_args()
    if args.lora:
        print(f"command: python bench/bench_dpo.py --lora --rounds {args.rounds}")
        run_lora(args.rounds)
    elif args.child_trl:
        trl_child(*args.child_trl)
    elif args.child_in_loop:
        in_loop_child(args.child_in_loop)
    else:
        print("command: python bench/bench_dpo.py" + (" --quick" if args.quick else "")
              + f" --trl-python {args.trl_python}")
        print(f"{'metric':<100} {'ours':>9} {'baseline':>9} {'ratio':>7}  peak MB")
        for row in run(args.quick, args.trl_python):
            print(f"{row['metric']:<100} {row['ours']:>9.1f} {row['baseline']:>9.1f} {row['ratio']:>6.2f}x  "
                  f"{row['peak_memory_mb']}")
