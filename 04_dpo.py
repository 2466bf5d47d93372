"""04_dpo.py: train the policy on preference pairs with DPO (sigmoid, IPO, hinge, +NLL), or on SFT rows.

In:  --input pairs.jsonl from 03_reward.py: one {"prompt", "chosen", "rejected", ...} per line
     (with --loss sft: {"prompt", "completion"} rows). prompt is the raw user message; TRL's
     conversational form (the prompt as [system,] user messages, each answer as one assistant message) is
     read too, and means the same.
Out: --output directory (default runs/loop/iter1/model/), loadable by any Hugging Face tool:
       config.json, model.safetensors, tokenizer files   the trained policy (save_pretrained, fp32)
       metrics.jsonl          one line per optimizer step, with TRL's metric names
       train_summary.json     settings, counts, speed, eval_before / eval_after; written LAST, so
                              its presence means the directory is complete
       reference_logps.jsonl  the reference log-probs, one record per pair (keyed by its content)
       checkpoint-N/          the latest checkpoint while training (weights + optimizer), removed at the end
       adapter/               with --lora-rank, instead of the model: the LoRA adapter, in PEFT's format, its
                              config naming the base; 01-05 and the next iteration load the folder as that
                              base plus this adapter, unmerged. merged/: with --save-merged, the model with
                              the adapter merged in, fp32 (a checkpoint holds the adapter alone)

    python 04_dpo.py --input runs/loop/iter1/pairs.jsonl --output runs/loop/iter1/model
    torchrun --nproc_per_node=8 04_dpo.py --model meta-llama/Llama-3.1-8B-Instruct --fsdp \
        --gradient-checkpointing
    python 04_dpo.py --model meta-llama/Llama-3.1-8B-Instruct --lora-rank 16 --lr 5e-6 \
        --gradient-checkpointing          # one GPU: the model frozen in bf16, LoRA adapters trained
    python 04_dpo.py --model runs/loop/iter1/model --lora-rank 16 ...   # a LoRA policy trains on its adapter

One optimizer step (train_step):
  1. The step's global batch of pairs depends only on (--seed, epoch), never on how it is split,
     and is cut into micro-batches: --batch-size pairs each, --grad-accum per process.
  2. A micro-batch is ONE forward of its chosen and rejected rows stacked together, through
     common.response_logps: the same scorer 03 uses, the model's final logit transform included.
  3. Its loss is its pairs' summed loss divided by the pairs in the WHOLE step (the NLL term by the
     chosen tokens in the whole step), so the micro-batch gradients add up to the gradient of the
     whole batch: batch 1 x accumulation 8 makes the same update as batch 8 x accumulation 1.
  4. Gradients are averaged over processes (DDP or FSDP), clipped, and AdamW steps.
The reference log-probs are computed before training by the same function, in the same micro-batches
as the first epoch's (so step 1 is exactly ln 2), and cached, so no reference model is held while the
policy trains. A killed run continues from its latest checkpoint when rerun (same data order, same
final weights).
IPO (--loss ipo) uses the summed log-probs of each response, as the IPO paper writes it; TRL's IPO divides
each log-ratio by the response length, so one beta means two different objectives there.
"""
import argparse
import contextlib
import gc
import glob
import json
import math
import os
import random
import shutil
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--input", default="runs/loop/iter1/pairs.jsonl", help="pairs (or SFT rows) JSONL from 03_reward.py")
    add("--output", default="runs/loop/iter1/model", help="directory: model, metrics, summary, checkpoints")
    add("--model", default=common.EMBEDDED_MODEL, help="policy: hub id, directory or the embedded default")
    add("--reference", default=None, help="DPO reference (default: --model as it was before training)")
    add("--loss", default="sigmoid", choices=["sigmoid", "ipo", "hinge", "sft"],
        help="DPO, IPO, SLiC hinge, or NLL (IPO: see above)")
    add("--beta", type=float, default=0.1, help="DPO temperature: how far the policy may leave the reference")
    add("--label-smoothing", type=float, default=0.0, help="sigmoid: assumed share of flipped labels (cDPO)")
    add("--nll-weight", type=float, default=0.0, help="+ this x per-token NLL of chosen answers (DPO+NLL: 1)")
    add("--eval-pairs", default=None, help="held-out pairs file for reward accuracy before/after training")
    add("--eval-frac", type=float, default=0.05,
        help="without --eval-pairs, hold out this share of prompt ids")
    add("--max-length", type=int, default=1024,
        help="longest prompt+response in tokens; longer pairs are skipped")
    add("--batch-size", type=int, default=4, help="pairs per micro-batch per process")
    add("--grad-accum", type=int, default=2, help="micro-batches per optimizer step per process")
    add("--epochs", type=int, default=1, help="passes over the training pairs")
    add("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0 = all epochs)")
    add("--lr", type=float, default=None, help="peak learning rate (default: 5e-7 for DPO, 1e-5 for sft)")
    add("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    add("--lr-schedule", default="cosine", choices=("cosine", "linear", "constant"),
        help="decay after warmup")
    add("--warmup-ratio", type=float, default=0.1, help="share of the steps spent warming up linearly from 0")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices, not norms or biases)")
    add("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (0: no clipping)")
    add("--lora-rank", type=int, default=0, help="LoRA: train adapters of this rank, model frozen (0: off)")
    add("--lora-alpha", type=float, default=None, help="LoRA: scale by alpha/rank (default: 2 x rank)")
    add("--lora-targets", default=",".join(common.LORA_TARGETS), help="LoRA: layers to adapt, by last name")
    add("--save-merged", action="store_true", help="LoRA: also write the merged fp32 model (merged/)")
    add("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    add("--fsdp", action="store_true", help="shard weights, gradients, optimizer over processes (FSDP2)")
    add("--save-every", type=int, default=100, help="checkpoint (with optimizer) every N steps; 0: never")
    add("--seed", type=int, default=0, help="seed for the eval split and the data order")
    add("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    args = parser.parse_args(argv)
    args.lr = args.lr if args.lr is not None else 1e-5 if args.loss == "sft" else 5e-7
    lora_only = {"--lora-alpha": args.lora_alpha is not None,
                 "--lora-targets": args.lora_targets != parser.get_default("lora_targets"),
                 "--save-merged": args.save_merged}  # given without --lora-rank, each would do nothing
    common.refuse({f"{flag} applies to LoRA only: add --lora-rank, or leave it out": given
                   and not args.lora_rank for flag, given in lora_only.items()})
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    # Refuse what cannot train before anything is loaded or written.
    at_least_one = ("batch_size", "grad_accum", "epochs", "max_length")
    ranges = {"lr": args.lr > 0, "beta": args.beta > 0, "min_lr": 0 <= args.min_lr <= args.lr,
              "label_smoothing": 0 <= args.label_smoothing < 0.5, "nll_weight": args.nll_weight >= 0,
              "warmup_ratio": 0 <= args.warmup_ratio <= 1, "weight_decay": args.weight_decay >= 0,
              "max_grad_norm": args.max_grad_norm >= 0, "eval_frac": 0 <= args.eval_frac < 1,
              "lora_rank": args.lora_rank >= 0, "lora_alpha": args.lora_alpha > 0 or not args.lora_rank,
              **{name: getattr(args, name) >= 1 for name in at_least_one}}
    common.refuse({f"--{name.replace('_', '-')} {getattr(args, name)} is out of range":
                   not (ok and math.isfinite(getattr(args, name))) for name, ok in ranges.items()})
    common.refuse({
        "--label-smoothing applies to --loss sigmoid only": args.label_smoothing and args.loss != "sigmoid",
        "--loss sft trains plain NLL: --reference and --nll-weight do not apply":
            args.loss == "sft" and (args.reference or args.nll_weight),
        f"--output {args.output} is a file; 04 writes a directory": os.path.isfile(args.output),
        "--fsdp shards over processes: run under torchrun --nproc_per_node=2 or more":
            args.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2})
    return args


# ----------------------------------------------------------------------------
# The loss


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0, nll_weight=0.0, chosen_token_counts=None,
             pairs_in_batch=None, tokens_in_batch=None):
    """DPO loss of a batch of pairs: the per-pair losses summed and divided by `pairs_in_batch`.

    The four log-prob arguments: [batch] summed log-probabilities of each whole response.
    chosen_token_counts: [batch] tokens in each chosen response (for the NLL term).
    pairs_in_batch, tokens_in_batch: what the sums are divided by; default this batch's own pairs and
      chosen tokens. Under gradient accumulation pass the whole optimizer step's counts, so the
      micro-batch losses add up to exactly the loss of the step's batch.
    Returns (loss scalar, chosen_rewards [batch], rejected_rewards [batch]); rewards are detached.

    With delta = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected):
      sigmoid  -(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta)   DPO; e = label_smoothing (cDPO)
      ipo      (delta - 1 / (2 beta))^2                                        IPO, Azar et al. 2023
               (summed log-probs, as in the paper; TRL's IPO averages them per token)
      hinge    max(0, 1 - beta delta)                                          SLiC, Zhao et al. 2023
      + nll_weight * sum(-policy_chosen_logps) / tokens_in_batch               DPO+NLL, Pang et al. 2024
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) \
            - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"unknown loss type {loss_type}")
    loss = losses.sum() / (pairs_in_batch or len(losses))
    if nll_weight:
        tokens = tokens_in_batch or chosen_token_counts.sum()
        loss = loss + nll_weight * (-policy_chosen_logps.sum()) / tokens
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ----------------------------------------------------------------------------
# Data: read, check, tokenise, batch


def read_examples(path, args, tokenizer, report=True):
    """Rows of a pairs (or SFT) file as tokenised examples, and how many were skipped for each reason.

    An example: {"where": "file:line", "id", "key", "sequences": [(ids, prompt_length), ...] (chosen,
    rejected; or the completion), "response_tokens": [...], "length": longest sequence}.
    A missing or empty field stops with `file:line: ...`; too long and chosen == rejected are skipped,
    and (report=True) each reason is printed once with its first file:line.
    """
    fields = ("prompt", "completion") if args.loss == "sft" else ("prompt", "chosen", "rejected")
    rows = common.read_jsonl(path, required=fields)
    examples, skipped = [], {"too_long": [], "identical": []}
    for line_number, record in rows:
        where = f"{path}:{line_number}"
        (prompt, system), *answers = [common.row_text(record[field], field, where) for field in fields]
        sequences = [common.tokenize_prompt_response(tokenizer, prompt, answer, system)
                     for answer, _ in answers]
        length = max(len(ids) for ids, _ in sequences)
        reason = ("identical" if args.loss != "sft" and answers[0] == answers[1] else  # teaches nothing
                  "too_long" if length > args.max_length else None)
        if reason:
            skipped[reason].append(where)
            continue
        examples.append({"where": where, "id": str(record.get("id", where)), "length": length,
                         "key": common.content_key(*[record[f] for f in fields]), "sequences": sequences,
                         "response_tokens": [len(ids) - prompt_length for ids, prompt_length in sequences]})
    why = {"too_long": f"longer than --max-length {args.max_length} tokens",
           "identical": "chosen == rejected"}
    for reason, wheres in skipped.items():
        if wheres and report:
            print(f"{path}: skipped {len(wheres)} of {len(rows)} rows, {why[reason]} (first: {wheres[0]})")
    return examples, {reason: len(wheres) for reason, wheres in skipped.items()}


def load_data(args, tokenizer, rank):
    """(train examples, eval examples, skip counts): --eval-pairs, or whole prompt ids held out of --input."""
    train, skip_counts = read_examples(args.input, args, tokenizer, report=rank == 0)
    if not args.eval_pairs:
        return (*common.split_by_id(train, args.eval_frac, args.seed), {"train": skip_counts})
    eval_set, eval_skips = read_examples(args.eval_pairs, args, tokenizer, report=rank == 0)
    trained = {example["key"] for example in train}
    overlap = [example["where"] for example in eval_set if example["key"] in trained]
    if overlap:  # a row trained on says nothing about held-out accuracy
        raise common.InputError(f"--eval-pairs: {len(overlap)} of its {len(eval_set)} rows are also in "
                                f"--input {args.input} (first: {overlap[0]}); "
                                "give pairs held out of training")
    return train, eval_set, {"train": skip_counts, "eval": eval_skips}


def epoch_batches(lengths, global_batch, seed, epoch):
    """The global batches of one epoch, as lists of example indices, grouped by length.

    Shuffle, sort windows of 16 batches by length (little padding), cut, shuffle the batch order.
    A pure function of (seed, epoch, global batch): any split over processes and micro-batches, and
    a resumed run, sees the same batches. The last len % global_batch examples sit this epoch out.
    """
    generator = random.Random(seed * 100003 + epoch)
    order = generator.sample(range(len(lengths)), len(lengths))
    batches, window = [], 16 * global_batch
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[i:i + global_batch] for i in range(0, len(chunk) - global_batch + 1, global_batch)]
    generator.shuffle(batches)
    return batches


def my_micro_batches(step_examples, batch_size, grad_accum, rank):
    """This process's share of a global batch: grad_accum micro-batches of batch_size examples."""
    first = rank * grad_accum * batch_size
    return [step_examples[first + k * batch_size:first + (k + 1) * batch_size] for k in range(grad_accum)]


def eval_batches(examples, batch_size, rank, world):
    """Held-out examples in batches, longest first; every process gets as many batches (some may be empty)."""
    examples = sorted(examples, key=lambda e: -e["length"])
    mine, per_rank = examples[rank::world], math.ceil(len(examples) / world)
    return [mine[start:start + batch_size] for start in range(0, per_rank, batch_size)]


# ----------------------------------------------------------------------------
# Log-probs and the loss of one micro-batch


def batch_logps(model, batch):
    """[rows] float64 summed response log-probs of a micro-batch: every example's first sequence (chosen,
    or the SFT completion), then every example's second (rejected). One forward, differentiable.
    Under bf16 autocast where common.pick_device chooses bf16 (the weights and the optimizer stay fp32)."""
    sequences = [sequence for column in zip(*(e["sequences"] for e in batch)) for sequence in column]
    device, dtype = next(model.parameters()).device, common.pick_device()[1]
    with torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext():
        return common.response_logps(model, sequences)


def micro_batch_loss(model, batch, args, pairs_in_batch, tokens_in_batch):
    """Loss of one micro-batch (already divided by the whole step's counts) and its metric sums by name."""
    logps = batch_logps(model, batch)
    if args.loss == "sft":
        loss = -logps.sum() / tokens_in_batch
        return loss, {"loss": loss.detach()}
    n, device = len(batch), logps.device
    reference = torch.tensor([e["reference_logps"] for e in batch], dtype=torch.float64, device=device)
    reference = reference.T.reshape(-1)  # every chosen, then every rejected, as logps
    chosen_tokens = torch.tensor([e["response_tokens"][0] for e in batch], device=device)
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        logps[:n], logps[n:], reference[:n], reference[n:], args.beta, args.loss, args.label_smoothing,
        args.nll_weight, chosen_tokens, pairs_in_batch, tokens_in_batch)
    policy = logps.detach()
    won = wins(chosen_rewards, rejected_rewards, policy[:n], policy[n:], args.beta)
    return loss, {"loss": loss.detach(), "rewards/chosen": chosen_rewards.sum(),
                  "rewards/rejected": rejected_rewards.sum(), "rewards/accuracies": won,
                  "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                  "logps/chosen": policy[:n].sum(), "logps/rejected": policy[n:].sum(),
                  "nll_loss": -policy[:n].sum() / tokens_in_batch}


