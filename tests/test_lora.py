"""Tests of 04_dpo.py --lora-rank: ln 2 at step 1, PEFT loads what we write and trains as we do, the merge is
exact, and LoRA works with accumulation, checkpointing, resume, DDP/FSDP, the divergence check and SFT."""
import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path

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


def updates(adapter, scaling=2.0):
    """{layer: (alpha / rank) B A}, the update each adapted layer adds to its weight."""
    return {name.removesuffix(".lora_A.weight"): scaling * adapter[name.replace("lora_A", "lora_B")] @ value
            for name, value in adapter.items() if "lora_A" in name}


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
    assert max_difference(updates(adapter_of(split)), updates(adapter_of(whole))) < 2e-5
    assert max(value.abs().max().item() for value in updates(adapter_of(whole)).values()) > 1e-4


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
    other = run_script("04_dpo.py", *command[2:], "--lora-rank", "4", "--lora-alpha", "16", env=ENV)
    assert other.returncode == 2 and "--lora-rank: made with 8, now 4" in other.stderr
    resumed = run_script("04_dpo.py", *command[2:], env=ENV, check=True)
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
    no_layer = " (the output layer and embeddings are not adapted)"
    for bad, says in ((("--lora-rank", "-1"), "--lora-rank -1 is out of range"),
                      (("--lora-rank", "8", "--lora-dropout", "0.1"), "unrecognized arguments: --lora-dropout 0.1"),
                      (("--lora-rank", "8", "--lora-targets", "c_attn"),
                       "--lora-rank 8 --lora-targets c_attn: no linear layer of the model is named 'c_attn'" + no_layer),
                      (("--lora-rank", "4", "--lora-targets", "q_proj,vproj"), "named 'vproj'" + no_layer),
                      (("--lora-rank", "4", "--lora-targets", "lm_head"), "named 'lm_head'" + no_layer),
                      (("--lora-rank", "4", "--lora-targets", "embed_tokens,q_proj"), "named 'embed_tokens'" + no_layer),
                      (("--lora-rank", "4", "--lora-targets", ""), "--lora-targets : no linear layer of the model is named ''"),
                      (("--lora-rank", "33",), "rank 33 is above 32, the smallest adapted layer's min(in, out): it adds nothing"),
                      (("--lora-rank", "0", "--lora-alpha", "8"), "--lora-alpha applies to LoRA only: add --lora-rank"),
                      (("--lora-targets", "q_proj",), "--lora-targets applies to LoRA only"),
                      (("--save-merged",), "--save-merged applies to LoRA only")):
        _, result = train(tmp_path, tiny_model, pairs_file, "bad", *bad, *flags, check=False)
        assert result.returncode == 2 and result.stderr.endswith(says + "\n") if says.endswith(")") else \
            result.returncode == 2 and says in result.stderr.strip().split("\n")[-1], result.stderr[-500:]
        assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "bad")  # nothing written


@pytest.mark.parametrize("cut", ["adapter/adapter_model.safetensors", "optimizer.pt"])
def test_a_cut_checkpoint_file_is_one_line_before_any_work(tmp_path, tiny_model, cut):
    """A resume reads the checkpoint's adapter and optimizer state: each is checked whole first; one line names
    the file, and the checkpoint (and everything else in the output) is left as it was."""
    flags = [*LORA, "--batch-size", "1", "--grad-accum", "1", "--epochs", "3", "--save-every", "2"]
    output = tmp_path / "out"
    command = [sys.executable, os.path.join(REPO, "04_dpo.py"), "--input", write_pairs(tmp_path / "pairs.jsonl"),
               "--output", str(output), "--model", tiny_model, "--eval-frac", "0", *flags]
    kill_after_steps(command, output, ENV, steps=3)
    checkpoint = dpo.latest_checkpoint(str(output))
    path = Path(checkpoint) / cut
    path.write_bytes(path.read_bytes()[:-100])
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    result = run_script(*command[1:], env=ENV)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith(f"error: {checkpoint}: {os.path.basename(cut)} is missing, cut short or damaged (")
    assert last.endswith(f"); delete {checkpoint} to train from the start"), last
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before


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
        assert max_difference(updates(adapter_of(one)), updates(adapter_of(two))) < 2e-5, sharding


