"""04: train the policy on preference pairs with DPO (sigmoid, IPO, hinge, +NLL), or on SFT rows.

In:  --input pairs.jsonl from 03_reward.py: one {"prompt", "chosen", "rejected", ...} per line
     (with --loss sft: {"prompt", "completion"} rows). prompt is the raw user message.
Out: --output directory (default runs/demo/model/), loadable by any Hugging Face tool:
       config.json, model.safetensors, tokenizer files   the trained policy (save_pretrained, fp32)
       metrics.jsonl         one line per optimizer step, with TRL's metric names
       train_summary.json    settings, counts, speed, eval_before / eval_after; written LAST, so
                             its presence means the directory is complete
       reference_logps.json  cache of the reference log-probs, one entry per pair (keyed by content)
       checkpoint-N/         latest checkpoint while training (weights + optimizer), removed at the end

    python 04_dpo.py --input runs/demo/pairs.jsonl --output runs/demo/model
    torchrun --nproc_per_node=8 04_dpo.py --model meta-llama/Llama-3.1-8B-Instruct --fsdp --gradient-checkpointing

One optimizer step (train_step):
  1. The step's global batch of pairs depends only on (--seed, epoch), never on how it is split,
     and is cut into micro-batches: --batch-size pairs each, --grad-accum per process.
  2. A micro-batch is ONE forward of its chosen and rejected rows stacked together.
  3. Its loss is its pairs' summed loss divided by the pairs in the WHOLE step (the NLL term by the
     chosen tokens in the whole step), so the micro-batch gradients add up to the gradient of the
     whole batch: batch 1 x accumulation 8 makes the same update as batch 8 x accumulation 1.
  4. Gradients are averaged over processes (DDP or FSDP), clipped, and AdamW steps.
The reference log-probs are computed once, before training, by the scorer 03 uses (common.score),
and cached, so the reference model is not in memory while the policy trains.
A killed run continues from its latest checkpoint when rerun (same data order, same final weights).
"""
import argparse
import contextlib
import gc
import glob
import hashlib
import json
import math
import os
import random
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common

