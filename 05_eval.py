"""05_eval.py: did the loop help? Math, multiple choice, win rate, language fidelity, consistency, alignment.

In:  models to compare (--models: the base model first, then each iteration's), MGSM TSVs,
     the bundled math set (data/math/{lang}.jsonl with question/answer), the bundled multiple-choice
     set (data/choice/{lang}.jsonl with question/choices/answer), instruction prompts.
Out: in --output (default runs/loop/eval/):
     eval.json         per model, per metric, per language: score, n, 95% interval
     predictions.jsonl every prompt, response, extracted answer, judge verdicts
     report.md         first the effect (the last model minus the first on the targeted metric, language
                       fidelity of answers to held-out prompts, paired by prompt, with 95% intervals), per
                       language and pooled over the languages besides English; then models as columns,
                       metric x language as rows, deltas against the first model
     report.png        per-language bars per model, one panel per metric (needs matplotlib)

    python 05_eval.py --models smollm2-135m runs/loop/iter1/model --tasks mgsm,winrate,choice --limit 20

Tasks (--tasks):
  mgsm, math  greedy step-by-step answer in the problem's language; the last number in the
              answer is right when within 1e-3 of gold. Also reported: language fidelity
              (share of answers written in the prompt's language), cross-lingual consistency
              (CrossIn: share of parallel problems answered alike in every language) and its
              harmonic mean with accuracy. --translate-test adds `mgsm-tt`/`math-tt`: the model
              first translates the question into English, then answers that (question alignment).
              --math-mode code: the model writes a Python program instead, run in a separate, limited
              process (no files, network, environment; time and memory limits); its last printed number
              counts.
  winrate     each model's answers judged against the first model's (or --reference-answers, e.g.
              X-AlpacaEval's GPT-4-turbo answers), in both orders (a judge that favours a slot cancels out),
              ties count half.
              Judge: a local model's next-token log-probs of "A" vs "B" (--judge), or a model behind an
              OpenAI-compatible server (--judge-server, key from $OPENAI_API_KEY). Also the length-controlled
              win rate (AlpacaEval 2): the judge's preference fitted against the answers' length difference
              and read at zero difference.
  choice      multiple choice (question, choices, answer: letter or index; xCSQA's shape too): the option
              whose letter the model gives the highest log-prob as its answer's first token. Accuracy,
              and consistency (the same option chosen in every language).
  alignment   for the parallel MGSM questions, the cosine between each language's mean hidden state and
              English's, per layer (the question-alignment paper's analysis).
A column whose model one of the --server URLs lists (as its /v1/models names it) is answered by
that server; the others in-process (choice and alignment read a model's log-probs or hidden states, so they
always run in-process, and not for the proxy-tuned column, which has no single model).
With --proxy-expert/--proxy-antiexpert one more column is evaluated: the first model
proxy-tuned, logits = first + alpha * (expert - antiexpert).
A hub dataset is name:config[:split], {lang} in it standing for each language.
--reference-answers: JSONL with id, prompt, response (one {lang}.jsonl per language, e.g. X-AlpacaEval's
GPT-4-turbo answers), one for every judged prompt, asked with the same text.
--limit 180,en=60: the first 180 ids in each language, and the first 60 of those same ids in English (fewer
where a model is at its ceiling). --middle-limit: the same for the models between the first and the last
(loop.sh's M1), which the effect does not compare. --judge-limit N judges the first N ids; every prompt is
still answered, for language fidelity. --answers-only: a later run without it reuses those answers (loop.sh
serves one model at a time).
If a model directory holds train_summary.json (from 04_dpo.py), its held-out reward accuracy
is reported too. --trained-on takes the loop's training records (default: each responses.jsonl beside the
default --models): an evaluated prompt among them stops the run. Resumable: finished (model, task) work
files in --output/work/ are reused; a killed run continues. Runs under `torchrun --nproc_per_node=K`
(prompts sharded, rank 0 reports).
"""
import argparse
import functools
import glob
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

import common

REPO = os.path.dirname(os.path.abspath(__file__))
LOOP_RUN = "runs/loop"  # where loop.sh writes; the default --models are read from it
MATH_TASKS = ("mgsm", "math")
SCORED_TASKS = ("choice", "alignment")  # read the model's own log-probs or hidden states: in-process only
TASKS = MATH_TASKS + ("winrate",) + SCORED_TASKS
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

JUDGE_PROMPT = """Two assistants answered the same instruction. Decide which answer is better: more helpful, \
correct and complete, and written in the language of the instruction.

[Instruction]
{instruction}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Which answer is better? Reply with one letter: A or B."""
CHOICE_PROMPT = "{question}\n\n{options}\n\nAnswer with the letter of the correct option."
CODE_INSTRUCTION = ("Write a short Python program that computes the answer and prints it as a number. "
                    "Reply with the program only, in a ```python block.")


