"""Tests of 04_dpo.py --lora-rank: ln 2 at step 1, PEFT loads what we write and trains as we do, the merge is
exact, and LoRA works with accumulation, checkpointing, resume, DDP/FSDP, the divergence check and SFT."""
import json
import math
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import REPO, make_tiny_model, read_records, run_script, run_torchrun
from test_dpo import BF16, ENV, PAIRS, dpo, kill_after_steps, max_difference, train, weights, write_pairs


LORA = ("--lora-rank", "8")
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """A tiny model whose logits vary (init 0.2), so that an adapter's effect on them is plain to see."""
    return make_tiny_model(tmp_path_factory.mktemp("lora-model"), init_std=0.2)


def adapter_of(output):
    """The adapter weights 04 --lora-rank wrote into `output`."""
    return load_file(output / "adapter" / "adapter_model.safetensors")


def logits_of(model, ids=torch.arange(100, 140)[None]):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("env", [ENV, BF16], ids=["fp32", "bf16"])
def test_step_one_is_ln2_with_lora(tmp_path, lively, env):
    """B starts at zero: the adapted model is the reference, so step 1 is ln 2, in fp32 and under bf16 autocast."""
    output, _ = train(tmp_path, lively, write_pairs(tmp_path / "pairs.jsonl"), "out", *LORA, "--batch-size", "2",
                      "--grad-accum", "2", "--max-steps", "2", "--lr", "1e-2", env=env)
    first, second = read_records(output / "metrics.jsonl")
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["rewards/accuracies"] == 0.0
    assert abs(second["loss"] - math.log(2)) > 1e-4  # and the adapters did train