DPO_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "nll_loss"]
SFT_METRICS = ["loss"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--input", default="runs/demo/pairs.jsonl", help="pairs (or SFT rows) JSONL from 03_reward.py")
    add("--output", default="runs/demo/model", help="output directory (model, metrics, summary, checkpoints)")
    add("--model", default=common.EMBEDDED_MODEL, help="policy to train: hub id, local dir, or the embedded default")
    add("--reference", default=None, help="reference model for DPO (default: --model as it was before training)")
    add("--loss", default="sigmoid", choices=["sigmoid", "ipo", "hinge", "sft"],
        help="sigmoid = DPO, ipo = IPO, hinge = SLiC hinge, sft = plain NLL on {prompt, completion} rows")
    add("--beta", type=float, default=0.1, help="DPO temperature: how far the policy may move from the reference")
    add("--label-smoothing", type=float, default=0.0, help="sigmoid loss only: assumed share of flipped labels (cDPO)")
    add("--nll-weight", type=float, default=0.0,
        help="add this times the per-token NLL of the chosen response (DPO+NLL; Pang et al. 2024 use 1.0)")
    add("--eval-pairs", default=None, help="held-out pairs file for reward accuracy before/after training")
    add("--eval-frac", type=float, default=0.05,
        help="without --eval-pairs, hold out this share of prompt ids (at least one) for evaluation; 0 = none")
    add("--max-length", type=int, default=1024,
        help="longest prompt+response in tokens; longer pairs are skipped and counted (never truncated)")
    add("--batch-size", type=int, default=4, help="pairs per micro-batch per process")
    add("--grad-accum", type=int, default=2, help="micro-batches per optimizer step per process")
    add("--epochs", type=int, default=1, help="passes over the training pairs")
    add("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0 = all epochs)")
    add("--lr", type=float, default=None, help="peak learning rate (default 5e-7 for DPO losses, 1e-5 for sft)")
    add("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    add("--lr-schedule", default="cosine", choices=["cosine", "linear", "constant"], help="decay after warmup")
    add("--warmup-ratio", type=float, default=0.1, help="share of the steps spent warming up linearly from 0")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only, not norms/biases)")
    add("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this (0 = no clipping)")
    add("--gradient-checkpointing", action="store_true",
        help="recompute activations in backward: less memory (~750 MB for the 135M model), 5-30%% slower")
    add("--reference-in-loop", action="store_true",
        help="keep the reference model in memory and run it every micro-batch (the old way, for comparison)")
    add("--score-token-budget", type=int, default=8192, help="rows x longest row per batch when scoring the reference")
    add("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over processes "
        "(torch FSDP2 fully_shard), for models whose training state does not fit one GPU; needs torchrun")
    add("--save-every", type=int, default=100,
        help="write a checkpoint (with optimizer state) every N steps; 0 = never")
    add("--resume", action="store_true",
        help="require a checkpoint to continue from (a rerun continues from one anyway when it exists)")
    add("--limit", type=int, default=None, help="use only the first N rows of --input")
    add("--seed", type=int, default=0, help="seed for the eval split and the data order")
    add("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    args = parser.parse_args()
    if args.lr is None:
        args.lr = 1e-5 if args.loss == "sft" else 5e-7
    if args.label_smoothing and args.loss != "sigmoid":
        raise common.InputError("--label-smoothing applies to --loss sigmoid only")
    if args.loss == "sft" and (args.reference or args.reference_in_loop or args.nll_weight):
        raise common.InputError("--loss sft trains plain NLL: --reference, --reference-in-loop and --nll-weight "
                                "do not apply")
    for name in ("batch_size", "grad_accum", "epochs", "max_length"):
        if getattr(args, name) < 1:
            raise common.InputError(f"--{name.replace('_', '-')} must be at least 1")
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
      hinge    max(0, 1 - beta delta)                                          SLiC, Zhao et al. 2023
      + nll_weight * sum(-policy_chosen_logps) / tokens_in_batch               DPO+NLL, Pang et al. 2024
    """
    delta = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
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
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return loss, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------
# Data: read, check, tokenise, split, batch


def read_examples(path, args, tokenizer, limit=None):
    """Rows of a pairs (or SFT) file as tokenised examples, plus counts of the rows skipped.

    An example: {"where": "file:line", "id", "key", "sequences": [(ids, prompt_length), ...] (chosen,
    rejected; or the completion), "response_tokens": [...], "length": longest sequence}.
    A missing or empty field stops with `file:line: ...`; too long and chosen == rejected are skipped.
    """
    fields = ("prompt", "completion") if args.loss == "sft" else ("prompt", "chosen", "rejected")
    rows = common.read_jsonl(path, required=fields)[:limit]
    examples, skipped = [], {"too_long": [], "identical": []}
    for line_number, record in rows:
        where = f"{path}:{line_number}"
        for field in fields:
            if not isinstance(record[field], str) or not record[field].strip():
                raise common.InputError(f"{where}: field '{field}' must be a non-empty string")
        if args.loss != "sft" and record["chosen"] == record["rejected"]:
            skipped["identical"].append(where)  # teaches nothing: both gradients cancel
            continue
        sequences = [common.tokenize_prompt_response(tokenizer, record["prompt"], record[f]) for f in fields[1:]]
        if max(len(ids) for ids, _ in sequences) > args.max_length:
            skipped["too_long"].append(where)
            continue
        key = hashlib.sha256(json.dumps([record[f] for f in fields], ensure_ascii=False).encode()).hexdigest()[:20]
        examples.append({"where": where, "id": str(record.get("id", where)), "key": key,
                         "texts": [record[f] for f in fields], "sequences": sequences,
                         "response_tokens": [len(ids) - prompt_length for ids, prompt_length in sequences],
                         "length": max(len(ids) for ids, _ in sequences)})
    return examples, len(rows), skipped


def report_skips(path, total, skipped, args):
    if args.rank == 0:
        reasons = {"too_long": f"longer than --max-length {args.max_length} tokens", "identical": "chosen == rejected"}
        for reason, wheres in skipped.items():
            if wheres:
                print(f"{path}: skipped {len(wheres)} of {total} rows, {reasons[reason]} (first: {wheres[0]})")
    return {reason: len(wheres) for reason, wheres in skipped.items()}


def split_eval(examples, fraction, seed):
    """Hold out whole prompt ids (a parallel prompt in every language goes to one side) -> (train, eval)."""
    if fraction <= 0:
        return examples, []
    ids = sorted({example["id"] for example in examples})
    random.Random(seed).shuffle(ids)
    held_out = set(ids[:max(1, round(fraction * len(ids)))])
    return ([e for e in examples if e["id"] not in held_out], [e for e in examples if e["id"] in held_out])


def epoch_batches(lengths, global_batch, seed, epoch):
    """The global batches of one epoch, as lists of example indices, grouped by length.

    Shuffle, sort windows of 16 batches by length (little padding), cut, shuffle the batch order.
    A pure function of (seed, epoch, global batch): any split over processes and micro-batches, and
    a resumed run, sees the same batches. The last len % global_batch examples sit this epoch out.
    """
    generator = random.Random(seed * 100003 + epoch)
    order = list(range(len(lengths)))
    generator.shuffle(order)
    batches, window = [], 16 * global_batch
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[i:i + global_batch] for i in range(0, len(chunk) - global_batch + 1, global_batch)]
    generator.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------
# Log-probs and the loss of one micro-batch


def autocast(device):
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def sequence_logps(model, sequences, args, chunk_positions=256):
    """Summed log-probs of each sequence's response tokens, from ONE forward of the (wrapped) model.

    sequences: n (ids, prompt_length). Returns [n] float64, differentiable.
    Goes through model(...) itself, so DDP/FSDP hooks run, but takes its last hidden states (logits
    for one position only) and applies the output layer here, chunk_positions at a time under
    activation checkpointing: [positions, vocab] logits then exist for one chunk at a time, in the
    forward and again in the backward. All at once they would be n x length x vocab floats, kept for
    the backward, plus as much again for their gradient: 8 x 1024 x a 128k vocabulary is 4 GB each.
    Positions before the shortest prompt are skipped; prompt and padding positions are masked out.
    """
    device = args.device
    input_ids, attention_mask = common.pad_right([ids for ids, _ in sequences], args.pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    first = min(prompt_length for _, prompt_length in sequences) - 1  # first position predicting a response token
    output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1,
                   output_hidden_states=True)
    hidden = output.hidden_states[-1][:, first:]  # [n, kept, hidden] after the final norm; kept = length - first
    # Position t predicts token t + 1; the last position predicts nothing (label 0, masked).
    labels = torch.cat([input_ids[:, first + 1:], torch.zeros_like(input_ids[:, :1])], dim=1)  # [n, kept]
    output_layer = unwrap(model).get_output_embeddings()
    positions, position_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    logps = torch.cat([checkpoint(lambda h, y: common.token_logps(output_layer(h), y),
                                  positions[start:start + chunk_positions],
                                  position_labels[start:start + chunk_positions], use_reentrant=False)
                       for start in range(0, len(positions), chunk_positions)]).view(labels.shape)
    response_mask = torch.zeros(labels.shape, dtype=torch.bool)
    for row, (ids, prompt_length) in enumerate(sequences):
        response_mask[row, prompt_length - 1 - first:len(ids) - 1 - first] = True
    return torch.where(response_mask.to(device), logps.double(), 0.0).sum(dim=1)


def micro_batch_loss(model, batch, args, pairs_in_batch, tokens_in_batch, reference_model=None):
    """Loss of one micro-batch (already divided by the whole step's counts) and its metric sums.

    batch: examples. Returns (loss scalar, sums [len(args.metrics)] float64 detached, tokens in the forward).
    """
    device = args.device
    if args.loss == "sft":
        sequences = [example["sequences"][0] for example in batch]
        with autocast(device):
            logps = sequence_logps(model, sequences, args)
        loss = -logps.sum() / tokens_in_batch
        return loss, loss.detach().reshape(1), sum(len(ids) for ids, _ in sequences)
    n = len(batch)
    sequences = [e["sequences"][0] for e in batch] + [e["sequences"][1] for e in batch]  # chosen rows, then rejected
    with autocast(device):
        logps = sequence_logps(model, sequences, args)
    if reference_model is not None:
        with torch.no_grad(), autocast(device):
            reference = sequence_logps(reference_model, sequences, args)
    else:
        reference = torch.tensor([e["reference_logps"] for e in batch], dtype=torch.float64).T.reshape(-1).to(device)
    chosen_tokens = torch.tensor([e["response_tokens"][0] for e in batch], device=device)
    loss, chosen_rewards, rejected_rewards = dpo_loss(
        logps[:n], logps[n:], reference[:n], reference[n:], args.beta, args.loss, args.label_smoothing,
        args.nll_weight, chosen_tokens, pairs_in_batch, tokens_in_batch)
    policy = logps.detach()
    sums = torch.stack([loss.detach(), chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards > rejected_rewards).double().sum(), (chosen_rewards - rejected_rewards).sum(),
                        policy[:n].sum(), policy[n:].sum(), -policy[:n].sum() / tokens_in_batch])
    return loss, sums, sum(len(ids) for ids, _ in sequences)


def metrics_from_sums(sums, pairs, args):
    """Loss and NLL are already normalised; the rest are sums over pairs -> means."""
    return {name: float(value) / (1 if name in ("loss", "nll_loss") else pairs)
            for name, value in zip(args.metrics, sums.tolist())}


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def evaluate(model, examples, args, reference_model=None):
    """Reward accuracy and margins (or SFT loss) of the policy on held-out examples, over all processes."""
    if not examples:
        return {}
    examples = sorted(examples, key=lambda e: -e["length"])
    mine, per_rank = examples[args.rank::args.world], math.ceil(len(examples) / args.world)
    pairs, tokens = len(examples), sum(e["response_tokens"][0] for e in examples)
    sums = torch.zeros(len(args.metrics), dtype=torch.float64, device=args.device)
    model.eval()
    with torch.no_grad():
        for start in range(0, per_rank, args.batch_size):
            batch = mine[start:start + args.batch_size]
            # Every process joins every forward (FSDP gathers weights inside it), so one that ran out of
            # examples runs a throwaway batch and discards the result.
            _, batch_sums, _ = micro_batch_loss(model, batch or examples[:1], args, pairs, tokens, reference_model)
            sums += batch_sums if batch else 0
    model.train()
    return metrics_from_sums(all_reduce_sum(sums).cpu(), pairs, args)


# ----------------------------------------------------------------------------
# Reference log-probs, precomputed and cached


def model_fingerprint(name):
    """The reference's name plus its weight files' sizes and times, so a retrained directory is noticed."""
    path = common.resolve_model(name)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else []
    return [name] + [f"{os.path.basename(f)}:{os.path.getsize(f)}:{int(os.path.getmtime(f))}" for f in files]


def attach_reference_logps(examples, reference_name, load_reference, tokenizer, args):
    """Give every example its [reference chosen, reference rejected] summed log-probs.

    Cached in <output>/reference_logps.json keyed by each pair's content (and the reference's
    identity): a changed or added pair is scored, the rest read back. Missing pairs are scored with
    common.score, split over processes. load_reference() returns the model, called only when needed.
    Returns the number of pairs scored now.
    """
    cache_path = os.path.join(args.output, "reference_logps.json")
    identity = {"reference": model_fingerprint(reference_name), "device": args.device.type}
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path, encoding="utf-8") as handle:
            saved = json.load(handle)
        cache = saved["logps"] if saved.get("identity") == identity else {}
    missing = sorted({e["key"]: e for e in examples if e["key"] not in cache}.values(), key=lambda e: e["key"])
    if missing:
        model = load_reference()
        mine = missing[args.rank::args.world]
        was_training = model.training
        model.eval()
        with autocast(args.device):
            summed, counts = common.score(model, tokenizer, [e["texts"][0] for e in mine] * 2,
                                          [e["texts"][1] for e in mine] + [e["texts"][2] for e in mine],
                                          token_budget=args.score_token_budget, desc="reference log-probs",
                                          show_progress=args.rank == 0)
        model.train(was_training)
        expected = [e["response_tokens"][0] for e in mine] + [e["response_tokens"][1] for e in mine]
        if counts.tolist() != expected:  # the scorer and the trainer must see the same tokens
            raise RuntimeError("reference scorer and trainer disagree on response token counts")
        scored = {e["key"]: [summed[i].item(), summed[len(mine) + i].item()] for i, e in enumerate(mine)}
        gathered = [None] * args.world
        if dist.is_initialized():
            dist.all_gather_object(gathered, scored)
        else:
            gathered = [scored]
        for part in gathered:
            cache.update(part)
        if args.rank == 0:
            keep = {e["key"]: cache[e["key"]] for e in examples}
            write_json(cache_path, {"identity": identity, "logps": keep})
    for example in examples:
        example["reference_logps"] = cache[example["key"]]
    return len(missing)


def write_json(path, value):
    with open(path + ".partial", "w", encoding="utf-8") as handle:
        json.dump(value, handle, ensure_ascii=False, indent=1)
    os.replace(path + ".partial", path)


# ----------------------------------------------------------------------------
# Model setup, checkpoints


def prepare_for_training(model, args):
    """Train mode with every dropout at zero (the reference scores without dropout, so must the policy)."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():  # attention dropout is often a plain float attribute
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def wrap_model(model, args):
    """Plain model (1 process), DistributedDataParallel, or FSDP2 shards (--fsdp)."""
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                     if args.device.type == "cuda" else MixedPrecisionPolicy())
        layer_classes = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():  # one shard group per decoder layer, then the rest
            if type(module).__name__ in layer_classes:
                fully_shard(module, mp_policy=precision)
        return fully_shard(model, mp_policy=precision)
    if args.world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.device.index] if args.device.type == "cuda" else None, broadcast_buffers=False)
    return model


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def gradient_sync(model, enabled):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (same result, less traffic)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


