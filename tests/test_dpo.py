"""Tests of 04_dpo.py: the loss by hand, ln 2 at step 1, exact accumulation, resume, DDP/FSDP, bad input."""
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import REPO, read_records, run_script, run_torchrun

spec = importlib.util.spec_from_file_location("dpo", os.path.join(REPO, "04_dpo.py"))
dpo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dpo)

# One thread per process: the tiny model is bound by its 49k-row output layer, and on a busy
# 2-core machine two threads fight each other.
ENV = {"OMP_NUM_THREADS": "1"}

PAIRS = [
    ("es-0", "¿Cuál es la capital de Francia?", "La capital de Francia es París.", "The capital of France is Paris."),
    ("es-1", "Dame un consejo para dormir mejor.", "Intenta acostarte a la misma hora todas las noches.",
     "Try to go to bed at the same time every night."),
    ("de-0", "Wie viele Tage hat eine Woche?", "Eine Woche hat sieben Tage.", "A week has seven days."),
    ("de-1", "Nenne eine Farbe des Himmels.", "Der Himmel ist an klaren Tagen blau.", "Blue, usually."),
    ("fr-0", "Quel est le plus grand océan ?", "Le plus grand océan est l'océan Pacifique.",
     "The Pacific Ocean is the largest one."),
    ("fr-1", "Comment dit-on merci en anglais ?", "En anglais, on dit « thank you ».", "Thank you."),
    ("en-0", "Give one tip for staying healthy.", "Drink plenty of water every day and keep moving.",
     "Bebe mucha agua todos los días."),
    ("en-1", "What is two plus three?", "Two plus three is five.", "Dos más tres son cinco."),
]


def write_pairs(path, pairs=PAIRS):
    with open(path, "w", encoding="utf-8") as handle:
        for pair_id, prompt, chosen, rejected in pairs:
            handle.write(json.dumps({"id": pair_id, "lang": pair_id[:2], "prompt": prompt, "chosen": chosen,
                                     "rejected": rejected, "method": "imbalance"}, ensure_ascii=False) + "\n")
    return str(path)


def train(tmp_path, model, pairs_file, name, *extra, check=True, env=ENV):
    output = tmp_path / name
    result = run_script("04_dpo.py", "--input", pairs_file, "--output", output, "--model", model,
                        "--eval-frac", "0", "--save-every", "0", *extra, env=env, check=check)
    return output, result


BF16 = {**ENV, "LOOP_BF16": "1"}  # the code chooses bf16 and autocast on the CPU, as it would on a GPU


def weights(output):
    return load_file(os.path.join(output, "model.safetensors"))


def max_difference(first, second):
    assert sorted(first) == sorted(second)
    return max((first[name] - second[name]).abs().max().item() for name in first)