def test_peft_loads_our_adapter_and_the_merge_is_exact(tmp_path, lively):
    """What 04 --lora-rank 8 --save-merged writes: an adapter in PEFT's format that PEFT loads onto the base, and
    a merged fp32 model in merged/, with the same logits. Layers without an adapter are bit-identical to the base; each adapted
    weight is W + (alpha / rank) B A, by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    output, _ = train(tmp_path, lively, write_pairs(tmp_path / "pairs.jsonl"), "out", *LORA, "--batch-size", "4",
                      "--grad-accum", "1", "--epochs", "2", "--lr", "1e-2", "--save-merged")
    assert sorted(os.listdir(output)) == ["adapter", "merged", "metrics.jsonl", "reference_logps.jsonl", "train_summary.json",
                                          "train_summary.json.lock", "train_summary.json.settings.json"]
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == sorted(ADAPTED) and config["base_model_name_or_path"] == lively
    adapter, base, merged = (load_file(output / "adapter" / "adapter_model.safetensors"),
                             load_file(os.path.join(lively, "model.safetensors")), weights(output / "merged"))
    assert len(adapter) == 2 * 2 * len(ADAPTED)  # A and B, in each of 2 layers
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    assert sorted(merged) == sorted(base) and all(value.dtype == torch.float32 for value in merged.values())
    for name, value in base.items():
        layer = name.removesuffix(".weight")
        if layer.rsplit(".", 1)[-1] in ADAPTED:
            lora_a, lora_b = (adapter[f"base_model.model.{layer}.lora_{x}.weight"] for x in "AB")
            assert lora_b.abs().max() > 0
            assert torch.allclose(merged[name], value + 2.0 * lora_b @ lora_a, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[name], value), name
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lively), output / "adapter")
    ours = AutoModelForCausalLM.from_pretrained(output / "merged")
    base_logits, peft_logits, our_logits = logits_of(AutoModelForCausalLM.from_pretrained(lively)), \
        logits_of(with_peft), logits_of(ours)
    assert (peft_logits - base_logits).abs().max() > 0.1  # the adapter moved the logits ...
    assert (peft_logits - our_logits).abs().max() < 1e-4 * base_logits.abs().max()  # ... as the merge did
    # And our own unmerged adapted model, the LoRA policy every stage loads, agrees with both.
    adapted = common.load_model(str(output), torch.device("cpu"), torch.float32)[0]
    assert (logits_of(adapted) - our_logits).abs().max() < 1e-4 * base_logits.abs().max()


def test_two_steps_through_peft_give_our_adapters(tmp_path, lively):
    """The same two optimizer steps, our loss and data, through PEFT's LoRA layers and through ours (both from
    the same A, B = 0), end with the same adapter weights."""
    from peft import LoraConfig, get_peft_model
    args = dpo.parse_args(["--model", lively, *LORA, "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "2",
                           "--nll-weight", "1", "--weight-decay", "0.1"])
    tokenizer = common.load_tokenizer(lively)
    ours = dpo.load_policy(lively, torch.device("cpu"), args)
    theirs = get_peft_model(common.load_model(lively, torch.device("cpu"), torch.float32)[0],
                            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(ADAPTED)))
    theirs = theirs.get_base_model()  # the model itself, PEFT's LoRA layers inside
    ours_state = dict(ours.named_parameters())
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if ".lora_" in name:
                parameter.copy_(ours_state[name.replace(".default", "")])
    examples, _ = dpo.read_examples(write_pairs(tmp_path / "pairs.jsonl"), args, tokenizer)
    with torch.no_grad():  # the reference: the model before training (B = 0: either one)
        for example in examples:
            example["reference_logps"] = dpo.batch_logps(ours, [example]).tolist()
    for model in (ours, theirs):
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
            sum(p.numel() for n, p in ours.named_parameters() if ".lora_" in n)
        optimizer = dpo.make_optimizer(model, args)
        for step in range(2):
            dpo.train_step(model, optimizer, examples[4 * step:4 * step + 4], args, rank=0, world=1)
    theirs_state = {name.replace(".default", ""): p for name, p in theirs.named_parameters() if ".lora_" in name}
    assert sorted(theirs_state) == sorted(n for n in ours_state if ".lora_" in n)
    assert max((theirs_state[name] - ours_state[name]).abs().max().item() for name in theirs_state) < 1e-6
    assert max(ours_state[name].abs().max().item() for name in theirs_state if "lora_B" in name) > 1e-3  # moved


def test_accumulation_and_checkpointing_are_exact_with_lora(tmp_path, tiny_model):
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    flags = (*LORA, "--lr", "1e-2", "--nll-weight", "1.0", "--epochs", "2", "--warmup-ratio", "0")
    split, _ = train(tmp_path, tiny_model, pairs_file, "split", "--batch-size", "1", "--grad-accum", "4", *flags,
                     "--gradient-checkpointing")
    whole, _ = train(tmp_path, tiny_model, pairs_file, "whole", "--batch-size", "4", "--grad-accum", "1", *flags)
    for a, b in zip(read_records(split / "metrics.jsonl"), read_records(whole / "metrics.jsonl"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert max_difference(adapter_of(split), adapter_of(whole)) < 2e-5
    assert max(value.abs().max().item() for name, value in adapter_of(whole).items() if "lora_B" in name) > 1e-4


def test_lora_checkpoint_holds_the_adapters_and_resumes_exactly(tmp_path, tiny_model):
    """A checkpoint is the adapters and their optimizer state, nothing of the frozen model; a run killed after a
    checkpoint and rerun ends with the weights of a run straight through (and refuses another rank)."""
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    flags = [*LORA, "--batch-size", "1", "--grad-accum", "1", "--epochs", "3", "--lr", "1e-2", "--save-every", "2"]
    straight, _ = train(tmp_path, tiny_model, pairs_file, "straight", *flags)
    killed = tmp_path / "killed"
    command = [sys.executable, os.path.join(REPO, "04_dpo.py"), "--input", pairs_file, "--output", str(killed),
               "--model", tiny_model, "--eval-frac", "0", *flags]
    kill_after_steps(command, killed, ENV)
    checkpoint = dpo.latest_checkpoint(str(killed))
    assert sorted(os.listdir(checkpoint)) == ["adapter", "optimizer.pt", "trainer_state.json"]
    assert sorted(os.listdir(os.path.join(checkpoint, "adapter"))) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    other = run_script("04_dpo.py", *command[2:], "--lora-rank", "4", "--lora-alpha", "16", "--resume", env=ENV)
    assert other.returncode == 2 and "--lora-rank: made with 8, now 4" in other.stderr
    resumed = run_script("04_dpo.py", *command[2:], "--resume", env=ENV, check=True)
    assert "resuming from" in resumed.stdout
    assert max_difference(adapter_of(straight), adapter_of(killed)) == 0.0
    assert [m["loss"] for m in read_records(killed / "metrics.jsonl")] == \
        [m["loss"] for m in read_records(straight / "metrics.jsonl")]


def test_lora_settings_and_bad_flags_name_the_option(tmp_path, tiny_model):
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    flags = ("--batch-size", "4", "--grad-accum", "1", "--max-steps", "1")
    output, _ = train(tmp_path, tiny_model, pairs_file, "out", *LORA, *flags)
    _, other = train(tmp_path, tiny_model, pairs_file, "out", "--lora-rank", "4", "--lora-alpha", "16", *flags,
                     check=False)
    assert other.returncode == 2 and "--lora-rank: made with 8, now 4" in other.stderr
    for bad, says in ((("--lora-rank", "-1"), "--lora-rank -1 is out of range"),
                      (("--lora-rank", "8", "--lora-dropout", "1"), "--lora-dropout 1.0 is out of range"),
                      (("--lora-rank", "8", "--lora-targets", "c_attn"),
                       "--lora-targets c_attn names no linear layer of")):
        _, result = train(tmp_path, tiny_model, pairs_file, "bad", *bad, *flags, check=False)
        assert result.returncode == 2 and says in result.stderr.strip().splitlines()[-1], result.stderr[-500:]
        assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "bad" / "model.safetensors")


def test_lora_divergence_keeps_the_last_good_adapters(tmp_path, tiny_model):
    output, result = train(tmp_path, tiny_model, write_pairs(tmp_path / "pairs.jsonl"), "out", *LORA,
                           "--batch-size", "2", "--grad-accum", "1", "--lr", "1e30", "--warmup-ratio", "0",
                           "--save-every", "1", check=False)
    assert result.returncode == 2 and "not finite" in result.stderr
    assert "last good checkpoint: " in result.stderr and not (output / "train_summary.json").exists()
    good = load_file(output / dpo.latest_checkpoint(str(output)) / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(value).all() for value in good.values())


def test_lora_sft_loss_decreases(tmp_path, tiny_model):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": p, "completion": c}, ensure_ascii=False) + "\n"
                            for i, p, c, _ in PAIRS), encoding="utf-8")
    output, _ = train(tmp_path, tiny_model, str(path), "out", *LORA, "--loss", "sft", "--batch-size", "8",
                      "--grad-accum", "1", "--epochs", "6", "--lr", "1e-2", "--warmup-ratio", "0")
    losses = [record["loss"] for record in read_records(output / "metrics.jsonl")]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1


@pytest.mark.slow
def test_lora_two_processes_match_one(tmp_path, tiny_model):
    """LoRA under DDP and FSDP2 (the adapters shard with their layer) makes one process's update."""
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    flags = [*LORA, "--lr", "1e-2", "--epochs", "2", "--nll-weight", "0.5", "--eval-frac", "0", "--save-every", "3"]
    one, _ = train(tmp_path, tiny_model, pairs_file, "one", "--batch-size", "2", "--grad-accum", "2", *flags)
    for sharding in ("ddp", "fsdp"):
        two = tmp_path / sharding
        result = run_torchrun("04_dpo.py", 2, "--input", pairs_file, "--output", two, "--model", tiny_model,
                              "--batch-size", "1", "--grad-accum", "2", *flags,
                              *(["--fsdp"] if sharding == "fsdp" else []))
        assert result.returncode == 0, result.stderr[-3000:]
        assert max_difference(adapter_of(one), adapter_of(two)) < 2e-5, sharding


def test_lora_block_copies_out_whole(lively):
    """The LoRA section of common.py runs alone in a namespace holding only torch, and adapts a model as the
    project does."""
    from test_scorer import section_source
    source = section_source(os.path.join(REPO, "common.py"), "# LoRA (Hu et al. 2021)", "# A LoRA policy on disk")
    assert "import" not in source
    namespace = {"torch": torch}
    exec(compile(source, "lora-section", "exec"), namespace)
    models = [common.load_model(lively, torch.device("cpu"), torch.float32)[0] for _ in range(2)]
    names = namespace["add_lora"](models[0], 4, 8.0)
    assert common.add_lora(models[1], 4, 8.0) == names and len(names) == 2 * len(ADAPTED)
    for model in models:
        for name in names:
            torch.nn.init.normal_(model.get_submodule(name).lora_B.weight, generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits_of(models[0]), logits_of(models[1]))
    state = {name: value.detach() for name, value in models[0].state_dict().items()}
    merged = namespace["merge_lora"](state, 2.0)
    plain = common.load_model(lively, torch.device("cpu"), torch.float32)[0]
    plain.load_state_dict(merged)
    assert (logits_of(plain) - logits_of(models[0])).abs().max() < 1e-4 * logits_of(plain).abs().max()