def wins(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps, beta):
    """How many pairs the chosen reward wins. A margin within fp32 noise of the summed log-probs (1e-6 of
    their size) is a tie, not a win: at step 1, where policy == reference, no pair is won (as in TRL)."""
    noise = 1e-6 * beta * (policy_chosen_logps.abs() + policy_rejected_logps.abs())
    return (chosen_rewards - rejected_rewards > noise).double().sum()


def reduce_metrics(sums, pairs):
    """Sum every process's metric sums by name, then make the per-pair sums means (loss and NLL come
    normalised)."""
    total = torch.stack([torch.as_tensor(value, dtype=torch.float64) for value in sums.values()])
    if dist.is_initialized():
        dist.all_reduce(total)
    return {name: value / pairs if name.startswith(("rewards/", "logps/")) else value
            for name, value in zip(sums, total.tolist())}


def train_step(model, optimizer, step_examples, args, rank, world):
    """One optimizer step on one global batch; returns its metrics by name (the same on every process).

    A non-finite loss or gradient norm returns before the optimizer steps, so the weights stay good.
    """
    pairs, tokens_in_batch = len(step_examples), sum(e["response_tokens"][0] for e in step_examples)
    mine = my_micro_batches(step_examples, args.batch_size, args.grad_accum, rank)
    sums, tokens = {}, 0
    for index, batch in enumerate(mine):
        last = index == len(mine) - 1  # gradients are all-reduced after the last micro-batch only
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(last)
        with model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext():  # DDP
            loss, batch_sums = micro_batch_loss(model, batch, args, pairs, tokens_in_batch)
            (loss * world).backward()  # DDP and FSDP AVERAGE gradients over processes; this makes it the sum
        sums = {name: sums.get(name, 0) + value for name, value in batch_sums.items()}
        tokens += sum(len(ids) for example in batch for ids, _ in example["sequences"])
    sums["tokens"] = torch.tensor(float(tokens), device=sums["loss"].device)
    metrics = reduce_metrics(sums, pairs)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
    metrics["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics


@torch.no_grad()
def evaluate(model, examples, args, rank, world):
    """Reward accuracy and margins (or SFT loss) of the policy on held-out examples, over all processes."""
    if not examples:
        return {}
    pairs, tokens, sums = len(examples), sum(e["response_tokens"][0] for e in examples), {}
    model.eval()
    for batch in eval_batches(examples, args.batch_size, rank, world):
        # Every process joins every forward (FSDP gathers weights inside it), so one that ran out of
        # examples runs a throwaway batch and discards the result.
        _, batch_sums = micro_batch_loss(model, batch or examples[:1], args, pairs, tokens)
        sums = {name: sums.get(name, 0) + (value if batch else 0 * value)
                for name, value in batch_sums.items()}
    back_to_training(model)
    return reduce_metrics(sums, pairs)


def back_to_training(model):
    """Train mode after forwards without gradients. FSDP2 keeps the root's weights gathered after such a
    forward; reshard them, or the next step's gradients for them go wrong (embeddings, output layer)."""
    model.train()
    if hasattr(model, "reshard"):
        model.reshard()


# ----------------------------------------------------------------------------
# Reference log-probs, computed before training


@torch.no_grad()
def attach_reference_logps(load, name, train, eval_set, first_epoch, args, rank, world):
    """Give every example its [reference chosen, reference rejected] summed log-probs; returns how many
    were scored now.

    load(): the reference `name`, loaded and wrapped like the policy (default: the policy before its first
    step); called only when some pair is not yet scored.
    Scored in the micro-batches the policy first sees them in (first_epoch: the first epoch's global
    batches), so policy and reference are computed alike, padding and kernel shapes included: step 1 is
    exactly ln 2 in any dtype. Written batch by batch to <output>/reference_logps.jsonl (resumable like
    every stage), keyed by the pair, the reference's weight files, the device and the global batch: a pair
    already scored alike is not scored again.
    """
    path = os.path.join(args.output, "reference_logps.jsonl")
    # The weight files' sizes and times are in it, so a retrained directory is noticed.
    weight_files = common.check_weights(name)
    identity = [name, common.pick_device()[0].type, args.batch_size * args.grad_accum * world] + [
        (f, os.path.getsize(f), os.path.getmtime(f)) for f in weight_files]
    examples = train + eval_set
    for example in examples:
        example["reference_key"] = common.content_key(identity, example["key"])
    key = lambda item: item["reference_key"]  # noqa: E731  (an example, or its record in the file)
    pending = {key(example) for example in common.resume(path, examples, key)[1]}
    batches = [batch for step in first_epoch for batch in
               my_micro_batches([train[i] for i in step], args.batch_size, args.grad_accum, rank)]
    in_first_epoch, model = {index for step in first_epoch for index in step}, load() if pending else None
    not_in_first_epoch = [e for i, e in enumerate(train) if i not in in_first_epoch]
    batches += eval_batches(not_in_first_epoch, args.batch_size, rank, world)
    for batch in tqdm(batches + eval_batches(eval_set, args.batch_size, rank, world) if pending else [],
                      desc="reference log-probs", unit="batch", disable=rank != 0, dynamic_ncols=True):
        new = [example for example in batch if key(example) in pending]
        if new or (args.fsdp and pending):  # under FSDP every process joins every forward (a throwaway one)
            logps = batch_logps(model, new or train[:1]).cpu()
            common.save_batch(path, [{"reference_key": key(e), "logps": [logps[i].item(),
                                                                          logps[len(new) + i].item()]}
                                     for i, e in enumerate(new)], rank)
    if model is not None:
        back_to_training(model)
    common.finish(path, examples, key, rank)
    saved = {key(record): record["logps"] for _, record in common.read_jsonl(path)}
    for example in examples:
        example["reference_logps"] = saved[key(example)]
    return len(pending)


# ----------------------------------------------------------------------------
# Model setup, checkpoints


def load_policy(name, device, args, train=True, checkpoint=None):
    """A model to train (or, train=False, a reference scored like it): fp32 master weights, dropout off,
    sharded under --fsdp (one shard group per decoder layer, then the rest), in DistributedDataParallel when
    it trains under torchrun. Either way bf16 comes from autocast alone, as on one GPU: one precision path.

    With --lora-rank the model is frozen and trains adapters: new ones (B = 0), or, when `name` is a LoRA
    policy (an earlier iteration's output), that policy's own adapter, trained on; resuming, `checkpoint`'s.
    Never updated, the frozen base needs no fp32 master copy: it is stored in the run's precision (bf16 on a
    GPU and under LOOP_BF16=1; fp32 under --fsdp, which gathers one dtype per shard group), adapters in fp32.
    """
    lora_base = args.lora_rank and not args.fsdp
    model = common.load_model(name, device, common.pick_device()[1] if lora_base else torch.float32,
                              args.trust_remote_code)[0]  # a LoRA policy comes with its adapter
    model.train()
    for module in model.modules():  # the reference scores without dropout, the policy too (as TRL's default)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attribute, value in vars(module).items():  # attention dropout is often a plain float attribute
            if "dropout" in attribute and isinstance(value, float):
                setattr(module, attribute, 0.0)
    if args.lora_rank and train:
        if not common.adapter_folder(name):  # a LoRA policy has its adapter already
            common.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets.split(","), args.seed)
        if checkpoint:  # resuming: the adapters as the checkpoint left them
            common.use_adapter(model, os.path.join(checkpoint, "adapter"))
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for module in model.modules():
            if type(module).__name__ in set(getattr(model, "_no_split_modules", None) or []):
                fully_shard(module)
        return fully_shard(model)
    if train and dist.is_initialized():
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return model