def save_model(model, tokenizer, directory, rank):
    """save_pretrained of the full (gathered) weights; a collective call under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen = set()
    for name, parameter in unwrap(model).named_parameters(remove_duplicate=False):
        if id(parameter) in seen:  # a tied weight (lm_head = embeddings): gathered as a copy, stored once
            state.pop(name, None)
        seen.add(id(parameter))
    if rank == 0:
        unwrap(model).save_pretrained(directory, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(directory)


def save_checkpoint(model, optimizer, tokenizer, trainer_state, args):
    """checkpoint-N/: weights (safetensors), optimizer + RNG (torch.save), trainer_state.json.

    Written as checkpoint-N.tmp and renamed when complete; only then is the older one deleted, so a
    kill at any moment leaves at least one whole checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    output, step, rank = args.output, trainer_state["step"], args.rank
    final, temporary = os.path.join(output, f"checkpoint-{step}"), os.path.join(output, f"checkpoint-{step}.tmp")
    save_model(model, tokenizer, temporary, rank)
    optimizer_state = get_optimizer_state_dict(model, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"optimizer": optimizer_state, "rng": torch.get_rng_state()},
                   os.path.join(temporary, "training_state.pt"))
        write_json(os.path.join(temporary, "trainer_state.json"), trainer_state)
        os.replace(temporary, final)
        for old in glob.glob(os.path.join(output, "checkpoint-*")):
            if old != final:
                shutil.rmtree(old)
    common.barrier()