def test_dpo_loss_matches_hand_computation():
    policy_chosen = torch.tensor([-10.0, -20.0], dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor([-12.0, -15.0], dtype=torch.float64)
    reference_chosen = torch.tensor([-11.0, -19.0], dtype=torch.float64)
    reference_rejected = torch.tensor([-11.0, -16.0], dtype=torch.float64)
    beta = 0.5
    deltas = [(-10 + 11) - (-12 + 11), (-20 + 19) - (-15 + 16)]  # [2, -2]
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    args = (policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)

    loss, chosen_rewards, rejected_rewards = dpo.dpo_loss(*args)
    assert loss.item() == pytest.approx(sum(-log_sigmoid(beta * d) for d in deltas) / 2, abs=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([0.5, -0.5])
    assert rejected_rewards.tolist() == pytest.approx([-0.5, 0.5])
    loss.backward()  # d/d policy_chosen_i = -beta * sigmoid(-beta delta_i) / 2
    assert policy_chosen.grad.tolist() == pytest.approx([-beta / (1 + math.exp(beta * d)) / 2 for d in deltas])

    smoothed, _, _ = dpo.dpo_loss(*args, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(
        sum(-0.9 * log_sigmoid(beta * d) - 0.1 * log_sigmoid(-beta * d) for d in deltas) / 2, abs=1e-12)
    assert dpo.dpo_loss(*args, loss_type="ipo")[0].item() == pytest.approx(((2 - 1) ** 2 + (-2 - 1) ** 2) / 2)
    assert dpo.dpo_loss(*args, loss_type="hinge")[0].item() == pytest.approx((0 + 2) / 2)

    counts = torch.tensor([4, 5])
    with_nll, _, _ = dpo.dpo_loss(*args, nll_weight=0.5, chosen_token_counts=counts)
    assert with_nll.item() == pytest.approx(loss.item() + 0.5 * (10 + 20) / 9, abs=1e-12)
    # Under accumulation the sums are divided by the WHOLE step's counts, not the micro-batch's.
    scaled, _, _ = dpo.dpo_loss(*args, nll_weight=0.5, chosen_token_counts=counts, pairs_in_batch=8,
                                tokens_in_batch=36)
    assert scaled.item() == pytest.approx(loss.item() * 2 / 8 + 0.5 * 30 / 36, abs=1e-12)


def test_chunked_output_layer_matches_whole_logits(lively_model):
    """response_logps applies the output layer a few positions at a time, recomputed in backward;
    values and gradients must equal a plain full-logits log_softmax written here."""
    import common
    model, tokenizer = common.load_model(lively_model)
    sequences = [common.tokenize_prompt_response(tokenizer, prompt, response)
                 for _, prompt, chosen, rejected in PAIRS[:3] for response in (chosen, rejected)]

    def logps_and_gradient(compute):
        model.zero_grad()
        logps = compute()
        (logps * torch.arange(1.0, len(logps) + 1, dtype=logps.dtype)).sum().backward()  # rows weigh differently
        return logps.detach(), model.get_output_embeddings().weight.grad.clone()

    def whole_logits():  # the textbook way: full [n, length, vocab] log-softmax
        input_ids, attention_mask = common.pad_right([ids for ids, _ in sequences], tokenizer.pad_token_id)
        log_probs = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits.double(), -1)
        return torch.stack([log_probs[row, torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])].sum()
                            for row, (ids, start) in enumerate(sequences)])
    expected, expected_gradient = logps_and_gradient(whole_logits)
    for chunk in (5, 10_000):  # many chunks; one
        logps, gradient = logps_and_gradient(lambda: common.response_logps(model, sequences, chunk_rows=chunk))
        assert torch.allclose(logps, expected, atol=1e-4), chunk
        assert (gradient - expected_gradient).abs().max() < 1e-5 * expected_gradient.abs().max(), chunk
    assert expected.std() > 1  # the rows differ: a mix-up between them would show