def make_optimizer(model, args, checkpoint=None):
    """AdamW, weight decay on matrices only (not on norms and biases); its moments from `checkpoint`.

    fused=True updates each tensor in one kernel: faster, and without the whole-model temporaries
    of the default multi-tensor version (one model copy less at peak).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    if checkpoint:  # the weights came with the model; rank 0 alone reads the full state, sends each its shard
        shared = dist.is_initialized()
        saved = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True) \
            if not shared or dist.get_rank() == 0 else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=shared)
        set_optimizer_state_dict(model, optimizer, saved, options=options)
    return optimizer


def learning_rate(step, total_steps, args):
    """Linear warmup from 0, then cosine or linear decay to --min-lr (a function of the step: resumes
    exactly)."""
    warmup = round(args.warmup_ratio * total_steps)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1}
    return args.min_lr + decay[args.lr_schedule] * (args.lr - args.min_lr)


def all_finite(model, optimizer=None):
    """Every weight (and optimizer moment) finite, on every process: nothing else may be saved."""
    moments = [value for state in (optimizer.state.values() if optimizer else [])
               for value in state.values() if torch.is_tensor(value) and value.ndim]
    # Under FSDP each process checks its own shards.
    trained = [p for p in model.parameters() if p.requires_grad]  # LoRA: the frozen model cannot change
    local = [t.to_local() if hasattr(t, "to_local") else t for t in trained + moments]
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in local]).all().float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def save_model(model, tokenizer, directory, rank, args, merged=True):
    """save_pretrained of the full (gathered) weights; a collective call under FSDP.

    With --lora-rank: the adapter in PEFT's format in directory/adapter/, which is what the next stages load
    (its base plus it), as PeftModel.from_pretrained and vLLM's --lora-modules do; with --save-merged (and
    merged=True) also the model with it merged in, in fp32, in directory/merged/.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first_name = {}  # a tied weight (lm_head = embeddings) is gathered under each name: store it once
    for name, parameter in common.unwrap(model).named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(parameter), name) != name:
            state.pop(name, None)
    if rank != 0:
        return
    if args.lora_rank:
        common.save_adapter(state, os.path.join(directory, "adapter"), args.lora_rank, args.lora_alpha,
                            common.base_model(args.model))  # a LoRA policy trains on: its base stays the base
        if not (merged and args.save_merged):
            return
        # The policy just saved, loaded as its base as stored (fp32, not bf16 as held here on a GPU) plus the
        # adapter, then merged: nothing is rounded.
        model = common.load_model(directory, torch.device("cpu"), torch.float32, args.trust_remote_code,
                                  scored=False)[0]
        state = common.merge_lora(dict(model.named_parameters()), args.lora_alpha / args.lora_rank)
        directory = os.path.join(directory, "merged")
    common.unwrap(model).save_pretrained(directory, state_dict=state)
    tokenizer.save_pretrained(directory)