def latest_checkpoint(output):
    """The newest complete checkpoint-N directory (a .tmp one was cut short by a kill), or None."""
    done = [path for path in glob.glob(os.path.join(output, "checkpoint-*"))
            if not path.endswith(".tmp") and os.path.exists(os.path.join(path, "trainer_state.json"))]
    return max(done, key=lambda path: int(path.rsplit("-", 1)[1]), default=None)


def learning_rate(step, total_steps, args):
    """Linear warmup from 0, then cosine or linear decay to --min-lr (a function of the step: resumes exactly)."""
    warmup = round(args.warmup_ratio * total_steps)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if args.lr_schedule == "cosine" else 1 - progress
    return args.min_lr + decay * (args.lr - args.min_lr)


def make_optimizer(model, args):
    """AdamW; weight decay on matrices only, as usual (not on norms and biases).

    fused=True updates each tensor in one kernel: faster, and without the whole-model temporaries
    of the default multi-tensor version (one model copy less at peak).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


# ----------------------------------------------------------------------------
# Training


def my_micro_batches(step_examples, args):
    """This process's share of a global batch: --grad-accum micro-batches of --batch-size examples."""
    size, first = args.batch_size, args.rank * args.grad_accum * args.batch_size
    return [step_examples[start:start + size] for start in range(first, first + args.grad_accum * size, size)]


