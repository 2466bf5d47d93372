"""Shared test fixtures: tiny randomly initialised models that use the embedded model's tokenizer.

A 2-layer, 64-wide Llama with the real 49k-token vocabulary runs a forward pass in
milliseconds, yet tokenises, templates and pads exactly like the real model, which is
where most bugs live. Tests that need the real model are marked `slow`.
"""
import os
import signal
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data")  # only what the repository ships: a clone has nothing beside it
sys.path.insert(0, REPO)

import common  # noqa: E402

# The tests check numbers against hand computations in fp32, the CPU's default (common.pick_device), even where the
# user's shell sets LOOP_BF16=1. Tests of the bf16 path set LOOP_BF16=1 themselves; subprocesses inherit this.
os.environ["LOOP_BF16"] = "0"


def make_tiny_model(directory, seed=0, layers=2, hidden=64, vocab_size=None, init_std=0.02, architecture="llama"):
    """Save a random tiny Llama (or Gemma 2, soft-capped logits) plus the embedded tokenizer to `directory`.

    With the usual init_std 0.02 its greedy answers are one token repeated; a larger one
    gives answers that vary with the prompt (what the generation tests need).
    """
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(common.embedded_model_dir())
    shape = dict(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=2048, tie_word_embeddings=True,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, initializer_range=init_std)
    if architecture == "gemma2":  # Gemma 2 soft-caps its final logits: tanh(logits / cap) * cap
        config, model_class = Gemma2Config(**shape, head_dim=hidden // 4, final_logit_softcapping=2.0), Gemma2ForCausalLM
    else:
        config, model_class = LlamaConfig(**shape), LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny random model directory (shared by the whole test session)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def lively_model(tmp_path_factory):
    """A tiny random model whose greedy answers differ from prompt to prompt and token to token."""
    return make_tiny_model(tmp_path_factory.mktemp("lively-model"), init_std=0.2)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory):
    """A second tiny model, different weights, same tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model-b"), seed=1)


def run_script(script, *args, env=None, timeout=600, check=False):
    """Run one of the numbered scripts as a user would; returns CompletedProcess."""
    # One thread: tiny models gain nothing from more, and on a busy 2-core machine spinning
    # OpenMP threads make each step many times slower.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                **(env or {})}
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                            capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def run_torchrun(script, nproc, *args, timeout=600):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(REPO, script), *map(str, args)]
    # Own process group, so a hang (say, a rendezvous that never completes) kills every rank, not just torchrun.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                               cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def read_records(path):
    import json
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