def save_checkpoint(model, optimizer, tokenizer, trainer_state, args, rank):
    """checkpoint-N/: weights (safetensors; LoRA: adapter/ only), optimizer state (torch.save),
    trainer_state.json.

    Written as checkpoint-N.tmp and renamed when complete; only then is the older one deleted, so a
    kill at any moment leaves at least one whole checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    final = os.path.join(args.output, f"checkpoint-{trainer_state['step']}")
    temporary = final + ".tmp"
    save_model(model, tokenizer, temporary, rank, args, merged=False)  # LoRA: the adapters alone
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if rank == 0:
        torch.save(optimizer_state, os.path.join(temporary, "optimizer.pt"))
        common.write_json(os.path.join(temporary, "trainer_state.json"), trainer_state)
        os.replace(temporary, final)
        for old in glob.glob(os.path.join(args.output, "checkpoint-*")):
            if old != final:
                shutil.rmtree(old)
    common.barrier()


def latest_checkpoint(output):
    """The newest complete checkpoint-N directory (a .tmp one was cut short by a kill), or None."""
    done = [path for path in glob.glob(os.path.join(output, "checkpoint-*"))
            if not path.endswith(".tmp") and os.path.exists(os.path.join(path, "trainer_state.json"))]
    return max(done, key=lambda path: int(path.rsplit("-", 1)[1]), default=None)


# Flags a resumed run may change: they split the same global batch differently, or only say where things go.
RESUMABLE_WITH_OTHER = ("output", "save_every", "batch_size", "grad_accum", "gradient_checkpointing", "fsdp",
                        "trust_remote_code")


def resume_point(output, settings, rank):
    """(latest checkpoint or None, trainer state); metrics.jsonl is cut back to the checkpoint's step."""
    checkpoint, state = latest_checkpoint(output), {"step": 0, "settings": settings}
    if checkpoint:  # every file the resume reads is checked whole first
        remedy = f"delete {checkpoint} to train from the start"
        common.check_weights(checkpoint, remedy)
        try:  # torch.save writes a zip file, whose directory is at its end: a cut one has none
            zipfile.ZipFile(os.path.join(checkpoint, "optimizer.pt")).close()
        except (OSError, zipfile.BadZipFile) as error:
            raise common.InputError(f"{checkpoint}: optimizer.pt is missing, cut short or damaged ({error}); "
                                    f"{remedy}") from None
        state = common.read_json(os.path.join(checkpoint, "trainer_state.json"))  # claim checked its settings
    metrics_path = os.path.join(output, "metrics.jsonl")
    if rank == 0:  # the metrics of the steps after the checkpoint go: those steps run again
        rows = common.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
        kept = [json.dumps(r) + "\n" for _, r in rows if r["step"] <= state["step"]]
        common.write_atomic(metrics_path, lambda handle: handle.writelines(kept))
        print(f"resuming from {checkpoint} (step {state['step']})" if checkpoint else
              f"training into {output}")
    return checkpoint, state