def test_lora_block_copies_out_whole(lively):
    """The LoRA section of common.py runs alone in a namespace holding only torch, adapts a model as the project
    does, and merges the adapter into the plain model's weights."""
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


# ----------------------------------------------------------------------------
# A LoRA policy (an iteration's output folder) in the stages after it: its base, frozen in the run's precision,
# plus its fp32 adapter, unmerged; and the next iteration trains on that adapter.

spec = importlib.util.spec_from_file_location("reward", os.path.join(REPO, "03_reward.py"))
reward = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reward)


@pytest.fixture(scope="module")
def iterations(tmp_path_factory, lively):
    """loop.sh's two LoRA iterations under LOOP_BF16=1 (a GPU's path), merged copies on request: iteration 1
    with a small update (most of it below bf16's step at the weights' size), iteration 2 trained on from it."""
    root = tmp_path_factory.mktemp("lora-iterations")
    pairs_file = write_pairs(root / "pairs.jsonl")
    flags = (*LORA, "--batch-size", "4", "--grad-accum", "1", "--epochs", "2", "--save-merged")
    first, _ = train(root, lively, pairs_file, "iter1", *flags, "--lr", "1e-4", env=BF16)
    second, _ = train(root, str(first), pairs_file, "iter2", *flags, "--lr", "1e-2", env=BF16)
    return str(first), str(second)


def test_each_stage_loads_a_lora_policy_as_its_base_plus_its_fp32_adapter(iterations, lively, monkeypatch):
    """Under LOOP_BF16=1, 01/02 (check_engine), 03 (load_scorers: fp32), 04's next iteration (load_policy) and 05
    (load_generator) hold the base's weights as they were (bf16) and the adapter exactly as trained (fp32); the
    update each adapted layer adds is (alpha / rank) B A in full. Merged into bf16 weights, most of it is lost."""
    monkeypatch.setenv("LOOP_BF16", "1")
    policy = iterations[0]
    eval05 = importlib.util.module_from_spec(importlib.util.spec_from_file_location("e", f"{REPO}/05_eval.py"))
    eval05.__spec__.loader.exec_module(eval05)
    loaded = {"01/02": (common.check_engine(policy)()[0], torch.bfloat16),
              "03": (reward.load_scorers(policy, lively)[0][0], torch.float32),
              "04": (dpo.load_policy(policy, torch.device("cpu"), dpo.parse_args(["--model", policy, *LORA])),
                     torch.bfloat16),
              "05": (eval05.load_generator({"model": policy}, eval05.parse_args([]))["model"], torch.bfloat16)}
    base, adapter = load_file(os.path.join(lively, "model.safetensors")), adapter_of(Path(policy))
    for stage, (model, base_dtype) in loaded.items():
        state = model.state_dict()
        assert all(torch.equal(state[name.removeprefix(common.PEFT_PREFIX)], value) for name, value in adapter.items())
        assert all(torch.equal(state[name], value.to(base_dtype)) for name, value in base.items()), stage
    lost = []
    for name, layer in loaded["05"][0].named_modules():
        if hasattr(layer, "lora_A"):
            update = layer.lora_scaling * layer.lora_B.weight @ layer.lora_A.weight  # [out, in], fp32
            unit_inputs = torch.eye(layer.in_features)
            added = common.lora_forward(layer, (unit_inputs,), torch.zeros(layer.in_features, layer.out_features))
            assert torch.allclose(added, update.T, rtol=1e-5, atol=1e-9 * update.abs().max().item()), name
            weight = base[f"{name}.weight"]
            kept = (weight + update).bfloat16().float() - weight.bfloat16().float()  # merged, then rounded
            lost.append(((kept - update).norm() / update.norm()).item())
    assert len(lost) == 2 * len(ADAPTED) and min(lost) > 0.5  # rounding the merge loses over half of each update