def train_step(model, optimizer, step_examples, args, reference_model=None):
    """One optimizer step on one global batch; returns its metrics (the same on every process).

    A non-finite loss or gradient norm returns before the optimizer steps, so the weights stay good.
    """
    pairs, tokens_in_batch = len(step_examples), sum(e["response_tokens"][0] for e in step_examples)
    mine = my_micro_batches(step_examples, args)
    sums = torch.zeros(len(args.metrics) + 1, dtype=torch.float64, device=args.device)  # + tokens
    for index, batch in enumerate(mine):
        with gradient_sync(model, enabled=index == len(mine) - 1):
            loss, batch_sums, tokens = micro_batch_loss(model, batch, args, pairs, tokens_in_batch, reference_model)
            (loss * args.world).backward()  # DDP and FSDP AVERAGE gradients over processes; this makes it the sum
        sums += torch.cat([batch_sums, batch_sums.new_tensor([tokens])])
    sums = all_reduce_sum(sums).cpu()
    metrics = metrics_from_sums(sums[:-1], pairs, args)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
    metrics.update(grad_norm=float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                   tokens=int(sums[-1]))
    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics


def measure_forward_rate(model, batches, args):
    """Tokens/s of the forward pass alone on real training micro-batches: the yardstick for training speed."""
    def forward(batch):
        sequences = [sequence for example in batch for sequence in example["sequences"]]
        sequence_logps(model, sequences, args)
        return sum(len(ids) for ids, _ in sequences)
    synchronize = torch.cuda.synchronize if args.device.type == "cuda" else lambda: None
    with torch.no_grad(), autocast(args.device):
        forward(batches[0])  # warm-up
        synchronize()
        start, tokens = time.perf_counter(), sum(forward(batch) for batch in batches)
        synchronize()
    return tokens / (time.perf_counter() - start) * args.world