# ----------------------------------------------------------------------------


def prepare(args, rank, world):
    """Step 1, setup: the data, the settings a resumed run must share, the model at its latest checkpoint,
    the reference log-probs and the optimizer, in one small run state; None if the output is complete."""
    torch.manual_seed(args.seed)
    run = argparse.Namespace(started=time.perf_counter(), device=common.pick_device()[0],
                             global_batch=args.batch_size * args.grad_accum * world,
                             summary_path=os.path.join(args.output, "train_summary.json"))  # written last
    check_lora_flags(args)
    run.tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    run.train, run.eval_set, run.skip_counts = load_data(args, run.tokenizer, rank)
    # What a resumed run must share: the data, the objective, the schedule, the global batch.
    run.settings = {**{name: value for name, value in vars(args).items() if name not in RESUMABLE_WITH_OTHER},
                    "the global batch (--batch-size x --grad-accum x processes)": run.global_batch,
                    "pairs": common.content_key([example["key"] for example in run.train + run.eval_set])}
    if common.claim(run.summary_path, run.settings, rank, partial=latest_checkpoint(args.output) is not None,
                    files={"pairs": args.input}):
        return None
    run.steps_per_epoch = len(run.train) // run.global_batch
    if run.steps_per_epoch == 0:
        raise common.InputError(f"{args.input}: {len(run.train)} training rows, fewer than one global batch "
                                f"of {run.global_batch} (--batch-size x --grad-accum x processes)")
    run.total_steps = min(run.steps_per_epoch * args.epochs, args.max_steps or math.inf)
    checkpoint, run.state = resume_point(args.output, run.settings, rank)
    # A LoRA checkpoint holds the adapters alone: the model is --model's, the adapters the checkpoint's.
    run.model = load_policy(checkpoint if checkpoint and not args.lora_rank else args.model, run.device, args,
                            checkpoint=checkpoint)
    reference = args.reference or args.model  # by default the policy itself, before its first step
    fresh = reference == args.model and checkpoint is None

    def load_reference():  # called only if some pair is not scored yet
        return run.model if fresh else load_policy(reference, run.device, args, train=False)
    run.scored_now = 0 if args.loss == "sft" else attach_reference_logps(
        load_reference, reference, run.train, run.eval_set, batches_of_epoch(run, args, 0), args, rank, world)
    gc.collect()  # a reference model loaded for that is gone: none is held while the policy trains
    run.optimizer = make_optimizer(run.model, args, checkpoint)
    if not run.state.get("eval_before"):  # a resumed run keeps the first run's
        run.state["eval_before"] = evaluate(run.model, run.eval_set, args, rank, world)
    if rank == 0:
        print(f"training on {len(run.train)} rows ({run.steps_per_epoch} steps per epoch of "
              f"{run.global_batch}, {len(run.train) % run.global_batch} sitting each epoch out), "
              f"{len(run.eval_set)} held out, {run.total_steps} steps")
    return run