def test_step_one_loss_is_ln2_and_outputs_load(tmp_path, tiny_model):
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    output, result = train(tmp_path, tiny_model, pairs_file, "out", "--batch-size", "4", "--grad-accum", "1",
                           "--lr", "1e-3", "--max-steps", "1")
    first = read_records(output / "metrics.jsonl")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-5
    assert abs(first["rewards/margins"]) < 1e-5 and first["rewards/accuracies"] == 0.0
    for name in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "learning_rate",
                 "grad_norm", "num_tokens", "tokens/s"):
        assert name in first
    assert "lr" not in first and "tokens" not in first  # TRL's names, and num_tokens counts from the start
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["steps"] == 1 and summary["train_pairs"] == 8 and summary["reference_scored_now"] == 8
    assert summary["tokens_per_second"] > 0
    assert "04_dpo: steps 1, pairs 8" in result.stdout
    assert not [name for name in os.listdir(output) if name.startswith("checkpoint") or name.endswith(".tmp")]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoTokenizer.from_pretrained(output)
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    assert reloaded.config.tie_word_embeddings
    # Rerunning a complete run does nothing; a changed pair gets its reference rescored, the rest are cached.
    same = ["--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3", "--max-steps", "1"]
    again, _ = train(tmp_path, tiny_model, pairs_file, "out", *same)
    assert "is complete" in _.stdout
    other = run_script("04_dpo.py", "--input", pairs_file, "--output", output, "--model", tiny_model, env=ENV)
    assert other.returncode == 2 and "--eval-frac: made with 0.0, now 0.05" in other.stderr  # complete only if the same
    os.remove(output / "train_summary.json")
    changed = [PAIRS[0][:3] + ("The capital is Paris, of course.",)] + PAIRS[1:]
    output, _ = train(tmp_path, tiny_model, write_pairs(tmp_path / "pairs.jsonl", changed), "out",
                      "--batch-size", "4", "--grad-accum", "1", "--max-steps", "1")
    assert json.loads((output / "train_summary.json").read_text())["reference_scored_now"] == 1


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_policy_and_reference_are_scored_alike(tmp_path, architecture):
    """One scorer for policy and reference, the model's final logit transform included (Gemma 2 soft-caps):
    step 1 is ln 2 with accuracy 0, and the policy's differentiable log-probs equal common.score's and the
    model's own full logits'."""
    import common
    from conftest import make_tiny_model
    model_dir = make_tiny_model(tmp_path / architecture, architecture=architecture, init_std=0.2)
    output, _ = train(tmp_path, model_dir, write_pairs(tmp_path / "pairs.jsonl"), "out", "--batch-size", "4",
                      "--grad-accum", "1", "--max-steps", "1", "--lr", "1e-3")
    first = read_records(output / "metrics.jsonl")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-5 and first["rewards/accuracies"] == 0.0
    model, tokenizer = common.load_model(model_dir)
    prompts, responses = [p for _, p, _, _ in PAIRS], [c for _, _, c, _ in PAIRS]
    sequences = [common.tokenize_prompt_response(tokenizer, p, r) for p, r in zip(prompts, responses)]
    policy = common.response_logps(model, sequences)  # gradients on: the training path
    assert policy.requires_grad
    scored, _ = common.score(model, tokenizer, prompts, responses, token_budget=64, show_progress=False)
    assert (policy.detach() - scored).abs().max() < 1e-5
    def own_logps():  # the model's own full logits, log-softmax in float64, one sequence at a time
        with torch.no_grad():
            return torch.tensor([model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)[
                torch.arange(start - 1, len(ids) - 1), torch.tensor(ids[start:])].sum() for ids, start in sequences],
                dtype=torch.float64)
    assert (policy.detach() - own_logps()).abs().max() < 1e-4
    if architecture == "gemma2":  # the cap shapes these numbers: without it the model's log-probs are far off
        model.config.final_logit_softcapping = None
        assert (policy.detach() - own_logps()).abs().max() > 1.0


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_step_one_is_ln2_in_bf16_too(tmp_path, architecture):
    """In bf16 the log-probs depend on padding and batch shape; the reference is scored in the policy's own
    micro-batches (here 2 pairs each, padded differently), so step 1 is still exactly ln 2 with accuracy 0."""
    from conftest import make_tiny_model
    model_dir = make_tiny_model(tmp_path / architecture, architecture=architecture, init_std=0.2)
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    flags = ("--batch-size", "2", "--grad-accum", "2", "--max-steps", "1", "--lr", "1e-3")
    bf16, _ = train(tmp_path, model_dir, pairs_file, "bf16", *flags, env=BF16)
    first = read_records(bf16 / "metrics.jsonl")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["rewards/accuracies"] == 0.0
    assert abs(first["rewards/margins"]) < 1e-6
    fp32, _ = train(tmp_path, model_dir, pairs_file, "fp32", *flags)
    assert abs(read_records(fp32 / "metrics.jsonl")[0]["logps/chosen"] - first["logps/chosen"]) > 1e-3  # bf16 ran


