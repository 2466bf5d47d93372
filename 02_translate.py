"""02_translate.py: the model translates its own responses (and, with --questions, the questions).

In:  responses.jsonl from 01_generate.py, one record per (id, lang) with "responses": [str, ...].
Out: translated.jsonl, the same records, each with
       "translations":     {"<lang>": [str or null, ...]}  aligned with "responses"
       "translation_info": {"<lang>": [null or why it failed, ...], "pieces": [int, ...],
                           "retried": {"<lang>": [int, ...]}, "translator": str,
                           "engine": "in-process" or the server}
     and, with --questions, "prompt_en" (the prompt translated into the dominant language).
Dominant-language records (English by default) are translated into every other language in
the file; every other record is translated into the dominant language (unless --no-into-dominant).
These are the two directions the language-imbalance pairs of 03 are built from. A text is cut at paragraph,
line and sentence boundaries into pieces of at most --piece-tokens source tokens (and always where the
model's context needs it); the pieces of every text in a block are translated together in batches
and joined back ("pieces": how many). A piece that failed is asked again, sampled (--retries;
"retried": how many pieces were).

    python 02_translate.py --input runs/loop/iter1/responses.jsonl --output runs/loop/iter1/translated.jsonl
    python 02_translate.py ... --server http://127.0.0.1:8000/v1 --batch-size 4096   # on a serving engine

How a translation is made (the mechanism of the papers' code, in our own words): the source
text goes inside <sentence> tags, the model is asked for its answer inside <translated>
tags, and the assistant turn is primed with the opening <translated> tag, so the translation
is whatever comes before the closing tag. A translation is null when the closing tag never
comes, when nothing is inside the tags, when it repeats a sentence of its source unchanged
("copied": small models often copy, and a copied sentence among translated ones passes the
language check), or when the text is not in the target language.
"""
import argparse
import math
import re
import time
from collections import Counter, defaultdict

import torch
import torch.distributed as dist
from tqdm import tqdm

import common

# ----------------------------------------------------------------------------
# The translation prompt. The instruction is always in English (the model follows English
# instructions best); only the target language's name changes.

TRANSLATION_PROMPT = (
    "Translate the text between <sentence> and </sentence> into {target}. "
    "Keep its meaning, its formatting and its line breaks. "
    "Write only the translation, between <translated> and </translated>.\n\n"
    "<sentence>{text}</sentence>"
)
OPEN_TAG, CLOSE_TAG = "<translated>", "</translated>"
ECHOED_TAGS = (OPEN_TAG, "<sentence>", "</sentence>")  # tags a model sometimes repeats inside its answer

# Why a translation is null. 03 counts skipped pairs by these names. length_cap is a missing
# closing tag where the model was still writing when it hit its token cap (no_closing_tag:
# it ended its turn without one); many of those mean the cap is too small or the model loops.
NO_CLOSING_TAG, LENGTH_CAP, EMPTY = "no_closing_tag", "length_cap", "empty"
WRONG_LANGUAGE, EMPTY_SOURCE, TOO_LONG, COPIED = "wrong_language", "empty_source", "too_long", "copied"
REASONS = (NO_CLOSING_TAG, LENGTH_CAP, EMPTY, WRONG_LANGUAGE, COPIED, EMPTY_SOURCE, TOO_LONG)
# A piece whose "translation" repeats a source sentence of at least this many letters unchanged is a copy,
# not a translation (small models copy often; the language check alone misses a copied sentence among
# translated ones).
COPY_LETTERS = 20
# A source text longer than this many context-sized pieces is not an answer to translate (a runaway
# generation, a pasted file): it is skipped as too_long before it is even tokenised.
MAX_PIECES = 64

# A translation may use at most LENGTH_FACTOR x (source tokens) x (how many more tokens the
# target language needs than the source language) + EXTRA_TOKENS new tokens. The cap stops a
# model that loops from running for ever; it has to be generous because a tokenizer built
# mostly for English spends far more tokens on other scripts (SmolLM2: Russian ~3.8x English).
LENGTH_FACTOR = 2.0
EXTRA_TOKENS = 16
# Too-long texts are cut at the coarsest of these boundaries that makes every piece fit.
# Each is (where to cut, what goes back between the pieces): a sentence keeps its own full stop.
SPLIT_SEPARATORS = (("\n\n", "\n\n"), ("\n", "\n"), (r"(?<=[.!?]) ", " "), (" ", " "))