def check_lora_flags(args):
    """Before any work, one line when the LoRA flags do not fit --model: a LoRA policy (an earlier iteration's
    output) trains on its own adapter, so they must be those it was made with; otherwise each target must name
    a linear layer of the model, tried on its skeleton (no weights are loaded)."""
    from transformers import AutoModelForCausalLM
    config = common.adapter_config(folder) if (folder := common.adapter_folder(args.model)) else None
    if args.lora_rank and not config:
        layout = common.model_config(args.model, args.trust_remote_code)
        with torch.device("meta"):  # the model's layers, with no memory behind them
            skeleton = AutoModelForCausalLM.from_config(layout, trust_remote_code=args.trust_remote_code)
        try:
            common.add_lora(skeleton, args.lora_rank, args.lora_alpha, args.lora_targets.split(","))
        except ValueError as error:
            flags = f"--lora-rank {args.lora_rank} --lora-targets {args.lora_targets}"
            raise common.InputError(f"{flags}: {error}") from None
    made = config and (config["r"], config["lora_alpha"], ",".join(sorted(config["target_modules"])))
    now = (args.lora_rank, args.lora_alpha, ",".join(sorted(args.lora_targets.split(","))))
    message = (f"--model {args.model} is a LoRA policy: it trains on its adapter with the flags that made "
               "it, --lora-rank {} --lora-alpha {} --lora-targets {}")
    common.refuse({message.format(*made or now): made and made != now})