def test_03_on_one_base_gives_the_two_model_reward(tmp_path, iterations, lively):
    """The implicit reward of iteration 2 against iteration 1 (and of 1 against the base), from ONE base with
    the two adapters taking turns, equals the reward from the two merged fp32 models loaded whole."""
    first, second = iterations
    scorers = reward.load_scorers(second, first)
    assert scorers[0][0] is scorers[1][0]  # one model in memory
    samples = tmp_path / "samples.jsonl"
    run_script("01_generate.py", "--model", lively, "--prompts", os.path.join(REPO, "data", "prompts"), "--langs",
               "en,es", "--limit", "3", "--max-new-tokens", "8", "--num-samples", "3", "--temperature", "0.9",
               "--output", samples, env=ENV, check=True)
    for case, (dpo_model, ref_model) in enumerate(((second, first), (first, lively))):
        scores = []
        for merged in ("", "/merged"):  # the base itself has no merged copy
            output = tmp_path / f"pairs-{case}{merged.replace('/', '-')}.jsonl"
            run_script("03_reward.py", "--method", "implicit", "--input", samples, "--output", output,
                       "--dpo-model", dpo_model + merged, "--ref-model", ref_model + merged * (ref_model != lively),
                       "--keep-truncated", env=ENV, check=True)
            scores.append([torch.tensor(r["dpo_logps"] + r["ref_logps"], dtype=torch.float64)
                           for r in read_records(str(output).replace(".jsonl", ".scores.jsonl"))])
        one_base, two_models = torch.cat(scores[0]), torch.cat(scores[1])
        assert (one_base - two_models).abs().max() < 1e-6 * two_models.abs().max(), (dpo_model, ref_model)


def test_a_second_iteration_starts_exactly_where_the_first_ended(tmp_path, iterations, lively):
    """Iteration 2 trains on iteration 1's adapter under LOOP_BF16=1: step 1 is ln 2, and with a learning rate
    too small to move an fp32 weight (1e-30) its adapter is iteration 1's bit for bit (nothing rounded to
    bf16 on the way), naming the same base. Other LoRA flags than those that made it are refused."""
    first = iterations[0]
    output, _ = train(tmp_path, first, write_pairs(tmp_path / "pairs.jsonl"), "iter2", *LORA, "--batch-size", "4",
                      "--grad-accum", "1", "--max-steps", "1", "--lr", "1e-30", env=BF16)
    assert abs(read_records(output / "metrics.jsonl")[0]["loss"] - math.log(2)) < 1e-6
    before, after = adapter_of(Path(first)), adapter_of(output)
    assert sorted(before) == sorted(after) and all(torch.equal(before[name], after[name]) for name in before)
    assert json.loads((output / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == lively
    assert sorted(os.listdir(output)) == ["adapter", "metrics.jsonl", "reference_logps.jsonl", "train_summary.json",
                                          "train_summary.json.lock", "train_summary.json.settings.json"]
    says = (f"error: --model {first} is a LoRA policy: it trains on its adapter with the flags that made it, "
            "--lora-rank 8 --lora-alpha 16.0 --lora-targets down_proj,gate_proj,k_proj,o_proj,")
    for flags in (("--lora-rank", "4"), (), (*LORA, "--lora-targets", "q_proj"), (*LORA, "--lora-alpha", "8")):
        _, result = train(tmp_path, first, str(tmp_path / "pairs.jsonl"), "bad", *flags, check=False)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(says), result.stderr[-500:]
        assert not (tmp_path / "bad").exists()


def test_01_and_05_answer_as_the_merged_model_does(tmp_path, iterations, lively):
    """fp32: 05 gives a LoRA policy's column the answers of its merged copy, word for word, and 01 does too."""
    second = iterations[1]
    output = tmp_path / "eval"
    run_script("05_eval.py", "--models", lively, second, second + "/merged", "--tasks", "winrate", "--langs",
               "en,es", "--limit", "2", "--max-new-tokens", "6", "--judge", lively, "--judge-limit", "1",
               "--output", output, env=ENV, check=True)
    answers = {}
    for row in read_records(output / "predictions.jsonl"):
        answers.setdefault(row["model"], []).append(row["response"])
    base, policy, merged = answers.values()
    assert policy == merged and policy != base
    for name in (second, second + "/merged"):
        run_script("01_generate.py", "--model", name, "--prompts", os.path.join(REPO, "data", "prompts"),
                   "--langs", "es", "--limit", "3", "--max-new-tokens", "6", "--output", tmp_path / f"{len(name)}.jsonl",
                   env=ENV, check=True)
    assert read_records(tmp_path / f"{len(second)}.jsonl")[0]["responses"] == \
        read_records(tmp_path / f"{len(second) + 7}.jsonl")[0]["responses"]


@pytest.mark.parametrize("script", ["01_generate.py", "02_translate.py"])
def test_a_policy_whose_base_is_gone_is_one_line_and_nothing_is_written(tmp_path, iterations, script):
    policy = tmp_path / "model"
    shutil.copytree(iterations[0], policy)
    config_path = policy / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "moved")}))
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"id": "1", "lang": "es", "prompt": "hola", "responses": ["hola"]}) + "\n")
    flags = ["--model", policy] if script == "01_generate.py" else ["--translator", policy, "--input", responses]
    result = run_script(script, *flags, "--output", tmp_path / "out" / "x.jsonl", env=ENV)
    assert result.returncode == 2 and result.stderr.rstrip().split("\n")[-1].startswith(
        f"error: {policy}: not a model we can load (") and str(tmp_path / "moved") in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_server_serves_a_lora_policy_under_any_module_name(iterations, lively):
    """vLLM lists a LoRA module with its adapter folder as root: that, not the name, says which policy it is."""
    first, second = iterations
    listed = {lively: lively, "iter1": os.path.join(first, "adapter"), "anything": os.path.join(second, "adapter")}
    assert [common.served_name(name, listed) for name in (lively, first, second)] == [lively, "iter1", "anything"]
    assert common.served_name(first, {lively: lively}) is None  # the base alone does not serve the policy
    assert common.served_name(first, {first + "/merged": None}) == first + "/merged"  # loop.sh's merged copy