def translation_request(text, target):
    """The user message asking for `text` in language `target` (a code of common.LANGUAGES)."""
    return TRANSLATION_PROMPT.format(target=common.language_name(target), text=text)


def extract_translation(output):
    """The model's answer (generated after the primed <translated>) -> (text, None) or (None, reason).

    The translation is everything before the first closing tag. Opening tags the model
    repeats or nests inside its answer, and echoed <sentence> tags, are removed.
    """
    end = output.find(CLOSE_TAG)
    if end < 0:
        return None, NO_CLOSING_TAG
    text = output[:end]
    for tag in ECHOED_TAGS:
        text = text.replace(tag, "")
    text = text.strip()
    if not text:
        return None, EMPTY
    return text, None


def check_language(text, target):
    """(text, None) when `text` reads as `target` (numbers and code pass), else (None, wrong_language)."""
    if common.is_in_language(text, target):
        return text, None
    return None, WRONG_LANGUAGE


def copied(source, text):
    """True when `text` repeats a sentence of `source` (COPY_LETTERS letters or more, 4+ words) unchanged."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?:;])\s+|\n+", source)]
    return any(sum(c.isalpha() for c in s) >= COPY_LETTERS and len(s.split()) >= 4 and s in text
               for s in sentences)


def read_piece(piece, output):
    """One piece's answer -> (its translation, None) or (None, why it is not one)."""
    text, reason = extract_translation(output["text"])
    if reason == NO_CLOSING_TAG and output["truncated"]:
        return None, LENGTH_CAP
    if reason:
        return None, reason
    return (None, COPIED) if copied(piece, text) else (text, None)


def worth_retrying(piece, output, target):
    """A piece to ask again: no usable answer, or a sentence-long answer (40+ letters) in another language."""
    text, reason = read_piece(piece, output)
    if reason is not None:
        return True
    return sum(c.isalpha() for c in text) >= 40 and not common.is_in_language(text, target)


def split_text(text, fits, separators=SPLIT_SEPARATORS):
    """Cut `text` into [(piece, separator_after), ...] so that fits(piece) holds for each piece.

    Paragraphs are packed together while they fit; a paragraph that does not fit on its own
    is cut at line breaks, then sentences, then words. Joining piece + separator_after for
    every piece gives back `text`. A single word longer than the limit stays one piece.
    """
    if fits(text) or not separators:
        return [(text, "")]
    (boundary, separator), finer = separators[0], separators[1:]
    pieces, current = [], None
    for part in re.split(boundary, text):
        candidate = part if current is None else current + separator + part
        if fits(candidate):
            current = candidate
            continue
        if current is not None:
            pieces.append((current, separator))
            current = None
        if fits(part):
            current = part
        else:
            sub_pieces = split_text(part, fits, finer)
            pieces.extend(sub_pieces[:-1] + [(sub_pieces[-1][0], separator)])
    if current is not None:
        pieces.append((current, separator))
    pieces[-1] = (pieces[-1][0], "")
    return pieces


# ----------------------------------------------------------------------------
# Input