def load_data(args, tokenizer):
    """(train examples, eval examples, skip counts); skips are printed with their first file:line."""
    train, rows, skipped = read_examples(args.input, args, tokenizer, args.limit)
    skip_counts = {"train": report_skips(args.input, rows, skipped, args)}
    if args.eval_pairs:
        eval_set, eval_rows, eval_skipped = read_examples(args.eval_pairs, args, tokenizer)
        skip_counts["eval"] = report_skips(args.eval_pairs, eval_rows, eval_skipped, args)
    else:
        train, eval_set = split_eval(train, args.eval_frac, args.seed)
    return train, eval_set, skip_counts


def resume_point(args, settings, total_steps):
    """(latest checkpoint or None, trainer state); a checkpoint made with other settings is refused."""
    checkpoint = latest_checkpoint(args.output)
    if checkpoint is None:
        if args.resume:
            raise common.InputError(f"--resume: no checkpoint in {args.output}")
        return None, {"step": 0, "settings": settings}
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    for name, value in settings.items():
        if state["settings"].get(name) != value:
            raise common.InputError(f"{checkpoint}: trained with {name}={state['settings'].get(name)!r}, now "
                                    f"{value!r}; rerun with the same settings or delete {args.output}")
    if args.rank == 0:
        print(f"resuming from {checkpoint} (step {state['step']} of {total_steps})")
    return checkpoint, state