def test_accumulation_is_exact(tmp_path, tiny_model):
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    common = ("--lr", "1e-3", "--nll-weight", "1.0", "--epochs", "2", "--warmup-ratio", "0")
    # Gradient checkpointing recomputes the same activations, so it must not change a thing either.
    split, _ = train(tmp_path, tiny_model, pairs_file, "split", "--batch-size", "1", "--grad-accum", "4", *common,
                     "--gradient-checkpointing")
    whole, _ = train(tmp_path, tiny_model, pairs_file, "whole", "--batch-size", "4", "--grad-accum", "1", *common)
    # Adam hides a uniform loss scale, so compare the logged loss and gradient norm too.
    for a, b in zip(read_records(split / "metrics.jsonl"), read_records(whole / "metrics.jsonl"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["nll_loss"] == pytest.approx(b["nll_loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert max_difference(weights(split), weights(whole)) < 2e-5


def test_overfits_eight_pairs(tmp_path, tiny_model):
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    output, result = train(tmp_path, tiny_model, pairs_file, "out", "--batch-size", "4", "--grad-accum", "1",
                           "--epochs", "12", "--lr", "5e-3", "--beta", "0.5")
    metrics = read_records(output / "metrics.jsonl")
    assert metrics[0]["rewards/accuracies"] == 0.0  # policy == reference: every margin is 0
    assert metrics[-1]["rewards/accuracies"] == 1.0 and metrics[-1]["rewards/margins"] > 1.0


def test_eval_pairs_that_were_trained_on_are_refused(tmp_path, tiny_model):
    """Rows trained on would be reported as held out (accuracy 0 -> 1 on what it learnt): one line, nothing written."""
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    held_out = write_pairs(tmp_path / "eval.jsonl", PAIRS[:1] + [("xx", "Another prompt.", "Yes.", "No.")])
    for eval_file, count in ((pairs_file, "8 of its 8"), (held_out, "1 of its 2")):
        output, result = train(tmp_path, tiny_model, pairs_file, "out", "--eval-pairs", eval_file, check=False)
        assert result.returncode == 2
        assert result.stderr.strip() == (f"error: --eval-pairs: {count} rows are also in --input {pairs_file} (first: "
                                          f"{eval_file}:1); give pairs held out of training")
        assert not output.exists()


def kill_after_steps(command, output, env, steps=7):
    """Start a 04 `command` and SIGKILL it once `output`/metrics.jsonl has `steps` steps (mid-run, after a
    checkpoint); fails if the run ended before it could be killed."""
    process = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, **env), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics, deadline = output / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.parametrize("env", [ENV, BF16], ids=["fp32", "bf16"])
def test_kill_and_resume_gives_the_same_weights(tmp_path, tiny_model, env):
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    flags = ["--batch-size", "1", "--grad-accum", "1", "--epochs", "3", "--lr", "1e-3", "--save-every", "2"]
    straight, _ = train(tmp_path, tiny_model, pairs_file, "straight", *flags, env=env)

    killed = tmp_path / "killed"
    command = [sys.executable, os.path.join(REPO, "04_dpo.py"), "--input", pairs_file, "--output", str(killed),
               "--model", tiny_model, "--eval-frac", "0", *flags]
    kill_after_steps(command, killed, env)
    assert not (killed / "train_summary.json").exists()

    changed = run_script("04_dpo.py", *command[2:], "--lr", "2e-3", env=env)
    assert changed.returncode == 2 and "--lr: made with 0.001, now 0.002" in changed.stderr  # a checkpoint refuses other settings
    resumed = run_script("04_dpo.py", *command[2:], env=env, check=True)
    assert "resuming from" in resumed.stdout
    assert max_difference(weights(straight), weights(killed)) == 0.0
    straight_losses = [record["loss"] for record in read_records(straight / "metrics.jsonl")]
    assert [record["loss"] for record in read_records(killed / "metrics.jsonl")] == straight_losses
    assert len(straight_losses) == 24


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_model):
    """Same global batch (4 pairs) as 1 process x 2 x accumulation 2, and as 2 processes (DDP, FSDP) x 1 x 2.

    Held-out pairs are scored before training: forwards without gradients must not disturb FSDP's shards."""
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    flags = ["--lr", "1e-3", "--epochs", "2", "--nll-weight", "0.5", "--eval-pairs",
             write_pairs(tmp_path / "eval.jsonl", [(i, p + " Briefly.", c, r) for i, p, c, r in PAIRS])]  # held out
    one, _ = train(tmp_path, tiny_model, pairs_file, "one", "--batch-size", "2", "--grad-accum", "2", *flags)
    for sharding in ("ddp", "fsdp"):
        two = tmp_path / sharding
        result = run_torchrun("04_dpo.py", 2, "--input", pairs_file, "--output", two, "--model", tiny_model,
                              "--eval-frac", "0", "--save-every", "0", "--batch-size", "1", "--grad-accum", "2",
                              *flags, *(["--fsdp"] if sharding == "fsdp" else []))
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((two / "train_summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 4
        assert max_difference(weights(one), weights(two)) < 2e-5, sharding
        for a, b in zip(read_records(one / "metrics.jsonl"), read_records(two / "metrics.jsonl"), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), sharding


def test_bad_pairs_name_file_and_line(tmp_path, tiny_model):
    def rows_file(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        return str(path)
    good = {"prompt": "Say hello.", "chosen": "Hola.", "rejected": "Hello."}
    # One through the command line (exit code 2, one line, nothing written), the others directly.
    missing = rows_file("missing.jsonl", [good, {"prompt": "Hi.", "chosen": "Hola."}])
    output, result = train(tmp_path, tiny_model, missing, "missing.out", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.jsonl'}:2: missing field 'rejected'"
    assert not output.exists()
    args = dpo.argparse.Namespace(loss="sigmoid", max_length=1024)
    tokenizer = dpo.common.load_tokenizer(tiny_model)
    for name, rows, message in [("empty.jsonl", [good, good, dict(good, chosen="")], ":3: field 'chosen' is empty"),
                                ("blank.jsonl", [dict(good, rejected="   ")],
                                 ":1: field 'rejected' must be a non-empty string or one turn of messages "
                                 "(roles assistant)")]:
        with pytest.raises(dpo.common.InputError) as error:
            dpo.read_examples(rows_file(name, rows), args, tokenizer)
        assert str(error.value) == f"{tmp_path / name}{message}"

    rows = [{"prompt": p, "chosen": c, "rejected": r} for _, p, c, r in PAIRS]
    rows.insert(2, {"prompt": "Explain this. " * 40, "chosen": "Sure.", "rejected": "No."})
    rows.insert(5, {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "Yes."})
    path = rows_file("long.jsonl", rows)
    output, result = train(tmp_path, tiny_model, path, "long.out", "--max-length", "80", "--batch-size", "4",
                           "--grad-accum", "1", "--max-steps", "1")
    assert f"skipped 1 of 10 rows, longer than --max-length 80 tokens (first: {path}:3)" in result.stdout
    assert f"skipped 1 of 10 rows, chosen == rejected (first: {path}:6)" in result.stdout
    summary = json.loads((output / "train_summary.json").read_text())
    assert summary["skipped"]["train"] == {"too_long": 1, "identical": 1} and summary["train_pairs"] == 8


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model):
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    output, result = train(tmp_path, tiny_model, pairs_file, "out", "--batch-size", "2", "--grad-accum", "1",
                           "--lr", "1e30", "--warmup-ratio", "0", "--save-every", "1", check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "step 2:" in last and "nan" in last and f"last good checkpoint: {output / 'checkpoint-1'}" in last
    assert os.path.exists(output / "checkpoint-1" / "model.safetensors")
    assert not (output / "train_summary.json").exists()


def test_sft_loss_decreases(tmp_path, tiny_model):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": p, "completion": c}, ensure_ascii=False) + "\n"
                            for i, p, c, _ in PAIRS), encoding="utf-8")
    output, _ = train(tmp_path, tiny_model, str(path), "out", "--loss", "sft", "--batch-size", "8", "--grad-accum", "1",
                      "--epochs", "6", "--lr", "3e-3", "--warmup-ratio", "0")
    losses = [record["loss"] for record in read_records(output / "metrics.jsonl")]
    assert len(losses) == 6 and losses[0] == pytest.approx(math.log(49152), abs=1.0)  # random init: ~uniform
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and losses[-1] < losses[0] - 1.0


def test_a_reward_tie_within_float_noise_is_not_a_win():
    """Step 1, policy == reference: margins are float noise (here 1e-5 on log-probs of -150) and win nothing."""
    policy_chosen, policy_rejected = torch.tensor([-150.0, -150.0, -80.0]), torch.tensor([-120.0, -90.0, -60.0])
    chosen_rewards = 0.1 * torch.tensor([1e-5, -1e-5, 0.5])  # beta * (policy - reference)
    rejected_rewards = torch.zeros(3)
    assert dpo.wins(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected, 0.1).item() == 1.0
    assert dpo.wins(rejected_rewards, chosen_rewards, policy_rejected, policy_chosen, 0.1).item() == 0.0


def test_trl_conversational_pairs_train_exactly_as_plain_ones(tmp_path, tiny_model):
    """03 --conversational writes TRL's form (prompt and answers as chat messages); 04 reads it as the same pairs:
    the same step-1 log-probs and the same update. A row in neither form stops at its line."""
    plain = write_pairs(tmp_path / "plain.jsonl")
    rows = read_records(plain)
    with open(tmp_path / "chat.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(common.conversational(row), ensure_ascii=False) + "\n" for row in rows)
    assert read_records(tmp_path / "chat.jsonl")[0]["chosen"] == [{"role": "assistant", "content": rows[0]["chosen"]}]
    flags = ["--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3", "--max-steps", "2"]
    plain_out, _ = train(tmp_path, tiny_model, plain, "plain", *flags)
    chat_out, _ = train(tmp_path, tiny_model, str(tmp_path / "chat.jsonl"), "chat", *flags)
    for name in ("loss", "logps/chosen", "logps/rejected"):
        assert [m[name] for m in read_records(chat_out / "metrics.jsonl")] == \
            [m[name] for m in read_records(plain_out / "metrics.jsonl")]
    bad = dict(rows[1], prompt=[{"role": "assistant", "content": "hi"}])
    with open(tmp_path / "bad.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in (rows[0], bad))
    _, result = train(tmp_path, tiny_model, str(tmp_path / "bad.jsonl"), "bad", check=False)
    assert result.returncode == 2 and "bad.jsonl:2: field 'prompt' must be" in result.stderr