def read_responses(path, limit):
    """01's records, checked: each names a known language, has its prompt as text and a list of string
    responses (03 reads the prompt: a record it would refuse stops here, before any translating)."""
    rows = common.read_jsonl(path, required=("id", "lang", "prompt", "responses"))
    seen = {}
    for line_number, record in rows:
        where = f"{path}:{line_number}"
        common.language_name(record["lang"], where)
        responses = record["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise common.InputError(f"{where}: 'responses' must be a list of strings")
        if not isinstance(record["prompt"], str):
            kind = type(record["prompt"]).__name__
            raise common.InputError(f"{where}: 'prompt' must be a string, not {kind}")
        key = (str(record["id"]), record["lang"])
        if key in seen:
            raise common.InputError(f"{where}: id '{key[0]}' in language '{key[1]}' already on line "
                                    f"{seen[key]}")
        seen[key] = line_number
    return common.first_ids(rows, limit, id_of=lambda row: str(row[1]["id"]))


def pick_translator(rows, path, translator):
    """--translator if given, else the model that wrote the responses (all records must agree)."""
    if translator:
        return translator
    first_line, first_model = None, None
    for line_number, record in rows:
        model = record.get("model", common.EMBEDDED_MODEL)
        if first_model is None:
            first_line, first_model = line_number, model
        elif model != first_model:
            raise common.InputError(f"{path}:{line_number}: written by '{model}' but line {first_line} by "
                                    f"'{first_model}'; pass --translator to choose the model that translates")
    return first_model or common.EMBEDDED_MODEL


def token_ratios(records, tokenizer):
    """{(source, target): tokens target-language text takes per token of source-language text}.

    Measured on the prompts of the file itself: the same id in two languages is the same
    prompt, so summing their token counts compares the two languages under this tokenizer.
    """
    tokens = defaultdict(dict)  # id -> lang -> token count of that prompt
    for record in records:
        if isinstance(record.get("prompt"), str):
            ids = tokenizer(record["prompt"], add_special_tokens=False).input_ids
            tokens[str(record["id"])][record["lang"]] = len(ids)
    sums = defaultdict(lambda: [0, 0])  # (source, target) -> [target tokens, source tokens]
    for by_lang in tokens.values():
        for source in by_lang:
            for target in by_lang:
                sums[source, target][0] += by_lang[target]
                sums[source, target][1] += by_lang[source]
    return {pair: target / max(source, 1) for pair, (target, source) in sums.items()}


def plan_targets(records, dominant, targets, into_dominant=True):
    """{(id, lang): [target languages]}: dominant records go into every target, the others into dominant
    (unless into_dominant is False: then they are left untranslated)."""
    present = list(dict.fromkeys(record["lang"] for record in records))
    others = [code for code in (targets or present) if code != dominant]
    plan = {}
    for record in records:
        key = (str(record["id"]), record["lang"])
        if record["lang"] == dominant:
            plan[key] = others
        else:
            plan[key] = [dominant] if record["lang"] in others and into_dominant else []
    return plan


# ----------------------------------------------------------------------------
# Translating. A record becomes jobs (one text into one language); a job becomes pieces
# (one model call each, usually just one); the pieces' answers are joined back into the job's
# translation, and the jobs' translations into the record.


def max_new_tokens(source_tokens, ratio):
    """The cap on a translation's length: generous, but it stops a looping model."""
    return math.ceil(LENGTH_FACTOR * max(1.0, ratio) * source_tokens) + EXTRA_TOKENS


def piece_limit(context, overhead, ratio):
    """Most source tokens a piece may have so that request + piece + translation fit the context."""
    room = context - overhead - EXTRA_TOKENS
    return max(8, int(room / (1 + LENGTH_FACTOR * max(1.0, ratio))))


def make_jobs(record, targets, question_target, count_tokens, limit, context_limit):
    """[{slot, target, pieces}] for one record: every response into every target (+ the question).

    slot is the response's index, or "prompt". pieces is split_text's [(piece, separator)],
    empty for an empty source text (nothing to translate), None for one over MAX_PIECES pieces long
    (counted by characters, at most ~8 per token) of context_limit tokens each, whatever the piece size.
    """
    texts = [(index, target, response) for target in targets
             for index, response in enumerate(record["responses"])]
    if question_target:
        texts.append(("prompt", question_target, record["prompt"]))
    fits = lambda piece: count_tokens(piece) <= limit  # noqa: E731
    return [{"slot": slot, "target": target, "pieces": None if len(text) > 8 * MAX_PIECES * context_limit else
             split_text(text, fits) if text.strip() else []} for slot, target, text in texts]


def generate_translations(engine, tokenizer, requests, batch_size, sampling, progress):
    """requests: [(prompt text, cap, ...)]. Returns, in order, one common.generate sample per request:
    {"text": the model's output after <translated>, "truncated": hit its cap, "new_tokens"}.

    Each request has its own cap (max new tokens), whatever the others in its batch have; the engine takes the
    longest prompts first, batch_size at a time.
    """
    outputs = [None] * len(requests)
    for batch in common.generate(engine, tokenizer, [text for text, *_ in requests], batch_size=batch_size,
                                 max_new_tokens=[cap for _, cap, *_ in requests], show_progress=False,
                                 **sampling):
        for index, samples in batch:
            outputs[index] = samples[0]
        progress.update(len(batch))
    return outputs


def finish_job(job, outputs):
    """Join a job's pieces: (translation, None), or (None, reason) if any piece failed.

    outputs: one generate_translations sample per piece (None for a whitespace-only piece).
    """
    if not job["pieces"]:
        return None, EMPTY_SOURCE if job["pieces"] is not None else TOO_LONG
    parts = []
    for (piece, separator), output in zip(job["pieces"], outputs):
        # A whitespace-only piece is kept as it is.
        text, reason = (piece, None) if output is None else read_piece(piece, output)
        if reason:
            return None, reason
        parts.append(text + separator)
    return check_language("".join(parts).strip(), job["target"])


def finish_record(record, targets, jobs, outputs, prompt_field, translator_name, engine_name):
    """The record with "translations", "translation_info" (and prompt_field) filled in."""
    n = len(record["responses"])
    translations = {target: [None] * n for target in targets}
    info = {target: [None] * n for target in targets}
    # pieces: the same for every target
    info["pieces"], info["retried"] = [0] * n, {target: [0] * n for target in targets}
    finished = dict(record)
    for job, job_outputs in zip(jobs, outputs):
        text, reason = finish_job(job, job_outputs)
        if job["slot"] == "prompt":
            finished[prompt_field] = text
            info[prompt_field] = reason
            info["prompt_pieces"] = len(job["pieces"] or [])
        else:
            translations[job["target"]][job["slot"]] = text
            info[job["target"]][job["slot"]] = reason
            info["pieces"][job["slot"]] = len(job["pieces"] or [])
            info["retried"][job["target"]][job["slot"]] = sum(1 for output in job_outputs
                                                              if output and output.get("retried"))
    finished["translations"] = translations
    finished["translation_info"] = {**info, "translator": translator_name, "engine": engine_name}
    return finished


def translate_records(records, plan, engine, tokenizer, context, args, ratios, progress, tokens_generated):
    """Yield lists of finished records, a block of about 4 batches of model calls at a time.

    plan: {(id, lang): targets}. tokens_generated: a one-element list, added to.
    """
    count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    longest_name = max(common.LANGUAGES, key=lambda code: len(common.LANGUAGES[code]))
    empty_request = translation_request("", longest_name)
    overhead = len(common.chat_prompt_ids(tokenizer, empty_request, assistant_prefix=OPEN_TAG))
    sampling = {name: getattr(args, name) for name in ("temperature", "top_p", "repetition_penalty", "seed")}
    prompt_field = f"prompt_{args.dominant}"

    planned = []  # per record: its targets, jobs, model requests, and which (job, piece) each request is
    for record in records:
        targets = plan[(str(record["id"]), record["lang"])]
        asked = args.questions and targets and record["lang"] != args.dominant
        question_target = args.dominant if asked else None
        worst_ratio = max([ratios.get((record["lang"], t), 1.0) for t in targets] or [1.0])
        context_limit = piece_limit(context, overhead, worst_ratio)
        limit = min(context_limit, args.piece_tokens or math.inf)
        jobs = make_jobs(record, targets, question_target, count_tokens, limit, context_limit)
        requests, owner = [], []  # owner[k] = (job index, piece index) of request k
        for job_index, job in enumerate(jobs):
            ratio = ratios.get((record["lang"], job["target"]), 1.0)
            for piece_index, (piece, _) in enumerate(job["pieces"] or []):
                if piece.strip():
                    text = common.chat_prompt_text(tokenizer, translation_request(piece, job["target"]),
                                                   assistant_prefix=OPEN_TAG)
                    requests.append((text, max_new_tokens(count_tokens(piece), ratio), piece, job["target"]))
                    owner.append((job_index, piece_index))
        planned.append({"record": record, "targets": targets, "jobs": jobs, "requests": requests,
                        "owner": owner})
    progress.total = sum(len(item["requests"]) for item in planned)
    progress.refresh()

    # Records go to the model in blocks of at least 4 batches of requests: enough to sort by
    # length, small enough that a kill loses little (finished blocks are on disk).
    block = []
    for position, item in enumerate(planned):
        block.append(item)
        if sum(len(b["requests"]) for b in block) < 4 * args.batch_size and position + 1 < len(planned):
            continue
        requests = [request for b in block for request in b["requests"]]
        results = generate_translations(engine, tokenizer, requests, args.batch_size, sampling, progress)
        for attempt in range(args.retries):  # pieces that failed are asked again, sampled
            again = [k for k, (_, _, piece, target) in enumerate(requests)
                     if worth_retrying(piece, results[k], target)]
            progress.total += len(again)
            retry = dict(sampling, temperature=args.retry_temperature, seed=args.seed + 1 + attempt)
            for k, sample in zip(again, generate_translations(engine, tokenizer, [requests[k] for k in again],
                                                             args.batch_size, retry, progress)):
                tokens_generated[0] += results[k]["new_tokens"]
                results[k] = dict(sample, retried=results[k].get("retried", 0) + 1)
        results = iter(results)
        finished = []
        for b in block:
            outputs = [[None] * len(job["pieces"] or []) for job in b["jobs"]]
            for job_index, piece_index in b["owner"]:
                sample = next(results)
                outputs[job_index][piece_index] = sample
                tokens_generated[0] += sample["new_tokens"]
            finished.append(finish_record(b["record"], b["targets"], b["jobs"], outputs, prompt_field,
                                          args.translator, common.engine_name(engine)))
        yield finished
        block = []


# ----------------------------------------------------------------------------
# The end-of-run summary


def summarise(records, dominant):
    """{direction: Counter(ok=..., <reason>=...)}, e.g. "en->es", and "question es->en" for --questions."""
    table = defaultdict(Counter)
    prompt_field = f"prompt_{dominant}"
    for record in records:
        info = record["translation_info"]
        for target in record["translations"]:
            for reason in info[target]:
                table[f"{record['lang']}->{target}"][reason or "ok"] += 1
        if prompt_field in info:
            table[f"question {record['lang']}->{dominant}"][info[prompt_field] or "ok"] += 1
    return table


def format_summary(table):
    """The per-direction table printed at the end of a run."""
    lines = [f"{'direction':<18}{'ok':>12}" + "".join(f"  {reason}" for reason in REASONS)]
    for direction in sorted(table):
        counts = table[direction]
        total = sum(counts.values())
        ok = f"{counts['ok']}/{total} {100 * counts['ok'] / total:3.0f}%"
        lines.append(f"{direction:<18}{ok:>12}"
                     + "".join(f"{counts[reason]:>{len(reason) + 2}}" for reason in REASONS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--input", default="runs/loop/iter1/responses.jsonl", help="01's responses (default: %(default)s)")
    add("--output", default="runs/loop/iter1/translated.jsonl",
        help="where the translated records go (default: %(default)s)")
    add("--translator", "--model", dest="translator", default=None,
        help=f"model that translates: a hub id, a local directory or '{common.EMBEDDED_MODEL}' (default: the "
             "model that wrote the responses, from the records' 'model' field: the policy translates itself)")
    add("--dominant", default="en", help="the strong language (default: en)")
    add("--targets", default=None, help="comma-separated other languages to work with (default: every "
        "language in the input); dominant records go into each, their records into the dominant language")
    add("--into-dominant", action=argparse.BooleanOptionalAction, default=True,
        help="also translate the other languages' answers into the dominant language, for 03's "
             "dominant-language pairs (default: yes; --no-into-dominant: only out of it, as the CPU demo "
             "does, where a 135M model copies its source instead: RESULTS.md section 2)")
    add("--questions", action="store_true",
        help="also translate each non-dominant prompt into the dominant language (field prompt_en)")
    add("--batch-size", type=int, default=64, help="pieces translated together (default: %(default)s; a "
        "batch runs until its longest piece ends, so many short pieces per batch pay off)")
    add("--temperature", type=float, default=0.0, help="0 = greedy, as in the papers (default)")
    add("--top-p", type=float, default=1.0, help="nucleus sampling, when temperature > 0")
    add("--repetition-penalty", type=float, default=1.0,
        help="1.0 = none (default: a penalty would punish copying names and numbers)")
    add("--piece-tokens", type=int, default=48,
        help="longest piece translated in one call, in source tokens: a text is cut at paragraph, line, "
             "then sentence boundaries into pieces of at most this size, translated together in batches and "
             "joined (0: whole texts, cut only where the context needs it; default: %(default)s, what a 135M "
             "model translates reliably)")
    add("--retries", type=int, default=1, help="pieces without a usable translation are asked again, "
        "sampled, this many times (default: %(default)s)")
    add("--retry-temperature", type=float, default=0.7, help="their temperature (default: %(default)s)")
    add("--seed", type=int, default=0, help="random seed (matters only when sampling)")
    add("--limit", type=int, default=None, help="translate only the first N ids (all their languages)")
    common.add_server_flags(parser)
    add("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    args = parser.parse_args(argv)
    common.language_name(args.dominant, "--dominant")
    args.targets = [code.strip() for code in (args.targets or "").split(",") if code.strip()] or None
    for code in args.targets or []:
        common.language_name(code, "--targets")
    common.refuse({
        "--batch-size and --limit must be at least 1":
            args.batch_size < 1 or (args.limit is not None and args.limit < 1),
        "--piece-tokens and --retries must be >= 0, --retry-temperature > 0":
            args.piece_tokens < 0 or args.retries < 0 or not args.retry_temperature > 0,
        "--temperature must be >= 0, --top-p in (0, 1], --repetition-penalty > 0":
            not (args.temperature >= 0 and 0 < args.top_p <= 1 and args.repetition_penalty > 0)})
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    rows = read_responses(args.input, args.limit)
    if not rows:
        raise common.InputError(f"{args.input}: no records to translate")
    records = [record for _, record in rows]
    args.translator = pick_translator(rows, args.input, args.translator)
    plan = plan_targets(records, args.dominant, args.targets, args.into_dominant)

    rank, world_size = common.setup_distributed()
    shaping = ("translator", "dominant", "targets", "into_dominant", "questions", "temperature", "top_p",
               "repetition_penalty", "seed", "piece_tokens", "retries", "retry_temperature")
    settings = {name: getattr(args, name) for name in shaping}
    # The model loads and the servers serve it: checked before anything is written.
    load_engine = common.check_engine(args.translator, args.server, args.server_model,
                                      args.server_concurrency, args.trust_remote_code)
    if common.claim(args.output, {**settings, "input": common.content_key(records)}, rank,
                    files={"input": args.input}):
        return
    engine, tokenizer, context = load_engine()
    ratios = token_ratios(records, tokenizer)
    tokens_generated = [0]
    progress = tqdm(desc="translate", unit="text", disable=rank != 0, dynamic_ncols=True)
    key = lambda record: (str(record["id"]), record["lang"])  # noqa: E731
    already_done, mine = common.resume(args.output, records, key, rank, world_size)
    for finished in translate_records(mine, plan, engine, tokenizer, context, args, ratios, progress,
                                      tokens_generated):
        common.save_batch(args.output, finished, rank)
    common.finish(args.output, records, key, rank)
    progress.close()

    counts = torch.tensor([len(mine), tokens_generated[0]], device=common.pick_device()[0])
    if dist.is_initialized():
        dist.all_reduce(counts)
    if rank == 0:
        finished = common.read_jsonl(args.output)
        table = summarise([record for _, record in finished], args.dominant)
        print(format_summary(table))
        totals = sum(table.values(), Counter())
        untranslated = sum(1 for _, record in finished if not record["translations"])
        print(common.summary_line(
            "translate", time.perf_counter() - started, int(counts[1]), records=len(finished),
            resumed=already_done,
            translated_now=int(counts[0]), texts=sum(totals.values()), ok=totals["ok"],
            null=sum(totals[reason] for reason in REASONS),
            **{reason: totals[reason] for reason in REASONS},
            records_with_no_target=untranslated))
        print(f"wrote {args.output} (translator {args.translator}, {common.engine_name(engine)})")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