def load_models(args, checkpoint, examples, tokenizer):
    """(policy ready to train, reference model or None, pairs scored now).

    The reference log-probs come first, so at most one model is in memory at a time: when the
    reference is the starting policy, the policy scores them before it trains; another reference is
    loaded, used and dropped. --reference-in-loop keeps the reference model instead.
    """
    def load(name, dtype=None):
        return common.load_model(name, args.device, dtype, args.trust_remote_code)[0]
    policy, reference_model, scored_now = None, None, 0
    reference_name = args.reference or args.model
    if args.loss != "sft" and args.reference_in_loop:
        reference_model = load(reference_name)
    elif args.loss != "sft":
        if reference_name == args.model and checkpoint is None:
            policy = load(args.model, torch.float32)
        scored_now = attach_reference_logps(examples, reference_name, lambda: policy or load(reference_name),
                                            tokenizer, args)
        gc.collect()
        torch.cuda.empty_cache() if args.device.type == "cuda" else None
    policy = policy or load(checkpoint or args.model, torch.float32)  # fp32 master weights; bf16 autocast on CUDA
    prepare_for_training(policy, args)
    return policy, reference_model, scored_now


def main():
    args = parse_args()
    timer = common.Timer()
    args.rank, args.world = common.setup_distributed()
    if args.fsdp and args.world < 2:
        raise common.InputError("--fsdp shards over processes: run under torchrun --nproc_per_node=2 or more")
    args.device, _ = common.pick_device()
    args.metrics = SFT_METRICS if args.loss == "sft" else DPO_METRICS
    common.seed_everything(args.seed)
    summary_path = os.path.join(args.output, "train_summary.json")
    if os.path.exists(summary_path):
        if args.rank == 0:
            print(f"{args.output} is complete ({summary_path} exists); delete it to train again.")
        return
    tokenizer = common.load_tokenizer(args.model, args.trust_remote_code)
    args.pad_id = tokenizer.pad_token_id

    train, eval_set, skip_counts = load_data(args, tokenizer)
    global_batch = args.batch_size * args.grad_accum * args.world
    steps_per_epoch = len(train) // global_batch
    if steps_per_epoch == 0:
        raise common.InputError(f"{args.input}: {len(train)} training rows, fewer than one global batch of "
                                f"{global_batch} (--batch-size x --grad-accum x processes)")
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    with open(args.input, "rb") as handle:
        input_sha256 = hashlib.sha256(handle.read()).hexdigest()
    settings = {name: getattr(args, name) for name in (
        "model", "reference", "loss", "beta", "label_smoothing", "nll_weight", "eval_pairs", "eval_frac", "max_length",
        "epochs", "max_steps", "lr", "min_lr", "lr_schedule", "warmup_ratio", "weight_decay", "max_grad_norm",
        "limit", "seed")}
    settings.update(global_batch=global_batch, input_sha256=input_sha256)
    checkpoint, state = resume_point(args, settings, total_steps)
    os.makedirs(args.output, exist_ok=True)

    policy, reference_model, scored_now = load_models(args, checkpoint, train + eval_set, tokenizer)
    model = wrap_model(policy, args)
    optimizer = make_optimizer(model, args)
    if checkpoint:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        saved = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=True)
        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(saved["rng"])
    state["eval_before"] = state.get("eval_before") or evaluate(model, eval_set, args, reference_model)
    lengths = [example["length"] for example in train]
    batches_of_epoch = lambda epoch: epoch_batches(lengths, global_batch, args.seed, epoch)  # noqa: E731
    forward_rate = measure_forward_rate(model, my_micro_batches([train[i] for i in batches_of_epoch(0)[0]], args),
                                        args)

    metrics_path = os.path.join(args.output, "metrics.jsonl")
    if args.rank == 0:
        dropped = len(train) - steps_per_epoch * global_batch
        print(f"training on {len(train)} rows ({steps_per_epoch} steps per epoch of {global_batch}"
              + (f"; {dropped} rows sit out each epoch to keep batches full" if dropped else "")
              + f"), {len(eval_set)} held out, {total_steps} steps, {args.world} process(es)")
        kept = []
        if os.path.exists(metrics_path):  # drop lines past the checkpoint: those steps run again
            with open(metrics_path, encoding="utf-8") as handle:
                kept = [line for line in handle if json.loads(line)["step"] <= state["step"]]
        with open(metrics_path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
    progress = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", disable=args.rank != 0,
                    dynamic_ncols=True)
    for step in range(state["step"], total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        lr = learning_rate(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        metrics = train_step(model, optimizer, [train[i] for i in batches_of_epoch(epoch)[index]], args,
                             reference_model)
        torch.cuda.synchronize() if args.device.type == "cuda" else None
        seconds = time.perf_counter() - started
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            progress.close()
            raise common.InputError(
                f"step {step + 1}: loss {metrics['loss']}, grad_norm {metrics['grad_norm']}: training stopped before "
                f"this update; last good checkpoint: {latest_checkpoint(args.output) or 'none (see --save-every)'}. "
                "Try a lower --lr or --beta.")
        record = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), **metrics, "lr": lr,
                  "tokens/s": round(metrics["tokens"] / seconds, 1)}
        if args.rank == 0:
            with open(metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            shown = {"loss": "loss", "rewards/accuracies": "acc", "rewards/margins": "margin", "tokens/s": "tok/s"}
            progress.set_postfix({short: f"{record[name]:.4g}" for name, short in shown.items() if name in record},
                                 lr=f"{lr:.2e}")
        progress.update(1)
        state.update(step=step + 1, final_step=metrics, train_seconds=state.get("train_seconds", 0) + seconds,
                     train_tokens=state.get("train_tokens", 0) + metrics["tokens"])
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(model, optimizer, tokenizer, state, args)
    progress.close()
    eval_after = evaluate(model, eval_set, args, reference_model)

    # Model files first, train_summary.json last: its presence marks the directory complete.
    temporary = os.path.join(args.output, "final.tmp")
    save_model(model, tokenizer, temporary, args.rank)
    if args.rank == 0:
        for name in os.listdir(temporary):
            os.replace(os.path.join(temporary, name), os.path.join(args.output, name))
        os.rmdir(temporary)
        tokens_per_second = state["train_tokens"] / max(state["train_seconds"], 1e-9)
        write_json(summary_path, {
            "settings": settings, "world_size": args.world, "steps": total_steps, "train_pairs": len(train),
            "eval_pairs": len(eval_set), "skipped": skip_counts, "reference_scored_now": scored_now,
            "eval_before": state["eval_before"], "eval_after": eval_after, "final_step": state["final_step"],
            "train_seconds": round(state["train_seconds"], 2), "seconds": round(timer.seconds(), 2),
            "train_tokens": state["train_tokens"], "tokens_per_second": round(tokens_per_second, 1),
            "forward_tokens_per_second": round(forward_rate, 1),
            "utilisation": round(tokens_per_second / forward_rate, 3)})
        for old in glob.glob(os.path.join(args.output, "checkpoint-*")):
            shutil.rmtree(old)
        for name, before in state["eval_before"].items():
            print(f"eval {name}: {before:.4f} -> {eval_after[name]:.4f} ({len(eval_set)} held-out rows)")
        print(common.summary_line("04_dpo", timer.seconds(), steps=total_steps, pairs=len(train),
                                  skipped=sum(sum(counts.values()) for counts in skip_counts.values()))
              + f", training {tokens_per_second:.1f} tokens/s = {tokens_per_second / forward_rate:.2f}x the "
              f"forward-only rate {forward_rate:.1f} tokens/s (forward+backward costs ~3 forwards: ~0.33 is full use)")
    common.barrier()
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