# What the loop targets, chosen before the demo runs that report it (README, "What to expect"): is the
# answer to a held-out instruction written in the instruction's language. Reported first, as the effect of
# the last model against the first, paired by prompt.
# The winrate task's answers, read for their language: not a win rate, so not named after the task.
INSTRUCTION_FIDELITY = "language fidelity of answers to instructions"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default after its help."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--models", nargs="+", default=None, help="the first is the baseline (default: the embedded model, "
        f"then each finished {LOOP_RUN}/iter*/model)")
    add("--tasks", default="mgsm,math,winrate", help=f"comma-separated, from {','.join(TASKS)}")
    add("--langs", default="en,es,de,fr,ru,zh", help="comma-separated language codes")
    add("--mgsm", default="data/mgsm", help="MGSM: mgsm_{lang}.tsv files, JSONL or a hub dataset")
    add("--math", default="data/math", help="math set: {lang}.jsonl files, JSONL or a hub dataset")
    add("--prompts", default="data/x-alpacaeval", help="instructions for the win rate and language fidelity")
    add("--choice", default="data/choice", help="multiple choice: {lang}.jsonl files, JSONL or a hub dataset")
    add("--math-mode", choices=("cot", "code"), default="cot", help="text, or a program (above)")
    add("--reference-answers", default=None, metavar="DIR_OR_FILE", help="judge against these (id, prompt, "
        "response) instead of the first model's answers")
    add("--trained-on", nargs="*", default=None, metavar="FILE", help="each iteration's responses.jsonl")
    add("--output", default="runs/loop/eval", help="output directory")
    add("--limit", type=parse_limit, default=None, metavar="N[,LANG=M...]", help="the first N ids per task "
        "(the same in every language); LANG=M: M in that language")
    add("--middle-limit", type=parse_limit, default=None, metavar="N[,LANG=M...]", help="as --limit, for the "
        "models between the first and the last")
    add("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    add("--batch-size", type=int, default=16, help="prompts decoded at once")
    add("--judge-limit", type=int, default=None, help="judge only the first N prompt ids")
    add("--token-budget", type=int, default=8192, help="local judge: rows x longest row per batch")
    add("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    add("--translate-test", action="store_true", help="also the math tasks' -tt variants (above)")
    common.add_server_flags(parser, server_model=False)  # a column a --server lists is answered there
    add("--answers-only", action="store_true", help="answer with the --server columns only, then stop")
    add("--judge", default=common.EMBEDDED_MODEL, help="local judge, or the model name for --judge-server")
    add("--judge-server", nargs="+", default=None, metavar="URL", help="OpenAI-compatible base URL(s) of the "
        f"judge (key from ${common.SERVER_KEY_ENV})")
    add("--judge-max-tokens", type=int, default=8, help="longest judge reply from --judge-server")
    add("--proxy-expert", default=None, help="the small tuned model (above)")
    add("--proxy-antiexpert", default=None, help="the same small model untuned")
    add("--proxy-alpha", type=float, default=1.0, help="weight of (expert - antiexpert)")
    add("--trust-remote-code", action="store_true", help="allow model code from the hub")
    args = parser.parse_args(argv)
    args.tasks = [task for task in args.tasks.split(",") if task]
    args.langs = [code for code in args.langs.split(",") if code]
    unknown = [t for t in args.tasks if t not in TASKS]
    for lang in args.langs:
        common.language_name(lang, "--langs")
    limits = [count for limit in (args.limit, args.middle_limit) if limit for count in limit.values()]
    counts = (args.max_new_tokens, args.batch_size, args.server_concurrency,
              *(1 if count is None else count for count in limits + [args.judge_limit]))
    common.refuse({
        f"--tasks: unknown task(s) {','.join(unknown) or '(none)'} (known: {','.join(TASKS)})":
            unknown or not args.tasks,
        "--tasks alignment compares each language with English: --langs needs en and another":
            "alignment" in args.tasks and ("en" not in args.langs or len(args.langs) < 2),
        "--proxy-expert and --proxy-antiexpert go together":
            (args.proxy_expert is None) != (args.proxy_antiexpert is None),
        "--answers-only answers the columns a --server serves: give --server":
            args.answers_only and not args.server,
        "--max-new-tokens, --batch-size, --server-concurrency, --middle-limit, --limit and --judge-limit "
        "must be at least 1":
            min(counts) < 1})
    return args


def parse_limit(text):
    """--limit's value: {lang: count}, None standing for every language not named ("240,en=60")."""
    limit = {None: None}
    for part in text.split(","):
        lang, _, count = part.rpartition("=")
        try:
            limit[lang.strip() or None] = int(count)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected N or N,LANG=M") from None
        if lang:
            common.language_name(lang.strip(), "--limit")
    return limit


def limit_text(limit):
    """A parsed --limit as it was typed, for messages: 240, or "240,en=60"."""
    if limit is None:
        return None
    text = ",".join(([] if limit[None] is None else [str(limit[None])]) +
                    [f"{lang}={count}" for lang, count in limit.items() if lang])
    return int(text) if text.isdigit() else text


# ----------------------------------------------------------------------------
# Inputs


def first_ids_per_language(items, limit):
    """The items of the first limit[lang] ids in their language (limit[None] for a language not named; None:
    all); the ids come in one order for every language, so a smaller set is part of a larger one."""
    if limit is None:
        return items
    order = {id_: rank for rank, id_ in enumerate(dict.fromkeys(str(item["id"]) for item in items))}
    count = lambda item: limit.get(item["lang"], limit[None]) or math.inf  # noqa: E731
    return [item for item in items if order[str(item["id"])] < count(item)]


def check_gold(answer, where):
    """A math problem's gold answer as a float; a missing or bad one is reported with file and line."""
    if answer is None:
        raise common.InputError(f"{where}: no 'answer' field (math problems need a numeric gold answer)")
    numeric = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    value = answer if numeric else common.parse_number(answer)
    if value is None or not abs(value) <= 1e300:  # NaN, inf, and an integer too large to be a float
        raise common.InputError(f"{where}: gold answer {str(answer)[:40]!r} is not a number")
    return float(value)


def check_choice(record, where):
    """A multiple-choice record, made uniform in place: `choices` a list of option texts, `answer` the right
    one's index. Accepts options as texts or {label, text} records (as columns too, the way datasets stores
    them), the answer as a letter or an index, and xCSQA's shape: question {stem, choices}, answerKey."""
    if isinstance(record.get("question"), dict):  # xCSQA
        record["choices"] = record["question"].get("choices")
        record["question"] = record["question"].get("stem")
    choices, answer = record.get("choices"), record.pop("answerKey", record.get("answer"))
    if isinstance(choices, dict) and isinstance(choices.get("text"), list):  # {"label": [...], "text": [...]}
        choices = choices["text"]
    if isinstance(choices, list):
        choices = [c.get("text") if isinstance(c, dict) else c for c in choices]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or not all(
            isinstance(c, str) and c.strip() for c in choices):
        raise common.InputError(f"{where}: 'choices' must list 2 to 26 non-empty options")
    index = answer if isinstance(answer, int) and not isinstance(answer, bool) else \
        LETTERS.find(answer.strip().upper()) if isinstance(answer, str) and len(answer.strip()) == 1 else -1
    if not 0 <= index < len(choices):
        raise common.InputError(f"{where}: answer {answer!r} is not one of the {len(choices)} options "
                                f"(a letter A-{LETTERS[len(choices) - 1]} or an index 0-{len(choices) - 1})")
    record.update(choices=choices, answer=index)


def load_reference_answers(source, items, langs, judge_limit):
    """{(id, lang): answer record} from --reference-answers: one for every prompt that will be judged, asked
    with the same text, or the run stops here, before any model loads."""
    def check(record, where):
        record.setdefault("response", record.pop("output", None))  # AlpacaEval's files call it "output"
        if not isinstance(record["response"], str):
            raise common.InputError(f"{where}: a reference answer needs a 'response' text")
    answers = {(r["id"], r["lang"]): r for r in common.load_prompts(source, langs=langs, check=check)}
    judged = common.first_ids(items, judge_limit)
    missing = [f"'{item['id']}' ({item['lang']})" for item in judged
               if (item["id"], item["lang"]) not in answers]
    if missing:
        raise common.InputError(f"--reference-answers {source}: no answer for {len(missing)} judged "
                                f"prompt(s), e.g. {', '.join(missing[:3])}; its ids and languages must be "
                                "those of --prompts")
    for item in judged:
        if answers[item["id"], item["lang"]]["prompt"].strip() != item["prompt"].strip():
            raise common.InputError(f"--reference-answers {source}: the answer to '{item['id']}' "
                                    f"({item['lang']}) was asked a different prompt than --prompts has under "
                                    "that id")
    return answers


def unique_labels(names):
    """Short column names: a directory's shortest distinct path tail (iter1/model, iter2/model), else the
    name.

    The same model given twice gets 'name (2)'.
    """
    parts = [os.path.normpath(name).split(os.sep) if os.path.isdir(name) else [name] for name in names]
    labels = []
    for i, path in enumerate(parts):
        tail = 1
        while tail < len(path) and any(other[-tail:] == path[-tail:] and other != path for other in parts):
            tail += 1
        label = "/".join(path[-tail:])
        labels.append(label if label not in labels else f"{label} ({labels.count(label) + 1})")
    return labels


def slug(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def held_out_reward_accuracy(name):
    """04_dpo.py's held-out reward accuracy (share of pairs with chosen reward > rejected), or None."""
    path = os.path.join(name, "train_summary.json")
    summary = common.read_json(path) if os.path.isfile(path) else {"eval_pairs": 0}
    accuracy, pairs = summary.get("eval_after", {}).get("rewards/accuracies"), summary.get("eval_pairs")
    if pairs == 0:  # not trained by 04, or trained with --eval-frac 0: no held-out pairs to report
        return None
    if accuracy is None or not pairs:
        raise common.InputError(f"{path}: needs 'eval_after' with 'rewards/accuracies' and 'eval_pairs'")
    wins = round(accuracy * pairs)  # the per-pair outcomes, rebuilt from the rate and the count
    return dict(entry([1.0] * wins + [0.0] * (pairs - wins), seed=0), score=accuracy)


# ----------------------------------------------------------------------------
# Generation


def load_generator(column, args):
    """What answers one column's tasks: {generate(prompt texts, desc) -> common.generate's iterator,
    tokenizer, engine (its name), model (loaded here; a server column's only when a scored task needs it)}."""
    if column.get("servers"):  # attach_servers found them listing the model; the prompts are rendered here
        model, engine = None, common.connect(column["servers"], column["served_as"], args.server_concurrency)
        tokenizer = common.load_tokenizer(column["model"], args.trust_remote_code)
    else:
        model, tokenizer = common.load_model(column["model"], trust_remote_code=args.trust_remote_code)
        engine = model
    proxy = None
    if "proxy" in column:
        small = {"--proxy-expert": args.proxy_expert, "--proxy-antiexpert": args.proxy_antiexpert}
        for flag, name in small.items():
            if common.load_tokenizer(name, args.trust_remote_code).get_vocab() != tokenizer.get_vocab():
                raise common.InputError(f"{flag} {name}: its tokenizer differs from {column['model']}'s; "
                                        "proxy-tuning needs one shared vocabulary")
        # fp32 on every device: proxy-tuning adds the small models' difference, which bf16 would round away.
        proxy = [common.load_model(name, None, torch.float32, args.trust_remote_code)[0]
                 for name in small.values()] + [args.proxy_alpha]
    generate = lambda texts, desc: common.generate(  # noqa: E731
        engine, tokenizer, texts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, desc=desc,
        proxy=proxy)
    return {"generate": generate, "tokenizer": tokenizer, "model": model,
            "engine": common.engine_name(engine)}


def in_chunks(items, size, desc):
    """`items`, `size` at a time, with a progress bar."""
    for start in tqdm(range(0, len(items), size), desc=desc, unit="batch", disable=not items,
                      dynamic_ncols=True):
        yield items[start:start + size]


def in_language(text, lang):
    """Language fidelity of one answer: an empty answer is not in any language; only numbers pass."""
    return bool(text.strip()) and common.is_in_language(text, lang)


@functools.cache
def math_instructions():
    """{lang: the step-by-step line appended to a math problem}: data, like the problems, read once."""
    return common.read_json(os.path.join(REPO, "data", "math", "instructions.json"))


def math_message(question, lang, mode):
    """The user turn for a math problem: the problem, then the step-by-step line in its language (or, in code
    mode, the request for a program, in English: it is code that is asked for)."""
    lines = math_instructions()
    instruction = CODE_INSTRUCTION if mode == "code" else lines.get(lang, lines["en"])
    return f"{question}\n\n{instruction}"


def task_records(tools, items, task, mode, counts):
    """Yields lists of prediction records for one generated task's items, a batch at a time.

    Every record has the answer and its language; a math record also the last number and whether it is right
    (in code mode, the last number the model's program printed).
    A translate-test task (`-tt`) first translates the questions into English (with the question-translation
    prompt QAlign trains in 03), then answers the English question.
    """
    def answer(messages, desc):  # one greedy answer per message, a batch at a time: [(index, sample)]
        texts = [common.chat_prompt_text(tools["tokenizer"], message) for message in messages]
        for batch in tools["generate"](texts, desc):
            counts["new_tokens"] += sum(samples[0]["new_tokens"] for _, samples in batch)
            yield [(index, samples[0]) for index, samples in batch]

    questions = [item["prompt"] for item in items]  # a -tt task's become their English translations
    foreign = [k for k, item in enumerate(items) if task.endswith("-tt") and item["lang"] != "en"]
    requests = [f"{common.QUESTION_TRANSLATION.format(language=common.language_name(items[k]['lang']))}\n\n"
                f"{questions[k]}" for k in foreign]
    for batch in answer(requests, "translate") if foreign else []:
        for index, sample in batch:
            questions[foreign[index]] = sample["text"]
    messages = [question if task == "winrate" else
                math_message(question, "en" if task.endswith("-tt") else item["lang"], mode)
                for item, question in zip(items, questions)]
    for batch in answer(messages, "answer"):
        records = []
        for index, sample in batch:
            item, text = items[index], sample["text"]
            record = {**{k: item[k] for k in ("model", "task", "id", "lang", "engine")},
                      "prompt": messages[index], "response": text, "truncated": sample["truncated"]}
            if task == "winrate" or mode == "cot":  # a program's language is Python
                record.update(detected_language=common.detect_language(text),
                              in_language=in_language(text, item["lang"]))
            if task != "winrate":
                output = text
                if mode == "code":
                    record["program"] = extract_program(text)
                    record["program_status"], output = run_program(record["program"])
                prediction = common.extract_last_number(output)
                counts["no_number"] += prediction is None
                record.update(answer=item["answer"], prediction=prediction,
                              correct=common.same_number(prediction, item["answer"]))
            if task.endswith("-tt"):
                record.update(question=item["prompt"], question_en=questions[index])
            records.append(record)
        yield records


def predict(column, task_items, work, args, rank, world_size, counts):
    """Every task's predictions for one column: {task: [record]}, generating only what is not on disk.

    The model is loaded only if some task is unfinished, and freed on return, before the next column's.
    """
    tools, predictions = None, {}
    for task, problems in task_items.items():
        problems = first_ids_per_language(problems, column.get("limit"))  # --middle-limit
        if task in SCORED_TASKS and ("proxy" in column or args.answers_only):
            continue  # proxy-tuning decodes with no one model to score; answers-only: the later run scores
        path = os.path.join(work, f"{column['slug']}.{task}.jsonl")
        if not os.path.exists(path):  # not finished in an earlier run
            tools = tools or load_generator(column, args)
            scored = {"choice": choice_records, "alignment": alignment_records}.get(task)
            if scored and tools["model"] is None:  # a server column's: log-probs and states are read here
                tools["model"] = common.load_model(column["model"],
                                                   trust_remote_code=args.trust_remote_code)[0]
            engine = "in-process" if scored else tools["engine"]
            items = [{**p, "model": column["label"], "task": task, "engine": engine} for p in problems]
            key = lambda record: (record["model"], record["task"], record["id"], record["lang"])  # noqa: E731
            _, mine = common.resume(path, items, key, rank, world_size)
            batches = (scored(tools["model"], tools["tokenizer"], mine, args) if scored
                       else task_records(tools, mine, task, args.math_mode, counts))
            for records in batches:
                common.save_batch(path, records, rank)
            counts["predictions"] += len(mine)
            common.finish(path, items, key, rank)
        predictions[task] = [record for _, record in common.read_jsonl(path)]
    return predictions


# ----------------------------------------------------------------------------
# Programs (--math-mode code)
#
# A model-written program never runs in this process. It runs in a child `python -I -S` (isolated: no
# environment variables, user site or current directory on the path), with an empty environment, in an
# empty temporary directory, under rlimits (CPU seconds, address space, output size, open files) and a
# wall-clock timeout. Before the program starts, an audit hook refuses every file open, every import of a
# module not loaded already, sockets, subprocesses and os calls. This stops a program that loops, allocates
# without bound, reads or writes files or opens sockets; it is not a hardened sandbox against code written to
# escape (run untrusted models' code in a container or VM as well).

PROGRAM_SECONDS, PROGRAM_BYTES = 5, 512 * 2 ** 20
SANDBOX = f"""
import resource, sys
import collections, decimal, fractions, functools, itertools, math, random, statistics  # a program may use
for limit, value in ((resource.RLIMIT_CPU, {PROGRAM_SECONDS}), (resource.RLIMIT_AS, {PROGRAM_BYTES}),
                     (resource.RLIMIT_FSIZE, 2 ** 20), (resource.RLIMIT_NOFILE, 16),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
program = sys.stdin.read()
REFUSED = ("open", "import", "os.", "socket.", "subprocess.", "ctypes.", "shutil.", "fcntl.", "mmap.", "pty.")
def refuse(event, args):
    if event.startswith(REFUSED):
        raise PermissionError("not allowed here: " + event)
sys.addaudithook(refuse)
exec(compile(program, "<program>", "exec"), {{"__name__": "__main__"}})
"""


def extract_program(text):
    """The program in an answer: its first ``` block (closed or cut off), else the whole answer."""
    match = re.search(r"```[^\n]*\n(.*?)(?:```|$)", text, re.DOTALL)
    return match.group(1) if match else text


def run_program(program):
    """(status, what it printed) for a model-written program run in the sandbox above. status: "ok",
    "timeout", "killed by signal N" (CPU time or output size) or "error: <its last line of stderr>" (an
    exception, MemoryError and the sandbox's PermissionError among them). A program that fails prints nothing
    that counts."""
    with tempfile.TemporaryDirectory() as empty, tempfile.TemporaryFile() as stdout, \
            tempfile.TemporaryFile() as stderr:
        try:
            result = subprocess.run([sys.executable, "-I", "-S", "-c", SANDBOX], input=program.encode(),
                                    env={}, cwd=empty, stdout=stdout, stderr=stderr,
                                    timeout=PROGRAM_SECONDS + 1)
        except subprocess.TimeoutExpired:  # subprocess.run has killed it
            return "timeout", ""
        stdout.seek(0), stderr.seek(0)
        printed = stdout.read(2 ** 20).decode(errors="replace")
        errors = stderr.read().decode(errors="replace")
    if result.returncode < 0:
        return f"killed by signal {-result.returncode}", ""
    if result.returncode:
        return "error: " + (errors.strip().splitlines() or [f"exit status {result.returncode}"])[-1][:200], ""
    return "ok", printed


# ----------------------------------------------------------------------------
# Scored tasks: the model's own log-probs (choice) and hidden states (alignment)


def letter_scorer(model, tokenizer, letters, token_budget):
    """score(user messages) -> [n, len(letters)] log-probs of each letter as the first token of the answer,
    from the scorer 03 and 04 use. There is always an answer and nothing to parse: the judge reads "A" vs "B"
    this way, the multiple-choice task the options' letters (as lm-evaluation-harness scores choices).
    One forward per message reads every letter at the answer's first position."""
    ids = [tokenizer(letter, add_special_tokens=False).input_ids for letter in letters]
    if any(len(letter_ids) != 1 for letter_ids in ids):
        raise common.InputError(f"the tokenizer does not have single tokens for the letters "
                                f"{', '.join(letters)}")

    def score(texts):
        prompts = [common.chat_prompt_ids(tokenizer, text) for text in texts]
        return common.next_token_logps(model, prompts, [letter_ids[0] for letter_ids in ids], token_budget)

    return score


def choice_message(item):
    options = "\n".join(f"{LETTERS[k]}. {text}" for k, text in enumerate(item["choices"]))
    return CHOICE_PROMPT.format(question=item["prompt"], options=options)


def choice_records(model, tokenizer, items, args, chunk=16):
    """Yields prediction records for multiple-choice items: the option whose letter scores highest."""
    score = letter_scorer(model, tokenizer, LETTERS[:max((len(i["choices"]) for i in items), default=2)],
                          args.token_budget)
    for part in in_chunks(items, chunk, "choice"):
        records, messages = [], [choice_message(item) for item in part]
        for item, message, logps in zip(part, messages, score(messages).tolist()):
            logps = logps[:len(item["choices"])]
            prediction = int(np.argmax(logps))
            fields = ("model", "task", "id", "lang", "engine", "choices", "answer")
            records.append({**{k: item[k] for k in fields}, "prompt": message, "prediction": prediction,
                            "correct": prediction == item["answer"], "letter_logps": logps})
        yield records


def mean_hidden_states(model, tokenizer, texts):
    """[n, layers + 1, hidden] float32: each text's hidden states (the embeddings, then every layer's output),
    averaged over its own tokens: not the BOS token, which every text shares, nor padding."""
    ids = [common.prompt_ids(tokenizer, text) for text in texts]  # the plain question: no chat template
    input_ids, mask = common.pad_right(ids, pad_id=0)
    device = next(model.parameters()).device
    with torch.inference_mode():
        states = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False,
                       output_hidden_states=True).hidden_states
    weights = mask.to(device, torch.float32)
    if common.adds_bos(tokenizer):
        weights[:, 0] = 0
    weights = (weights / weights.sum(1, keepdim=True))[:, :, None]
    return torch.stack([(layer.float() * weights).sum(1) for layer in states], 1).cpu()


def alignment_records(model, tokenizer, items, args):
    """Yields, per non-English question, the cosine between its mean hidden state and its English original's
    at every layer: how close the model holds the two languages' versions of one question."""
    for part in in_chunks(items, args.batch_size, "alignment"):
        states = mean_hidden_states(model, tokenizer, [item["prompt"] for item in part] +
                                    [item["english"] for item in part])
        cosines = torch.nn.functional.cosine_similarity(states[:len(part)], states[len(part):], dim=-1)
        yield [{**{k: item[k] for k in ("model", "task", "id", "lang", "engine", "prompt")}, "cosine": row}
               for item, row in zip(part, cosines.tolist())]


# ----------------------------------------------------------------------------
# Judging


def judge_pairs(judge, pairs):
    """Judge each (instruction, reference, candidate) in both orders; the candidate's points.

    judge(texts) -> [{"choice": "A" | "B" | "tie" | None, ...}] for the pairwise prompts,
    with "logp_a"/"logp_b" when the judge is a local model.
    Letter verdicts (API): for the candidate 1, against 0, a tie or an unreadable reply 0.5,
    averaged over the two orders, so a judge that always picks one slot scores 0.5.
    Log-prob verdicts (local): the candidate's margin (its letter's log-prob minus the other's) is
    summed over the two orders; a fixed preference for a slot adds +m once and -m once and
    cancels exactly, and the sign of what is left is the verdict (0 is a tie, 0.5). A small
    judge is mostly position bias, so this keeps the little signal it has; votes would not.
    Returns [(score, [verdict reference-first, verdict candidate-first])].
    """
    # Each pair twice: the reference's answer as A, then the candidate's.
    verdicts = judge([JUDGE_PROMPT.format(instruction=instruction, answer_a=a, answer_b=b)
                      for instruction, reference, candidate in pairs
                      for a, b in ((reference, candidate), (candidate, reference))])
    results = []
    for k in range(len(pairs)):
        first, second = verdicts[2 * k], verdicts[2 * k + 1]
        if "logp_a" in first:
            margin = (first["logp_b"] - first["logp_a"]) + (second["logp_a"] - second["logp_b"])
            score = 1.0 if margin > 0 else 0.0 if margin < 0 else 0.5
        else:
            score = ({"B": 1.0, "A": 0.0}.get(first["choice"], 0.5)
                     + {"A": 1.0, "B": 0.0}.get(second["choice"], 0.5)) / 2
        results.append((score, [dict(first, order="reference first"), dict(second, order="candidate first")]))
    return results


def load_local_judge(args):
    """(judge, its model): --judge in fp32 on every device, as a verdict is the difference of two log-probs,
    which bf16 would round away (its error is as large as the margins themselves)."""
    model, tokenizer = common.load_model(args.judge, None, torch.float32, args.trust_remote_code)
    return local_judge(model, tokenizer, args.token_budget), model


def local_judge(model, tokenizer, token_budget):
    """A judge that compares the log-probabilities of "A" and "B" as the next token after the pairwise prompt.
    Cheaper and steadier than parsing a generated reply: there is always a verdict."""
    score = letter_scorer(model, tokenizer, "AB", token_budget)

    def judge(texts):
        return [{"choice": "A" if a > b else "B" if b > a else "tie", "logp_a": a, "logp_b": b}
                for a, b in score(texts).tolist()]

    return judge


def server_judge(server, max_tokens):
    """A judge behind an OpenAI-compatible server (chat completions, greedy; the reply parsed for A or B)."""
    def judge(texts):
        replies = common.server_chat(server, texts, max_tokens)
        return [{"choice": match.group(1) if match else None, "reply": reply}
                for reply, match in ((reply, re.search(r"\b([AB])\b", reply)) for reply in replies)]

    return judge


def judge_column(judge, reference, answers, path, rank, world_size, counts, chunk=16):
    """Judge one column's win-rate answers against the reference answers ({(id, lang): record});
    resumable like the predictions."""
    key = lambda record: (record["model"], record["id"], record["lang"])  # noqa: E731
    _, mine = common.resume(path, answers, key, rank, world_size)
    for part in in_chunks(mine, chunk, "judge"):
        opponents = [reference[(item["id"], item["lang"])]["response"] for item in part]
        results = judge_pairs(judge, [(item["prompt"], opponent, item["response"])
                                      for item, opponent in zip(part, opponents)])
        counts["unreadable_verdicts"] += sum(v["choice"] is None for _, verdicts in results for v in verdicts)
        common.save_batch(path, [{"model": item["model"], "task": "judge", "id": item["id"],
                                  "lang": item["lang"], "score": score, "verdicts": verdicts,
                                  "length_difference": len(item["response"]) - len(opponent)}  # characters
                                 for item, opponent, (score, verdicts) in zip(part, opponents, results)],
                          rank)
    counts["judged"] += len(mine)
    common.finish(path, answers, key, rank)
    return [record for _, record in common.read_jsonl(path)]


def judge_caveat(args, judge_model):
    """What the report says about the judge: which one, how it decides, and how far to trust it."""
    if args.judge_server:
        return (f"Judge: `{args.judge}` behind {' '.join(args.judge_server)} (chat completions, greedy, "
                "reply parsed for A/B). LLM judges favour longer answers; position bias is cancelled by "
                "judging both orders.")
    millions = sum(p.numel() for p in judge_model.parameters()) / 1e6
    caveat = (f" **Caveat: a {millions:.0f}M-parameter judge is weak (its raw verdicts are mostly position "
              "bias); treat these win rates as a smoke test, not evidence. Use --judge-server with a strong "
              "model.**")
    return (f"Judge: local model `{args.judge}` ({millions:.0f}M parameters), next-token log-probs of 'A' vs "
            "'B' after a pairwise prompt; the candidate's margin is summed over both orders, which cancels a "
            "fixed position bias, and its sign is the verdict." + (caveat if millions < 1000 else ""))


# ----------------------------------------------------------------------------
# Metrics and report


def bootstrap(n, statistic, seed, samples=1000):
    """{"score", "n", "ci"}: statistic(item indices) over all n items, and its 95% bootstrap interval, the
    statistic recomputed on `samples` resamples of the items (with replacement). Every metric's interval."""
    boot = [statistic(picks) for picks in np.random.default_rng(seed).integers(0, n, size=(samples, n))]
    return {"score": float(statistic(np.arange(n))), "n": n,
            "ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}


def entry(values, seed):
    """The mean of `values` (0/1 or fractions) with its interval."""
    values = np.asarray(values, dtype=float)
    return bootstrap(len(values), lambda picks: values[picks].mean(), seed)


def by_language(rows, langs):
    """{lang: its rows} for each language present, then "all": every row."""
    groups = {lang: [r for r in rows if r["lang"] == lang] for lang in langs}
    return {**{lang: group for lang, group in groups.items() if group}, **({"all": rows} if rows else {})}


def per_language(rows, field, langs, seed):
    return {lang: entry([float(r[field]) for r in group], seed)
            for lang, group in by_language(rows, langs).items()}


def alignment_by_layer(predictions, langs, seed):
    """{label: {lang: [entry per layer]}}: the alignment task's cosines, layer by layer (0: the
    embeddings)."""
    others = [lang for lang in langs if lang != "en"]
    return {label: {lang: [entry([r["cosine"][layer] for r in group], seed)
                           for layer in range(len(group[0]["cosine"]))]
                    for lang, group in by_language(tasks["alignment"], others).items()}
            for label, tasks in predictions.items() if tasks.get("alignment")}


def length_controlled(scores, length_differences, seed, samples=1000, slope_ridge=0.1):
    """AlpacaEval 2's length-controlled win rate, with its interval: {"score", "n", "ci", "overlap"}.

    Long answers win a judge's votes, so the raw win rate rewards length. Fit the judge's preference
    (score 0, 0.5 or 1 for the candidate) with a logistic model, P(win) = sigmoid(w0 + w1 * tanh(d / std(d))),
    d the candidate's answer length minus the reference's (characters), and read it at d = 0: sigmoid(w0),
    what the preference would be if both answers were equally long. AlpacaEval 2 also fits an
    instruction-difficulty term across many models; with the few models of one run it is left out.
    The fit is Newton's method on the log-likelihood (fractional targets allowed) with a weak ridge on the
    slope only: where the lengths hardly vary, the data cannot tell length from quality, and the estimate
    stays near the raw win rate instead of extrapolating. "overlap" is the share of prompts on the rarer side
    of d = 0: near 0, equal length is outside the data and the estimate is an extrapolation. The interval
    refits on resampled prompts.
    """
    scores, differences = np.asarray(scores, dtype=float), np.asarray(length_differences, dtype=float)
    ridge = np.diag([1e-6, slope_ridge])  # the intercept's 1e-6 keeps the Newton matrix invertible

    def fit(y, d):
        spread = d.std()
        x = np.stack([np.ones_like(d), np.tanh(d / spread) if spread > 0 else np.zeros_like(d)], axis=1)
        w = np.zeros(2)
        for _ in range(100):
            p = 0.5 * (1 + np.tanh(x @ w / 2))  # sigmoid, without overflow
            step = np.linalg.solve((x.T * (p * (1 - p))) @ x + ridge, x.T @ (y - p) - ridge @ w)
            w += np.clip(step, -5, 5)  # a bounded Newton step cannot overshoot into overflow
            if np.abs(step).max() < 1e-10:
                break
        return 0.5 * (1 + np.tanh(w[0] / 2))

    return {**bootstrap(len(scores), lambda picks: fit(scores[picks], differences[picks]), seed, samples),
            "overlap": float(min(np.mean(differences > 0), np.mean(differences < 0)))}


def consistency(rows, langs, seed):
    """CrossIn cross-lingual consistency over parallel problems, and its harmonic mean with accuracy.

    A problem is consistent when it got an answer in every language and the answers agree
    (numbers within 1e-3, or the same option). Accuracy here is over the same problems and languages.
    Intervals resample problems (each with all its languages) so the two stay paired.
    """
    by_id = {}
    for row in rows:
        by_id.setdefault(row["id"], {})[row["lang"]] = row
    parallel = [group for group in by_id.values() if all(lang in group for lang in langs)]
    if not parallel or len(langs) < 2:
        return {}
    answers = [[group[lang]["prediction"] for lang in langs] for group in parallel]
    same = np.array([None not in values and max(values) - min(values) <= common.ANSWER_TOLERANCE
                     for values in answers], dtype=float)
    correct = np.array([np.mean([group[lang]["correct"] for lang in langs]) for group in parallel])

    def harmonic(cons, acc):
        return 0.0 if cons + acc == 0 else 2 * cons * acc / (cons + acc)

    both = bootstrap(len(parallel), lambda picks: harmonic(same[picks].mean(), correct[picks].mean()), seed)
    return {"consistency": {"all": entry(same, seed)},
            "consistency x accuracy (harmonic mean)": {"all": both}}


def compute_results(columns, predictions, judgements, langs, seed, opponent="first model"):
    """{label: {metric: {lang: {"score", "n", "ci"}}}}; metrics are named "<task> <what>"."""
    results = {}
    for column in columns:
        label, metrics = column["label"], {}
        for task, rows in predictions[label].items():
            if task.split("-")[0] in MATH_TASKS + ("choice",):
                metrics[f"{task} accuracy"] = per_language(rows, "correct", langs, seed)
                for name, table in consistency(rows, langs, seed).items():
                    metrics[f"{task} {name}"] = table
            if task == "winrate" and label in judgements:
                metrics[f"winrate vs {opponent}"] = per_language(judgements[label], "score", langs, seed)
                metrics[f"winrate vs {opponent}, length-controlled"] = {
                    lang: length_controlled([r["score"] for r in group],
                                            [r["length_difference"] for r in group], seed)
                    for lang, group in by_language(judgements[label], langs).items()}
            if task == "alignment":
                rows = [dict(r, mean_cosine=float(np.mean(r["cosine"]))) for r in rows]
                metrics["alignment cosine with English (mean over layers)"] = per_language(
                    rows, "mean_cosine", langs, seed)
            # -tt answers are English by design.
            if rows and "in_language" in rows[0] and not task.endswith("-tt"):
                name = INSTRUCTION_FIDELITY if task == "winrate" else f"{task} language fidelity"
                metrics[name] = per_language(rows, "in_language", langs, seed)
                if task == "winrate":
                    metrics[name].update(pooled_others(rows, "in_language", langs, seed))
        if column.get("held_out"):
            metrics["held-out reward accuracy (04)"] = {"all": column["held_out"]}
        results[label] = metrics
    return results


def compute_effect(columns, predictions, langs, seed):
    """{INSTRUCTION_FIDELITY: {lang: entry of (last model - first model)}}, paired by (id, lang), and the
    languages besides English pooled (pooled_others); {} without two models' win-rate answers."""
    trained = [c["label"] for c in columns if "proxy" not in c]
    if len(trained) < 2 or "winrate" not in predictions[trained[0]]:
        return {}
    first = {(r["id"], r["lang"]): r["in_language"] for r in predictions[trained[0]]["winrate"]}
    differences = [dict(id=r["id"], lang=r["lang"], diff=float(r["in_language"] - first[r["id"], r["lang"]]))
                   for r in predictions[trained[-1]]["winrate"]]
    table = per_language(differences, "diff", langs, seed)
    table.pop("all", None)  # English, at its ceiling, would dilute the pool of the other languages
    return {INSTRUCTION_FIDELITY: {**table, **pooled_others(differences, "diff", langs, seed)}}


def pooled_others(rows, field, langs, seed):
    """{"es+de+fr": entry} for the languages besides English, when there are two or more: each prompt's mean
    over them, so the interval resamples prompts with all their translations together (a prompt and its
    translations are not independent draws); else {}."""
    others = [lang for lang in langs if lang != "en" and any(row["lang"] == lang for row in rows)]
    by_prompt = {}
    for row in rows:
        if row["lang"] in others:
            by_prompt.setdefault(row["id"], []).append(float(row[field]))
    if len(others) < 2:
        return {}
    return {"+".join(others): entry([np.mean(diffs) for diffs in by_prompt.values()], seed)}


def markdown_table(header, rows):
    """A markdown table's lines: the header's cells, then each row's."""
    return [f"| {' | '.join(cells)} |" for cells in [header, ["---"] * len(header), *rows]]


def effect_lines(effect, results, labels):
    """The report's first table: each targeted metric for every model, then last - first with its interval."""
    rows, clear = [], []
    for metric, table in effect.items():
        for lang, value in table.items():
            low, high = (100 * bound for bound in value["ci"])
            rows.append([metric, lang, *(cell(results[label][metric].get(lang)) for label in labels),
                         f"{100 * value['score']:+.1f} [{low:+.1f}, {high:+.1f}] n={value['n']}"])
            if low > 0 or high < 0:
                clear.append(f"{lang} {100 * value['score']:+.1f}")
    pooled = [lang for table in effect.values() for lang in table if "+" in lang]
    return [f"## Effect: `{labels[-1]}` - `{labels[0]}` on held-out prompts", "",
            *markdown_table(["metric", "lang", *(f"`{l}`" for l in labels), "difference [95% CI]"], rows),
            "", "Differences whose interval excludes zero: " + (", ".join(clear) or "none") +
            ". The interval is a bootstrap over prompts, each model's answers to a prompt kept together." +
            (f" {pooled[0]}: each prompt's difference averaged over those languages, n counts prompts."
             if pooled else ""), ""]


def metric_names(results, labels):
    """Every metric once, in the order compute_results makes them; the baseline lacks some, so it goes
    last."""
    return list(dict.fromkeys(metric for label in labels[1:] + labels[:1] for metric in results[label]))


def cell(value, base=None):
    """`score [interval] n=...` in %; with the baseline's value, the difference from it in points."""
    if value is None:
        return "–"
    low, high = value["ci"]
    text = f"{100 * value['score']:.1f} [{100 * low:.1f}, {100 * high:.1f}] n={value['n']}"
    if value.get("overlap", 1) < 0.1:  # a length-controlled win rate read outside its data
        text += " (extrapolated)"
    return text + (f" ({100 * (value['score'] - base['score']):+.1f})" if base else "")


def metric_notes(args, judge_text):
    """The paragraphs under "All metrics": how each kind of metric in the table is measured."""
    counted = "answer" if args.math_mode == "cot" else \
        "output of the model's program (run in a sandboxed child process)"
    notes = {  # task: what the report says of its metrics
        "math": f"Math: greedy, max {args.max_new_tokens} new tokens, the last number in the {counted} "
                "counts, right within 1e-3 of gold. Consistency (CrossIn): share of parallel problems "
                "answered alike (the same number, the same option) in every language. ",
        "choice": "Multiple choice: the option whose letter gets the highest log-prob as the answer's first "
                  "token. ",
        "fidelity": "Language fidelity: share of answers detected (py3langid) in the prompt's language; an "
                    "answer of only numbers counts as faithful, an empty one does not. `all` pools the "
                    "languages.",
        "alignment": " Alignment: the cosine x100 (mean over layers) of a question's mean hidden state and "
                     "its English original's; every layer is in eval.json and report.png."}
    shown = {"math" if task in MATH_TASKS else task for task in args.tasks} | {"fidelity"}
    shown |= {"math"} if "choice" in shown else set()  # choice's consistency is said with math's
    lines = ["".join(text for task, text in notes.items() if task in shown), ""]
    if judge_text:
        opponent = "the reference answers" if args.reference_answers else "the first model"
        lines += [f"Win rate: share of pairwise judgements won against {opponent}, both orders, ties half. "
                  "Length-controlled (AlpacaEval 2): the judge's preference fitted by logistic regression on "
                  "tanh(length difference / its std) and read at equal length; (extrapolated): under 10% of "
                  "prompts had answers on both sides of equal length.", judge_text, ""]
    return lines


def write_report(path, columns, results, effect, held_out, judge_text, args):
    labels = [c["label"] for c in columns]
    lines = ["# Evaluation report", "",
             "Columns are models; the first is the baseline and later cells show the difference from it in "
             "points (+/-). Each cell: score in % [95% bootstrap interval] n=number of items.", "",
             *(f"- `{c['label']}`: {c['description']}" for c in columns), ""]
    if held_out:
        lines += [f"Held out: no evaluated prompt is among the {held_out['training_prompt_ids']} prompt ids "
                  "(in any language) or the texts the loop trained on "
                  f"({', '.join(held_out['trained_on'])}).", ""]
    if effect:
        lines += effect_lines(effect, results, [c["label"] for c in columns if "proxy" not in c])
    lines += ["## All metrics", "", *metric_notes(args, judge_text)]
    value = lambda label, metric, lang: results[label].get(metric, {}).get(lang)  # noqa: E731
    rows = [[metric, lang, *(cell(value(label, metric, lang), value(labels[0], metric, lang) if k else None)
                             for k, label in enumerate(labels))]
            for metric in metric_names(results, labels) for lang in args.langs + ["all"]
            if any(value(label, metric, lang) for label in labels)]
    lines += markdown_table(["metric", "lang", *(f"`{label}`" for label in labels)], rows)
    common.write_atomic(path, lambda handle: handle.write("\n".join(lines) + "\n\n"))


def plot_report(path, columns, results, effect, alignment, langs):
    """report.png: the effect first (last - first model, per language), then a panel per metric (bars per
    model, whiskers for the intervals), last the alignment by layer (a line per model and language)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no report.png")
        return False
    labels = [c["label"] for c in columns]
    panels = [(f"effect: {metric} (last - first model)", {"difference": table})
              for metric, table in effect.items()]
    panels += [(metric, {label: results[label].get(metric, {}) for label in labels})
               for metric in metric_names(results, labels)]
    panels += [("alignment with English, by layer (0: embeddings)", alignment)] if alignment else []
    rows = math.ceil(len(panels) / 2)
    figure, axes = plt.subplots(rows, 2, figsize=(13, 3.4 * rows), squeeze=False)
    groups = list(dict.fromkeys(langs + ["all"] + [lang for table in effect.values() for lang in table]))
    for axis, (title, series) in zip(axes.flat, panels):
        width = 0.8 / len(series)
        for k, (label, table) in enumerate(series.items()):  # model k: colour k, the k-th bar of every group
            if series is alignment:
                for j, (lang, values) in enumerate(table.items()):  # model: colour; language: line style
                    axis.plot([v["score"] for v in values], color=f"C{k % 10}", label=f"{label} {lang}",
                              linestyle=("-", "--", ":", "-.")[j % 4])
                continue
            shown = [(i + (k - (len(series) - 1) / 2) * width, table[lang])  # (x, value) of each bar
                     for i, lang in enumerate(groups) if lang in table]
            axis.bar([x for x, _ in shown], [100 * v["score"] for _, v in shown], width, label=label,
                     capsize=2, yerr=[[100 * (v["score"] - v["ci"][0]) for _, v in shown],
                                      [100 * (v["ci"][1] - v["score"]) for _, v in shown]])
        if "difference" in series:
            axis.set(xticks=range(len(groups)), xticklabels=groups, ylabel="points")
        elif series is not alignment:
            axis.set(xticks=range(len(groups)), xticklabels=groups, ylabel="%", ylim=(0, 100))
        if title.startswith("winrate vs"):  # a coin flip
            axis.axhline(50, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=6)
    for axis in axes.flat[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    common.write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=110), binary=True)
    plt.close(figure)
    return True


# ----------------------------------------------------------------------------


def loop_models():
    """What loop.sh writes: the base model, then every finished iteration's model, in iteration order; and the
    records each iteration trained on (its responses.jsonl), for --trained-on."""
    trained = sorted(glob.glob(f"{LOOP_RUN}/iter*/model/train_summary.json"),
                     key=lambda path: int(re.search(r"iter(\d+)", path).group(1)))
    models = [os.path.dirname(path) for path in trained]
    print(f"--models {' '.join([common.EMBEDDED_MODEL] + models)}"
          + ("" if models else f" (no finished {LOOP_RUN}/iter*/model)"))
    trained_on = [os.path.join(os.path.dirname(model), "responses.jsonl") for model in models]
    return [common.EMBEDDED_MODEL] + models, trained_on


def make_columns(names, args):
    """One column per model to evaluate (plus the proxy-tuned one), each with a label and a work-file slug."""
    columns = [{"label": label, "model": name, "description": name,
                "held_out": held_out_reward_accuracy(name)}
               for label, name in zip(unique_labels(names), names)]
    if args.proxy_expert:  # decoding mixes three models' logits: no one model's log-probs or states to read
        columns.append({"label": "proxy-tuned", "model": names[0], "proxy": True, "held_out": None,
                        "description": f"{names[0]} + {args.proxy_alpha} x ({args.proxy_expert} - "
                                       f"{args.proxy_antiexpert}); not scored in choice or alignment"})
    trained = [column for column in columns if "proxy" not in column]
    for column in trained[1:-1] if args.middle_limit else []:
        column["limit"] = args.middle_limit
        column["description"] += " (--middle-limit: " + ", ".join(
            f"{count} {lang or 'per language'}" for lang, count in args.middle_limit.items() if count) + ")"
    # Work files are named after what the column is and what it answers: a changed --models, --limit, --langs,
    # data source or answer length never reuses them.
    answers = [args.limit, args.langs, args.max_new_tokens, args.mgsm, args.math, args.prompts, args.choice,
               args.math_mode]
    for column in columns:
        key = common.content_key(column["description"], answers + [column.get("limit")])[:8]
        column["slug"] = f"{slug(column['label'])}-{key}"
    return columns


def attach_servers(columns, urls):
    """Give each column the --server URLs whose /v1/models lists its model (common.served_name: by name, as
    the directory it resolves to, or a LoRA policy as its adapter); the rest are answered in-process."""
    for url in urls:
        listed = common.served_models(url)
        matched = 0
        for column in columns:
            name = common.served_name(column["model"], listed)
            if name and "proxy" not in column:
                column.setdefault("servers", []).append(url.rstrip("/"))
                column["served_as"], matched = name, matched + 1
        if not matched:
            raise common.InputError(f"--server {url}: serves {listed}, none of --models (name them as it "
                                    "lists them)")


def load_tasks(tasks, langs, args):
    """{task: items}, every input read and checked before any model loads, so a bad file fails in a second."""
    def load(source, check=None):
        return first_ids_per_language(common.load_prompts(source, langs=langs, check=check), args.limit)

    task_items = {}
    for task in tasks:
        if task in MATH_TASKS:
            task_items[task] = load(  # every gold answer checked, by file and line
                args.mgsm if task == "mgsm" else args.math,
                check=lambda record, where: record.update(answer=check_gold(record.get("answer"), where)))
            if args.translate_test:
                task_items[f"{task}-tt"] = task_items[task]
        elif task == "choice":  # every record checked and made uniform, by file and line
            task_items[task] = load(args.choice, check=check_choice)
        elif task == "alignment":  # MGSM's parallel questions, each non-English one beside its English one
            questions = load(args.mgsm)
            english = {q["id"]: q["prompt"] for q in questions if q["lang"] == "en"}
            task_items[task] = [{**q, "english": english.get(q["id"])}
                                for q in questions if q["lang"] != "en"]
            for q in task_items[task]:
                if q["english"] is None:
                    raise common.InputError(f"{args.mgsm}: question '{q['id']}' ({q['lang']}) has no English "
                                            "version")
        else:
            task_items[task] = load(args.prompts)
    return task_items


def check_held_out(task_items, trained_on):
    """Stop if an evaluated prompt was trained on: the same text, or (instruction prompts) the same id in any
    language, since the parallel prompt is the same prompt translated. Returns what the report says about
    it."""
    trained = [(path, record) for path in trained_on
               for _, record in common.read_jsonl(path, required=("id",))]
    ids, texts = {str(r["id"]): path for path, r in trained}, {r.get("prompt"): path for path, r in trained}
    for task, items in task_items.items():
        for item in items:
            path = texts.get(item["prompt"]) or (task == "winrate" and ids.get(str(item["id"])))
            if path:
                raise common.InputError(f"{task} prompt '{item['id']}' ({item['lang']}) was trained on "
                                        f"({path}): evaluate on prompts no iteration trained on")
    return {"trained_on": trained_on, "training_prompt_ids": len(ids), "overlap": 0} if trained_on else None


def judge_all(columns, predictions, reference_answers, work, args, rank, world_size, counts, api):
    """({label: judgements}, the judge's description for the report): every column against
    --reference-answers, or every column after the first against the first."""
    reference = reference_answers or {(r["id"], r["lang"]): r for r in common.first_ids(
        predictions[columns[0]["label"]]["winrate"], args.judge_limit)}
    judge, judge_model = (api, None) if api else load_local_judge(args)
    judge_name = slug(f"{args.judge}@{args.judge_server[0]}" if args.judge_server else args.judge) + \
        (f"-vs-{common.content_key(sorted((k, r['response']) for k, r in reference.items()))[:8]}"
         if reference_answers else "")
    judgements = {column["label"]: judge_column(  # resumable: judges only what is not on disk
        judge, reference, common.first_ids(predictions[column["label"]]["winrate"], args.judge_limit),
        os.path.join(work, f"{column['slug']}.judge-{judge_name}.jsonl"), rank, world_size, counts)
        for column in (columns if reference_answers else columns[1:])}
    return judgements, judge_caveat(args, judge_model)


def write_outputs(output, columns, predictions, judgements, judge_text, task_items, held_out, langs, args):
    """eval.json, predictions.jsonl, report.md and report.png; eval.json last: its presence means done."""
    results = compute_results(columns, predictions, judgements, langs, args.seed,
                              "reference answers" if args.reference_answers else "first model")
    alignment = alignment_by_layer(predictions, langs, args.seed)
    effect = compute_effect(columns, predictions, langs, args.seed)
    verdicts = {(r["model"], r["id"], r["lang"]): {"judge_score": r["score"], "judge_verdicts": r["verdicts"]}
                for rows in judgements.values() for r in rows}
    common.write_jsonl(os.path.join(output, "predictions.jsonl"), [
        {**row, **(verdicts.get((label, row["id"], row["lang"]), {}) if task == "winrate" else {})}
        for label, by_task in predictions.items() for task, rows in by_task.items() for row in rows])
    write_report(os.path.join(output, "report.md"), columns, results, effect, held_out, judge_text, args)
    plotted = plot_report(os.path.join(output, "report.png"), columns, results, effect, alignment, langs)
    engines = {label: sorted({row.get("engine", "in-process") for rows in by_task.values() for row in rows})
               for label, by_task in predictions.items()}
    common.write_json(os.path.join(output, "eval.json"), {
        "models": [{**{k: c[k] for k in ("label", "model", "description")}, "engines": engines[c["label"]]}
                   for c in columns], "tasks": list(task_items),
        "langs": langs, "judge": judge_text or None, "max_new_tokens": args.max_new_tokens,
        "held_out": held_out, "effect": effect, "results": results, "alignment_by_layer": alignment})
    print(f"wrote {os.path.join(output, 'eval.json')}, predictions.jsonl, report.md"
          + (", report.png" if plotted else ""))


def main(argv=None):
    args = parse_args(argv)
    names, trained_on = loop_models() if args.models is None else (args.models, [])
    args.trained_on = trained_on if args.trained_on is None else args.trained_on
    columns = make_columns(names, args)
    # Win rates: each model against the first, or every one against the given answers.
    judging = ("winrate" in args.tasks and not args.answers_only
               and (len(columns) > 1 or bool(args.reference_answers)))
    local_judge_name = [args.judge] if judging and not args.judge_server else []
    for name in dict.fromkeys(names + local_judge_name + [args.proxy_expert, args.proxy_antiexpert]):
        if name:  # every model is checked before the first one answers anything
            common.model_config(name, args.trust_remote_code)
    attach_servers(columns, args.server or [])
    task_items = load_tasks(args.tasks, args.langs, args)
    reference_answers = None
    if args.reference_answers and "winrate" in task_items:
        reference_answers = load_reference_answers(args.reference_answers, task_items["winrate"], args.langs,
                                                   args.judge_limit)
    held_out = check_held_out(task_items, args.trained_on)
    rank, world_size = common.setup_distributed()
    settings = {name: value for name, value in vars(args).items()
                if name not in ("output", "batch_size", "token_budget", "trust_remote_code", "server",
                                "server_concurrency", "answers_only")}
    settings.update(limit=limit_text(args.limit), middle_limit=limit_text(args.middle_limit))  # as typed
    if common.claim(os.path.join(args.output, "eval.json"), settings, rank, partial=False):
        return
    # The judge's server is asked for its models now: a wrong URL, key or model name fails before any
    # generation.
    api = None
    if judging and args.judge_server:
        api = server_judge(common.connect(args.judge_server, args.judge, args.server_concurrency),
                           args.judge_max_tokens)
    work = os.path.join(args.output, "work")
    counts = {"new_tokens": 0, "predictions": 0, "judged": 0, "no_number": 0, "unreadable_verdicts": 0}
    started = time.perf_counter()

    # 1. Predict: every column's answers to every task (work files, resumable).
    predictions = {column["label"]: predict(column, task_items, work, args, rank, world_size, counts)
                   for column in columns if column.get("servers") or not args.answers_only}
    if args.answers_only:
        print(f"05_eval --answers-only: answered {', '.join(predictions)} ({counts['predictions']} now) in "
              f"{work}")
        return common.cleanup_distributed()
    # 2. Judge: each later column's win-rate answers against the first column's (or all against
    #    --reference-answers).
    judgements, judge_text = judge_all(columns, predictions, reference_answers, work, args, rank, world_size,
                                       counts, api) if judging else ({}, "")
    # 3. Write eval.json, predictions.jsonl and the report.
    if rank == 0:
        write_outputs(args.output, columns, predictions, judgements, judge_text, task_items, held_out,
                      args.langs, args)
    print(common.summary_line(
        "05_eval" + (f"[rank {rank}]" if world_size > 1 else ""), time.perf_counter() - started,
        counts["new_tokens"],
        models=len(columns), tasks=len(task_items), predictions_made_now=counts["predictions"],
        judged_now=counts["judged"], answers_without_a_number=counts["no_number"],
        unreadable_judge_replies=counts["unreadable_verdicts"]))
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