def batches_of_epoch(run, args, epoch):
    return epoch_batches([example["length"] for example in run.train], run.global_batch, args.seed, epoch)


def train_loop(run, args, rank, world):
    """Step 2, the training loop: the learning rate, one step, a metrics line, a checkpoint now and then."""
    state, metrics_path = run.state, os.path.join(args.output, "metrics.jsonl")
    progress = tqdm(total=run.total_steps, initial=state["step"], desc="train", unit="step",
                    disable=rank != 0)
    for step in range(state["step"], run.total_steps):
        epoch, index = divmod(step, run.steps_per_epoch)
        lr = learning_rate(step, run.total_steps, args)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        step_examples = [run.train[i] for i in batches_of_epoch(run, args, epoch)[index]]
        metrics = train_step(run.model, run.optimizer, step_examples, args, rank, world)
        seconds = time.perf_counter() - started  # its metrics waited for the GPU (the optimizer: the next)
        saving = args.save_every and (step + 1) % args.save_every == 0 and step + 1 < run.total_steps
        finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        # Nothing non-finite is ever saved: a checkpoint is written only after this check.
        if not (finite and all_finite(run.model, run.optimizer if saving else None)):
            raise common.InputError(
                f"step {step + 1}: loss {metrics['loss']}, grad_norm {metrics['grad_norm']}, or the weights "
                f"after the update, are not finite: training stopped; last good checkpoint: "
                f"{latest_checkpoint(args.output) or 'none'}. Try a lower --lr or --beta.")
        state.update(step=step + 1, final_step=metrics, train_seconds=state.get("train_seconds", 0) + seconds,
                     train_tokens=state.get("train_tokens", 0) + metrics["tokens"])
        # TRL's names where the quantity is TRL's (learning_rate, cumulative num_tokens); tokens/s is ours.
        record = {"step": step + 1, "epoch": round((step + 1) / run.steps_per_epoch, 4), "learning_rate": lr,
                  **{name: value for name, value in metrics.items() if name != "tokens"},
                  "num_tokens": state["train_tokens"], "tokens/s": round(metrics["tokens"] / seconds, 1)}
        if rank == 0:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            progress.set_postfix(loss=f"{metrics['loss']:.4g}", acc=metrics.get("rewards/accuracies"),
                                 lr=f"{lr:.1e}")
        progress.update(1)
        if saving:
            save_checkpoint(run.model, run.optimizer, run.tokenizer, state, args, rank)
    progress.close()


