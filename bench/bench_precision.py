"""Why the implicit reward (03) is scored in fp32 on every device: what bf16 does to it.

A DPO model a few steps from its reference differs from it by less than bf16 resolves, and the implicit
reward is the difference of the two models' log-probs. Measured on the embedded SmolLM2-135M:
  1. 04 trains it 5 DPO steps at lr 5e-7 (fp32) on 40 pairs; the share of weights that differ from the
     reference, in fp32 and once both are rounded to bf16.
  2. 20 prompts x 3 answers scored with the trained model and the reference, fp32 weights against bf16
     weights: the median |reward|, the median error of the bf16 reward, how many of the 60 answer orders
     flip, how many best/worst picks change.
  3. The same through 03_reward.py --method implicit, plainly and with LOOP_BF16=1 (the code choosing bf16
     as it would on a GPU): the picks must be the same, because 03 loads both models in fp32 by policy.

    python bench/bench_precision.py     # about 3 minutes on 2 CPU cores
"""
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return path


def run(command, env=None):
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, **(env or {})))
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])


def main():
    prompts = common.load_prompts(os.path.join(REPO, "data", "prompts"), langs=["en", "es", "de", "fr"])
    with tempfile.TemporaryDirectory() as scratch:
        # 1. A DPO model 5 steps from its reference.
        pairs = write_jsonl(os.path.join(scratch, "pairs.jsonl"), [
            {"id": p["id"], "lang": p["lang"], "prompt": p["prompt"], "chosen": f"Here is a careful answer: {p['prompt']}",
             "rejected": "I do not know."} for p in prompts[:40]])
        trained = os.path.join(scratch, "trained")
        run([os.path.join(REPO, "04_dpo.py"), "--input", pairs, "--output", trained, "--eval-frac", "0",
             "--batch-size", "4", "--grad-accum", "2", "--max-steps", "5", "--epochs", "1", "--lr", "5e-7",
             "--warmup-ratio", "0", "--save-every", "0"])
        policy, tokenizer = common.load_model(trained, dtype=torch.float32)
        reference, _ = common.load_model(common.EMBEDDED_MODEL, dtype=torch.float32)
        differ = [(p != r).float().mean().item() * p.numel() for p, r in zip(policy.parameters(), reference.parameters())]
        rounded = [(p.bfloat16() != r.bfloat16()).float().mean().item() * p.numel()
                   for p, r in zip(policy.parameters(), reference.parameters())]
        total = sum(p.numel() for p in policy.parameters())
        print(f"weights that differ from the reference: fp32 {100 * sum(differ) / total:.1f}%, "
              f"after rounding both to bf16 {100 * sum(rounded) / total:.1f}%")
        # 2. Rewards of 20 prompts x 3 answers, fp32 against bf16 weights.
        questions = prompts[40:60]
        answers = [[prompts[(60 + 3 * k + j) % len(prompts)]["prompt"] for j in range(3)] for k in range(20)]
        flat_prompts = [q["prompt"] for q in questions for _ in range(3)]
        flat_answers = [a for row in answers for a in row]
        rewards = {}
        for dtype in (torch.float32, torch.bfloat16):
            logps = [common.score(model.to(dtype), tokenizer, flat_prompts, flat_answers, show_progress=False)[0]
                     for model in (policy, reference)]
            rewards[dtype] = (logps[0] - logps[1]).numpy().reshape(20, 3)
        fp32, bf16 = rewards[torch.float32], rewards[torch.bfloat16]
        orders = sum(np.sign(fp32[:, i] - fp32[:, j]) != np.sign(bf16[:, i] - bf16[:, j])
                     for i, j in ((0, 1), (0, 2), (1, 2))).sum()
        picks = int(((fp32.argmax(1) != bf16.argmax(1)) | (fp32.argmin(1) != bf16.argmin(1))).sum())
        print(f"reward = log pi_dpo - log pi_ref on 60 answers: median |reward| fp32 {np.median(np.abs(fp32)):.3f}, "
              f"bf16 {np.median(np.abs(bf16)):.3f}; median bf16 error {np.median(np.abs(bf16 - fp32)):.3f}; "
              f"{orders} of 60 answer orders flip; {picks} of 20 best/worst picks change")
        # 3. 03 itself, plainly and with the code choosing bf16 as on a GPU.
        records = [{"id": f"q{k}", "lang": lang, "prompt": questions[k]["prompt"], "responses": answers[k]}
                   for k in range(20) for lang in ("en", "es")]
        source = write_jsonl(os.path.join(scratch, "responses.jsonl"), records)
        picked = {}
        for name, env in (("fp32", {}), ("LOOP_BF16=1", {"LOOP_BF16": "1"})):
            output = os.path.join(scratch, f"pairs-{len(env)}.jsonl")
            run([os.path.join(REPO, "03_reward.py"), "--method", "implicit", "--input", source, "--output", output,
                 "--dpo-model", trained, "--ref-model", common.EMBEDDED_MODEL, "--alpha", "0"], env)
            with open(output, encoding="utf-8") as handle:
                picked[name] = [(row["id"], row["lang"], row["chosen_sample"], row["rejected_sample"], row["chosen_reward"])
                                for row in map(json.loads, handle)]
        same = picked["fp32"] == picked["LOOP_BF16=1"]
        print(f"03_reward.py --method implicit under LOOP_BF16=1: {len(picked['fp32'])} pairs, picks and rewards "
              f"{'identical to' if same else 'DIFFERENT from'} the fp32 run")
    print("command: python bench/bench_precision.py")


if __name__ == "__main__":
    main()