def test_a_cut_adapter_is_one_line_before_any_work(tmp_path, iterations):
    policy = tmp_path / "model"
    shutil.copytree(iterations[0], policy)
    adapter_file = policy / "adapter" / "adapter_model.safetensors"
    adapter_file.write_bytes(adapter_file.read_bytes()[:1000])
    result = run_script("01_generate.py", "--model", policy, "--output", tmp_path / "responses.jsonl", env=ENV)
    assert result.returncode == 2 and not (tmp_path / "responses.jsonl").exists()
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {policy}: adapter_model.safetensors is missing, cut short or damaged")


def test_the_initial_adapter_depends_on_the_seed_alone(lively):
    """A is drawn from a generator of add_lora's own: whatever drew random numbers before (converting the
    embedded model does), the same seed gives the same A."""
    first, second = (common.load_model(lively, torch.device("cpu"), torch.float32)[0] for _ in range(2))
    torch.manual_seed(0)
    common.add_lora(first, 4, 8.0, seed=3)
    torch.rand(1000)
    common.add_lora(second, 4, 8.0, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


@pytest.mark.slow
def test_a_lora_run_is_the_same_from_an_empty_cache(tmp_path):
    """04 --lora-rank on the embedded model, once converting it into an empty LOOP_CACHE and once from that
    cache: bit-identical adapters."""
    pairs_file, cache = write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "cache"
    runs = []
    for name in ("cold", "warm"):
        output, _ = train(tmp_path, "smollm2-135m", pairs_file, name, "--lora-rank", "4", "--batch-size", "2",
                          "--grad-accum", "1", "--max-steps", "1", "--lr", "1e-3",
                          env={**ENV, "LOOP_CACHE": str(cache)})
        runs.append(adapter_of(output))
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