def finish_run(run, args, rank, world):
    """Step 3: held-out metrics, the model, then train_summary.json (it marks the directory complete)."""
    eval_after = evaluate(run.model, run.eval_set, args, rank, world)
    save_model(run.model, run.tokenizer, args.output, rank, args)
    if rank != 0:
        return
    state, seconds = run.state, time.perf_counter() - run.started
    tokens_per_second = state["train_tokens"] / max(state["train_seconds"], 1e-9)
    common.write_json(run.summary_path, {
        "settings": run.settings, "world_size": world, "steps": run.total_steps,
        "train_pairs": len(run.train), "eval_pairs": len(run.eval_set), "skipped": run.skip_counts,
        "reference_scored_now": run.scored_now, "eval_before": state["eval_before"], "eval_after": eval_after,
        "final_step": state["final_step"], "train_seconds": round(state["train_seconds"], 2),
        "seconds": round(seconds, 2), "train_tokens": int(state["train_tokens"]),
        "tokens_per_second": round(tokens_per_second, 1)})
    for old in glob.glob(os.path.join(args.output, "checkpoint-*")):
        shutil.rmtree(old)
    for name, before in state["eval_before"].items():
        print(f"eval {name}: {before:.4f} -> {eval_after[name]:.4f} ({len(run.eval_set)} held-out rows)")
    skipped = sum(sum(counts.values()) for counts in run.skip_counts.values())
    print(common.summary_line("04_dpo", seconds, steps=run.total_steps, pairs=len(run.train), skipped=skipped)
          + f", training {tokens_per_second:.1f} tokens/s")


def main(argv=None):
    args = parse_args(argv)
    rank, world = common.setup_distributed()
    run = prepare(args, rank, world)  # 1. data, model, reference log-probs, optimizer (None: complete)
    with common.writing(args.output):  # a full disk is one line; the latest whole checkpoint stays
        if run is not None:
            train_loop(run, args, rank, world)  # 2. the optimizer steps, checkpointed
            finish_run(run, args, rank, world)  # 3. held-out metrics, the model, the summary
    common.barrier()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
