"""Stage 5: did the loop help? Math accuracy, win rate, language fidelity, consistency, a report.

In:  models to compare (--models: the base model first, then each iteration's), MGSM TSVs,
     the bundled math set (data/math/{lang}.jsonl with question/answer), instruction prompts.
Out: in --output (default runs/demo/eval/):
     eval.json         per model, per metric, per language: score, n, 95% interval
     predictions.jsonl every prompt, response, extracted answer, judge verdicts
     report.md         first the effect (the last model minus the first on the targeted metric, language
                       fidelity of answers to held-out prompts, paired by prompt, with 95% intervals),
                       then models as columns, metric x language as rows, deltas against the first model
     report.png        per-language bars per model, one panel per metric (needs matplotlib)

    python 05_eval.py --models smollm2-135m runs/demo/model --tasks mgsm,math,winrate --limit 20

Tasks (--tasks):
  mgsm, math  greedy step-by-step answer in the problem's language; the last number in the
              answer is right when within 1e-3 of gold. Also reported: language fidelity
              (share of answers written in the prompt's language), cross-lingual consistency
              (CrossIn: share of parallel problems answered alike in every language) and its
              harmonic mean with accuracy. --translate-test adds `mgsm-tt`/`math-tt`: the model
              first translates the question into English, then answers that (question alignment).
  winrate     each model's answers judged against the first model's, in both orders (a judge
              that favours a slot cancels out), ties count half. Judge: a local model's
              next-token log-probs of "A" vs "B" (--judge), or a model behind an OpenAI-compatible
              server (--judge-server, key from $OPENAI_API_KEY).
A column whose model one of the --server URLs lists (as its /v1/models names it) is answered by
that server; the others in-process.
With --proxy-expert/--proxy-antiexpert one more column is evaluated: the first model
proxy-tuned, logits = first + alpha * (expert - antiexpert).
If a model directory holds train_summary.json (from 04_dpo.py), its held-out reward accuracy
is reported too. --trained-on takes the loop's training records: an evaluated prompt among them stops
the run. Resumable: finished (model, task) work files in --output/work/ are reused;
a killed run continues. Runs under `torchrun --nproc_per_node=K` (prompts sharded, rank 0 reports).
"""
import argparse
import math
import os
import re
import time

import numpy as np
import torch
from tqdm import tqdm

import common

REPO = os.path.dirname(os.path.abspath(__file__))
MATH_TASKS = ("mgsm", "math")
TASKS = MATH_TASKS + ("winrate",)

# The step-by-step line appended to a math problem, in the problem's language (data, like the problems).
MATH_INSTRUCTIONS = common.read_json(os.path.join(REPO, "data", "math", "instructions.json"))
JUDGE_PROMPT = """Two assistants answered the same instruction. Decide which answer is better: more helpful, \
correct and complete, and written in the language of the instruction.

[Instruction]
{instruction}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Which answer is better? Reply with one letter: A or B."""


# What the loop targets, chosen before the demo runs that report it (README, "What the demo shows"): is the
# answer to a held-out instruction written in the instruction's language. Reported first, as the effect of
# the last model against the first, paired by prompt.
EFFECT_METRICS = {"winrate language fidelity": ("winrate", "in_language")}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default after its help."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--models", nargs="+", default=None, help="hub ids, directories or the embedded default; the first is the "
        f"baseline (default: {common.EMBEDDED_MODEL}, plus runs/demo/model if it exists)")
    add("--tasks", default="mgsm,math,winrate", help=f"comma-separated, from {','.join(TASKS)}")
    add("--langs", default="en,es,de,fr,ru,zh", help="comma-separated language codes")
    add("--mgsm", default=os.path.normpath(os.path.join(REPO, "..", "shared", "data", "mgsm")),
        help="MGSM: directory of mgsm_{lang}.tsv, JSONL with question/answer, or hub dataset")
    add("--math", default="data/math", help="math set: directory of {lang}.jsonl, a JSONL file, or hub dataset")
    add("--prompts", default="data/prompts", help="instruction prompts for the win rate")
    add("--trained-on", nargs="*", default=[], metavar="FILE", help="the loop's training records (each iteration's "
        "responses.jsonl): an evaluated prompt whose id or text is among them stops the run before any model loads")
    add("--output", default="runs/demo/eval", help="output directory")
    add("--limit", type=int, default=None, help="first N problems/prompts per task (the same ids in every language)")
    add("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    add("--batch-size", type=int, default=16, help="prompts decoded at once")
    add("--judge-limit", type=int, default=None, help="judge only the first N prompt ids (all are answered, for "
        "language fidelity)")
    add("--token-budget", type=int, default=8192, help="local judge: rows x longest row per batch")
    add("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    add("--translate-test", action="store_true", help="also each math task translated into English, then answered")
    common.add_server_flags(parser, server_model=False)  # a column whose model a --server lists is answered there
    add("--answers-only", action="store_true", help="answer the tasks with the --server columns only, then stop "
        "(no judging, no report); a later run without it reuses those answers (loop.sh: one server at a time)")
    add("--judge", default=common.EMBEDDED_MODEL, help="win-rate judge: a local model, or the model name sent to "
        "--judge-server")
    add("--judge-server", nargs="+", default=None, metavar="URL", help="OpenAI-compatible base URL(s) of the judge, "
        f"e.g. http://127.0.0.1:8000/v1 (chat completions; key from ${common.SERVER_KEY_ENV})")
    add("--judge-max-tokens", type=int, default=8, help="longest judge reply from --judge-server")
    add("--proxy-expert", default=None, help="small tuned model for proxy-tuned decoding")
    add("--proxy-antiexpert", default=None, help="the same small model untuned")
    add("--proxy-alpha", type=float, default=1.0, help="weight of (expert - antiexpert)")
    add("--trust-remote-code", action="store_true", help="allow model code from the hub")
    args = parser.parse_args(argv)
    args.tasks, args.langs = [t for t in args.tasks.split(",") if t], [code for code in args.langs.split(",") if code]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown or not args.tasks:
        raise common.InputError(f"--tasks: unknown task(s) {','.join(unknown) or '(none)'} (known: {','.join(TASKS)})")
    for lang in args.langs:
        common.language_name(lang, "--langs")
    if (args.proxy_expert is None) != (args.proxy_antiexpert is None):
        raise common.InputError("--proxy-expert and --proxy-antiexpert go together")
    if args.answers_only and not args.server:
        raise common.InputError("--answers-only answers the columns a --server serves: give --server")
    if args.max_new_tokens < 1 or args.batch_size < 1 or any(n is not None and n < 1 for n in (args.limit,
                                                                                               args.judge_limit)):
        raise common.InputError("--max-new-tokens, --batch-size, --limit and --judge-limit must be at least 1")
    return args


# ----------------------------------------------------------------------------
# Inputs


def check_gold(answer, where):
    """A math problem's gold answer as a float; a missing or bad one is reported with file and line."""
    if answer is None:
        raise common.InputError(f"{where}: no 'answer' field (math problems need a numeric gold answer)")
    value = answer if isinstance(answer, (int, float)) and not isinstance(answer, bool) else common.parse_number(answer)
    if value is None or not math.isfinite(value):
        raise common.InputError(f"{where}: gold answer {answer!r} is not a number")
    return float(value)


def unique_labels(names):
    """Short column names: a directory's shortest distinct path tail (iter1/model, iter2/model), else the name.

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
    if not os.path.isfile(path):
        return None
    summary = common.read_json(path)
    accuracy, pairs = summary.get("eval_after", {}).get("rewards/accuracies"), summary.get("eval_pairs")
    if accuracy is None or not pairs:
        raise common.InputError(f"{path}: needs 'eval_after' with 'rewards/accuracies' and 'eval_pairs'")
    wins = round(accuracy * pairs)  # the per-pair outcomes, rebuilt from the rate and the count
    return dict(entry([1.0] * wins + [0.0] * (pairs - wins), seed=0), score=accuracy)


# ----------------------------------------------------------------------------
# Generation


def load_generator(column, args):
    """(generate(prompt texts, desc) -> common.generate's iterator, tokenizer, engine name) for one column."""
    servers = column.get("servers")
    engine, tokenizer, _ = common.load_engine(column["model"], servers, column.get("served_as"),
                                              args.server_concurrency, args.trust_remote_code)
    small = []
    for flag, name in (("--proxy-expert", args.proxy_expert), ("--proxy-antiexpert", args.proxy_antiexpert)):
        # fp32 on every device: proxy-tuning adds their difference, which bf16 would round away.
        small_model, small_tokenizer = common.load_model(name, None, torch.float32, args.trust_remote_code) \
            if "proxy" in column else (None, tokenizer)
        if small_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise common.InputError(f"{flag} {name}: its tokenizer differs from {column['model']}'s; "
                                    "proxy-tuning needs one shared vocabulary")
        small.append(small_model)
    proxy = (small[0], small[1], args.proxy_alpha) if "proxy" in column else None
    return (lambda texts, desc: common.generate(engine, tokenizer, texts, max_new_tokens=args.max_new_tokens,
                                                batch_size=args.batch_size, desc=desc, proxy=proxy)), tokenizer, \
        common.engine_name(engine)


def in_language(text, lang):
    """Language fidelity of one answer: an empty answer is not in any language; only numbers pass."""
    return bool(text.strip()) and common.is_in_language(text, lang)


def answers(generate, tokenizer, items, messages, desc, counts):
    """One greedy answer to messages[i] for each items[i]; yields lists of (item, message, sample) per batch."""
    texts = [common.chat_prompt_text(tokenizer, message) for message in messages]
    for batch in generate(texts, desc):
        counts["new_tokens"] += sum(samples[0]["new_tokens"] for _, samples in batch)
        yield [(items[index], messages[index], samples[0]) for index, samples in batch]


def math_message(question, lang):
    """The user turn for a math problem: the problem, then the step-by-step line in its language."""
    return f"{question}\n\n{MATH_INSTRUCTIONS.get(lang, MATH_INSTRUCTIONS['en'])}"


def task_records(generate, tokenizer, items, task, counts):
    """Yields lists of prediction records for one task's items, a batch at a time.

    Every record has the answer and its language; a math record also the last number and whether it is right.
    A translate-test task (`-tt`) first translates the questions into English (with the question-translation
    prompt QAlign trains in 03), then answers the English question.
    """
    english = {id(item): item["prompt"] for item in items}
    if task.endswith("-tt"):
        to_translate = [item for item in items if item["lang"] != "en"]
        requests = [f"{common.QUESTION_TRANSLATION.format(language=common.language_name(item['lang']))}\n\n"
                    f"{item['prompt']}" for item in to_translate]
        for batch in answers(generate, tokenizer, to_translate, requests, "translate", counts):
            english.update({id(item): sample["text"] for item, _, sample in batch})
    messages = [item["prompt"] if task == "winrate" else math_message(english[id(item)], "en") if task.endswith("-tt")
                else math_message(item["prompt"], item["lang"]) for item in items]
    for batch in answers(generate, tokenizer, items, messages, "answer", counts):
        records = []
        for item, message, sample in batch:
            text = sample["text"]
            record = {**{k: item[k] for k in ("model", "task", "id", "lang", "engine")}, "prompt": message,
                      "response": text,
                      "truncated": sample["truncated"], "detected_language": common.detect_language(text),
                      "in_language": in_language(text, item["lang"])}
            if task != "winrate":
                prediction = common.extract_last_number(text)
                counts["no_number"] += prediction is None
                record.update(answer=item["answer"], prediction=prediction,
                              correct=common.same_number(prediction, item["answer"]))
            if task.endswith("-tt"):
                record.update(question=item["prompt"], question_en=english[id(item)])
            records.append(record)
        yield records


def predict(column, task_items, work, args, rank, world_size, counts):
    """Every task's predictions for one column: {task: [record]}, generating only what is not on disk.

    The model is loaded only if some task is unfinished, and freed on return, before the next column's.
    """
    generator, predictions = None, {}
    for task, problems in task_items.items():
        path = os.path.join(work, f"{column['slug']}.{task}.jsonl")
        if not os.path.exists(path):  # not finished in an earlier run
            generate, tokenizer, engine = generator = generator or load_generator(column, args)
            items = [{**p, "model": column["label"], "task": task, "engine": engine} for p in problems]
            key = lambda record: (record["model"], record["task"], record["id"], record["lang"])  # noqa: E731
            _, mine = common.resume(path, items, key, rank, world_size)
            for records in task_records(generate, tokenizer, mine, task, counts):
                common.save_batch(path, records, rank)
            counts["predictions"] += len(mine)
            common.finish(path, items, key, rank)
        predictions[task] = [record for _, record in common.read_jsonl(path)]
    return predictions


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
    texts = []
    for instruction, reference, candidate in pairs:
        texts.append(JUDGE_PROMPT.format(instruction=instruction, answer_a=reference, answer_b=candidate))
        texts.append(JUDGE_PROMPT.format(instruction=instruction, answer_a=candidate, answer_b=reference))
    verdicts = judge(texts)
    results = []
    for k in range(len(pairs)):
        first, second = verdicts[2 * k], verdicts[2 * k + 1]
        if "logp_a" in first:
            margin = (first["logp_b"] - first["logp_a"]) + (second["logp_a"] - second["logp_b"])
            score = 1.0 if margin > 0 else 0.0 if margin < 0 else 0.5
        else:
            points = {"B": 1.0, "A": 0.0}.get(first["choice"], 0.5), {"A": 1.0, "B": 0.0}.get(second["choice"], 0.5)
            score = sum(points) / 2
        results.append((score, [dict(first, order="reference first"), dict(second, order="candidate first")]))
    return results


def load_local_judge(args):
    """(judge, its model): --judge in fp32 on every device, as a verdict is the difference of two log-probs,
    which bf16 would round away (its error is as large as the margins themselves)."""
    model, tokenizer = common.load_model(args.judge, None, torch.float32, args.trust_remote_code)
    return local_judge(model, tokenizer, args.token_budget), model


def local_judge(model, tokenizer, token_budget):
    """A judge that compares the log-probabilities of "A" and "B" as the next token after the pairwise prompt,
    from the scorer 03 and 04 use. Cheaper and steadier than parsing a generated reply: there is always a verdict.
    """
    letters = [tokenizer("A", add_special_tokens=False).input_ids, tokenizer("B", add_special_tokens=False).input_ids]
    if any(len(ids) != 1 for ids in letters):
        raise common.InputError("--judge: the tokenizer does not have single tokens for 'A' and 'B'")

    def judge(texts):
        prompts = [common.chat_prompt_ids(tokenizer, text) for text in texts]
        logps, _ = common.score_sequences(model, [(ids + letter, len(ids)) for ids in prompts for letter in letters],
                                          token_budget, show_progress=False)
        verdicts = []
        for logp_a, logp_b in logps.view(-1, 2).tolist():
            choice = "A" if logp_a > logp_b else "B" if logp_b > logp_a else "tie"
            verdicts.append({"choice": choice, "logp_a": logp_a, "logp_b": logp_b})
        return verdicts

    return judge


def server_judge(server, max_tokens):
    """A judge behind an OpenAI-compatible server (chat completions, greedy; the reply is parsed for A or B)."""
    def judge(texts):
        replies = common.server_chat(server, texts, max_tokens)
        return [{"choice": match.group(1) if match else None, "reply": reply}
                for reply, match in ((reply, re.search(r"\b([AB])\b", reply)) for reply in replies)]

    return judge


def judge_column(judge, reference, answers, path, rank, world_size, counts, chunk=16):
    """Judge one column's win-rate answers against the reference column's; resumable like the predictions."""
    key = lambda record: (record["model"], record["id"], record["lang"])  # noqa: E731
    _, mine = common.resume(path, answers, key, rank, world_size)
    for start in tqdm(range(0, len(mine), chunk), desc="judge", unit="batch", disable=not mine, dynamic_ncols=True):
        part = mine[start:start + chunk]
        results = judge_pairs(judge, [(item["prompt"], reference[(item["id"], item["lang"])]["response"],
                                       item["response"]) for item in part])
        counts["unreadable_verdicts"] += sum(v["choice"] is None for _, verdicts in results for v in verdicts)
        common.save_batch(path, [{"model": item["model"], "task": "judge", "id": item["id"], "lang": item["lang"],
                                  "score": score, "verdicts": verdicts}
                                 for item, (score, verdicts) in zip(part, results)], rank)
    counts["judged"] += len(mine)
    common.finish(path, answers, key, rank)
    return [record for _, record in common.read_jsonl(path)]


def judge_caveat(args, judge_model):
    """What the report says about the judge: which one, how it decides, and how far to trust it."""
    if args.judge_server:
        return (f"Judge: `{args.judge}` behind {' '.join(args.judge_server)} (chat completions, greedy, reply parsed "
                "for A/B). "
                "LLM judges favour longer answers; position bias is cancelled by judging both orders.")
    millions = sum(p.numel() for p in judge_model.parameters()) / 1e6
    caveat = (f" **Caveat: a {millions:.0f}M-parameter judge is weak (its raw verdicts are mostly position bias); "
              "treat these win rates as a smoke test, not evidence. Use --judge-server with a strong model.**")
    return (f"Judge: local model `{args.judge}` ({millions:.0f}M parameters), next-token log-probs of 'A' vs 'B' "
            "after a pairwise prompt; the candidate's margin is summed over both orders, which cancels a fixed "
            "position bias, and its sign is the verdict." + (caveat if millions < 1000 else ""))


# ----------------------------------------------------------------------------
# Metrics and report


def bootstrap_interval(values, samples=1000, seed=0):
    """95% bootstrap interval of the mean of `values` (0/1 or fractions)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (math.nan, math.nan)
    generator = np.random.default_rng(seed)
    means = values[generator.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def entry(values, seed):
    low, high = bootstrap_interval(values, seed=seed)
    return {"score": float(np.mean(values)), "n": len(values), "ci": [low, high]}


def per_language(rows, field, langs, seed):
    table = {lang: entry([float(r[field]) for r in rows if r["lang"] == lang], seed)
             for lang in langs if any(r["lang"] == lang for r in rows)}
    if rows:
        table["all"] = entry([float(r[field]) for r in rows], seed)
    return table


def consistency(rows, langs, seed, samples=1000):
    """CrossIn cross-lingual consistency over parallel problems, and its harmonic mean with accuracy.

    A problem is consistent when it got a number in every language and the numbers agree
    (within 1e-3). Accuracy here is over the same problems and languages. Intervals
    resample problems (each with all its languages) so the two stay paired.
    """
    by_id = {}
    for row in rows:
        by_id.setdefault(row["id"], {})[row["lang"]] = row
    parallel = [group for group in by_id.values() if all(lang in group for lang in langs)]
    if not parallel or len(langs) < 2:
        return {}
    same = np.array([all(group[lang]["prediction"] is not None for lang in langs) and
                     max(group[lang]["prediction"] for lang in langs) - min(group[lang]["prediction"] for lang in langs)
                     <= common.ANSWER_TOLERANCE for group in parallel], dtype=float)
    correct = np.array([np.mean([group[lang]["correct"] for lang in langs]) for group in parallel])

    def harmonic(cons, acc):
        return 0.0 if cons + acc == 0 else 2 * cons * acc / (cons + acc)

    picks = np.random.default_rng(seed).integers(0, len(parallel), size=(samples, len(parallel)))
    boot = [harmonic(same[p].mean(), correct[p].mean()) for p in picks]
    return {"consistency": {"all": entry(same, seed)},
            "consistency x accuracy (harmonic mean)": {"all": {
                "score": harmonic(same.mean(), correct.mean()), "n": len(parallel),
                "ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}}}


def compute_results(columns, predictions, judgements, langs, seed):
    """{label: {metric: {lang: {"score", "n", "ci"}}}}; metrics are named "<task> <what>"."""
    results = {}
    for column in columns:
        label, metrics = column["label"], {}
        for task, rows in predictions[label].items():
            if task.split("-")[0] in MATH_TASKS:
                metrics[f"{task} accuracy"] = per_language(rows, "correct", langs, seed)
                for name, table in consistency(rows, langs, seed).items():
                    metrics[f"{task} {name}"] = table
            if task == "winrate" and label in judgements:
                metrics["winrate vs first model"] = per_language(judgements[label], "score", langs, seed)
            if not task.endswith("-tt"):  # translate-test answers are in English by design
                metrics[f"{task} language fidelity"] = per_language(rows, "in_language", langs, seed)
        if column.get("held_out"):
            metrics["held-out reward accuracy (04)"] = {"all": column["held_out"]}
        results[label] = metrics
    return results


def compute_effect(columns, predictions, langs, seed):
    """{metric: {lang: entry of (last model - first model)}} for EFFECT_METRICS, paired by (id, lang)."""
    trained = [c["label"] for c in columns if "proxy" not in c]
    effect = {}
    for metric, (task, field) in EFFECT_METRICS.items():
        if len(trained) < 2 or task not in predictions[trained[0]]:
            continue
        before = {(r["id"], r["lang"]): float(r[field]) for r in predictions[trained[0]][task]}
        differences = [{"lang": r["lang"], "diff": float(r[field]) - before[r["id"], r["lang"]]}
                       for r in predictions[trained[-1]][task]]
        effect[metric] = per_language(differences, "diff", langs, seed)
    return effect


def effect_lines(effect, results, labels):
    """The report's first table: each targeted metric for every model, then last - first with its interval."""
    lines = ["## Effect: " + f"`{labels[-1]}` - `{labels[0]}` on held-out prompts", "",
             "| metric | lang | " + " | ".join(f"`{label}`" for label in labels) + " | difference [95% CI] |",
             "|---|---|" + "---|" * (len(labels) + 1)]
    clear = []
    for metric, table in effect.items():
        for lang, value in table.items():
            low, high = (100 * bound for bound in value["ci"])
            lines.append(f"| {metric} | {lang} | " + " | ".join(cell(results[label][metric].get(lang))
                                                             for label in labels)
                         + f" | {100 * value['score']:+.1f} [{low:+.1f}, {high:+.1f}] n={value['n']} |")
            if low > 0 or high < 0:
                clear.append(f"{lang} {100 * value['score']:+.1f}")
    return lines + ["", "Differences whose interval excludes zero: " + (", ".join(clear) or "none") +
                    ". The interval is a bootstrap over prompts, each model's answers to a prompt kept together.", ""]


def metric_names(results, labels):
    """Every metric once, in the order compute_results makes them; the baseline lacks some, so it goes last."""
    return list(dict.fromkeys(metric for label in labels[1:] + labels[:1] for metric in results[label]))


def cell(value, base=None):
    if value is None:
        return "–"
    text = f"{100 * value['score']:.1f} [{100 * value['ci'][0]:.1f}, {100 * value['ci'][1]:.1f}] n={value['n']}"
    if base is not None:
        text += f" ({100 * (value['score'] - base['score']):+.1f})"
    return text


def write_report(path, columns, results, effect, held_out, judge_text, args):
    labels = [c["label"] for c in columns]
    rows = [(metric, lang) for metric in metric_names(results, labels) for lang in args.langs + ["all"]
            if any(lang in results[label].get(metric, {}) for label in labels)]
    lines = ["# Evaluation report", "",
             "Columns are models; the first is the baseline and later cells show the difference from it in "
             "points (+/-). Each cell: score in % [95% bootstrap interval] n=number of items.", ""]
    lines += [f"- `{c['label']}`: {c['description']}" for c in columns] + [""]
    if held_out:
        lines += [f"Held out: no evaluated prompt is among the {held_out['training_prompt_ids']} prompt ids (in any "
                  f"language) or the texts the loop trained on ({', '.join(held_out['trained_on'])}).", ""]
    if effect:
        lines += effect_lines(effect, results, [c["label"] for c in columns if "proxy" not in c])
    lines += ["## All metrics", "", (f"Math: greedy, max {args.max_new_tokens} new tokens, the last number in the "
              "answer counts, right within 1e-3 of gold. Consistency (CrossIn): share of parallel problems answered "
              "with the same number in every language. " if set(args.tasks) & set(MATH_TASKS) else "") +
              "Language fidelity: share of answers detected (py3langid) in the prompt's language; an answer of only "
              "numbers counts as faithful, an empty one does not. `all` pools the languages.", ""]
    if any("winrate vs first model" in results[label] for label in labels):
        lines += ["Win rate: share of pairwise judgements won against the first model, both orders, ties half.",
                  judge_text, ""]
    lines += ["| metric | lang | " + " | ".join(f"`{label}`" for label in labels) + " |",
              "|---|---|" + "---|" * len(labels)]
    for metric, lang in rows:
        base = results[labels[0]].get(metric, {}).get(lang)
        cells = [cell(results[label].get(metric, {}).get(lang), base if k > 0 else None)
                 for k, label in enumerate(labels)]
        lines.append(f"| {metric} | {lang} | " + " | ".join(cells) + " |")
    common.write_atomic(path, lambda handle: handle.write("\n".join(lines) + "\n"))


def plot_report(path, columns, results, effect, langs):
    """The effect first (last - first model, per language), then one panel per metric: bars per model, whiskers
    for the intervals."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no report.png")
        return False
    labels, trained = [c["label"] for c in columns], [c["label"] for c in columns if "proxy" not in c]
    metrics = [metric for metric in metric_names(results, labels)
               if any(lang in results[label].get(metric, {}) for label in labels for lang in langs)]
    panels = [(f"effect: {metric}\n{trained[-1]} - {trained[0]}, 95% interval", {"difference": table})
              for metric, table in effect.items()]
    panels += [(metric, {label: results[label].get(metric, {}) for label in labels}) for metric in metrics]
    if not panels:
        return False
    figure, axes = plt.subplots(math.ceil(len(panels) / 2), 2, figsize=(13, 3.4 * math.ceil(len(panels) / 2)),
                                squeeze=False)
    groups = langs + ["all"]
    for axis, (title, series) in zip(axes.flat, panels):
        for k, (label, table) in enumerate(series.items()):  # model k: colour k, the k-th bar of every group
            values = [(i + (k - (len(series) - 1) / 2) * 0.8 / len(series), table[lang])
                      for i, lang in enumerate(groups) if lang in table]
            axis.bar([x for x, _ in values], [100 * v["score"] for _, v in values], 0.8 / len(series), capsize=2,
                     yerr=[[100 * (v["score"] - v["ci"][0]) for _, v in values],
                           [100 * (v["ci"][1] - v["score"]) for _, v in values]],
                     color="black" if label == "difference" else f"C{k % 10}", label=label)
        axis.set(xticks=range(len(groups)), xticklabels=groups, title=title)
        if "difference" in series:
            axis.set_ylabel("points")
            axis.axhline(0, color="grey", linewidth=0.8)
        else:
            axis.set(ylabel="%", ylim=(0, 100))
        if title == "winrate vs first model":
            axis.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    if len(panels) > len(effect):
        axes.flat[len(effect)].legend(fontsize=8)
    figure.tight_layout()
    common.write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=110), binary=True)
    plt.close(figure)
    return True


# ----------------------------------------------------------------------------


def make_columns(names, args):
    """One column per model to evaluate (plus the proxy-tuned one), each with a label and a work-file slug."""
    columns = [{"label": label, "model": name, "description": name, "held_out": held_out_reward_accuracy(name)}
               for label, name in zip(unique_labels(names), names)]
    if args.proxy_expert:
        columns.append({"label": "proxy-tuned", "model": names[0], "proxy": True, "held_out": None,
                        "description": f"{names[0]} + {args.proxy_alpha} x "
                                       f"({args.proxy_expert} - {args.proxy_antiexpert})"})
    # Work files are named after what the column is and what it answers: a changed --models, --limit, --langs,
    # data source or answer length never reuses them.
    answers = [args.limit, args.langs, args.max_new_tokens, args.mgsm, args.math, args.prompts]
    for column in columns:
        column["slug"] = f"{slug(column['label'])}-{common.content_key(column['description'], answers)[:8]}"
    return columns


def attach_servers(columns, urls):
    """Give each column the --server URLs whose /v1/models lists its model (by name, or as the directory the
    name resolves to, as loop.sh serves it); the other columns are answered in-process."""
    for url in urls:
        listed = common.served_models(url)
        matched = 0
        for column in columns:
            name = next((n for n in (column["model"], common.resolve_model(column["model"])) if n in listed), None)
            if name and "proxy" not in column:
                column.setdefault("servers", []).append(url.rstrip("/"))
                column["served_as"], matched = name, matched + 1
        if not matched:
            raise common.InputError(f"--server {url}: serves {listed}, none of --models (name them as it lists them)")


def load_tasks(tasks, langs, args):
    """{task: items}, every input read and checked before any model loads, so a bad file fails in a second."""
    task_items = {}
    for task in tasks:
        if task in MATH_TASKS:
            task_items[task] = common.load_prompts(  # every gold answer checked, by file and line
                args.mgsm if task == "mgsm" else args.math, langs=langs, limit=args.limit,
                check=lambda record, where: record.update(answer=check_gold(record.get("answer"), where)))
            if args.translate_test:
                task_items[f"{task}-tt"] = task_items[task]
        else:
            task_items[task] = common.load_prompts(args.prompts, langs=langs, limit=args.limit)
    return task_items


def check_held_out(task_items, trained_on):
    """Stop if an evaluated prompt was trained on: the same text, or (instruction prompts) the same id in any
    language, since the parallel prompt is the same prompt translated. Returns what the report says about it."""
    trained = [(path, record) for path in trained_on for _, record in common.read_jsonl(path, required=("id",))]
    ids, texts = {str(r["id"]): path for path, r in trained}, {r.get("prompt"): path for path, r in trained}
    for task, items in task_items.items():
        for item in items:
            path = texts.get(item["prompt"]) or (task == "winrate" and ids.get(str(item["id"])))
            if path:
                raise common.InputError(f"{task} prompt '{item['id']}' ({item['lang']}) was trained on ({path}): "
                                        "evaluate on prompts no iteration trained on")
    return {"trained_on": trained_on, "training_prompt_ids": len(ids), "overlap": 0} if trained_on else None


def judge_all(columns, predictions, work, args, rank, world_size, counts, api):
    """({label: judgements} for every column after the first, the judge's description for the report)."""
    reference = {(r["id"], r["lang"]): r for r in common.first_ids(predictions[columns[0]["label"]]["winrate"],
                                                                  args.judge_limit)}
    judge, judge_model = (api, None) if api else load_local_judge(args)
    judge_name = slug(f"{args.judge}@{args.judge_server[0]}" if args.judge_server else args.judge)
    judgements = {column["label"]: judge_column(  # resumable: judges only what is not on disk
        judge, reference, [r for r in predictions[column["label"]]["winrate"] if (r["id"], r["lang"]) in reference],
        os.path.join(work, f"{column['slug']}.judge-{judge_name}.jsonl"), rank, world_size, counts)
        for column in columns[1:]}
    return judgements, judge_caveat(args, judge_model)


def write_outputs(output, columns, predictions, judgements, judge_text, task_items, held_out, langs, args):
    """eval.json, predictions.jsonl, report.md and report.png; eval.json last: its presence means done."""
    results = compute_results(columns, predictions, judgements, langs, args.seed)
    effect = compute_effect(columns, predictions, langs, args.seed)
    verdicts = {(r["model"], r["id"], r["lang"]): {"judge_score": r["score"], "judge_verdicts": r["verdicts"]}
                for rows in judgements.values() for r in rows}
    common.write_jsonl(os.path.join(output, "predictions.jsonl"), [
        {**row, **(verdicts.get((label, row["id"], row["lang"]), {}) if task == "winrate" else {})}
        for label, by_task in predictions.items() for task, rows in by_task.items() for row in rows])
    write_report(os.path.join(output, "report.md"), columns, results, effect, held_out, judge_text, args)
    plotted = plot_report(os.path.join(output, "report.png"), columns, results, effect, langs)
    common.write_json(os.path.join(output, "eval.json"), {
        "models": [{**{k: c[k] for k in ("label", "model", "description")}, "engines": sorted(
                    {row.get("engine", "in-process") for rows in predictions[c["label"]].values() for row in rows})}
                   for c in columns], "tasks": list(task_items),
        "langs": langs, "judge": judge_text or None, "max_new_tokens": args.max_new_tokens, "held_out": held_out,
        "effect": effect, "results": results})
    print(f"wrote {os.path.join(output, 'eval.json')}, predictions.jsonl, report.md"
          + (", report.png" if plotted else ""))


def main(argv=None):
    args = parse_args(argv)
    names = args.models
    if names is None:
        names = [common.EMBEDDED_MODEL] + (["runs/demo/model"] if os.path.isdir("runs/demo/model") else [])
        if len(names) == 1:
            print("runs/demo/model not found: evaluating the base model only")
    columns = make_columns(names, args)
    attach_servers(columns, args.server or [])
    task_items = load_tasks(args.tasks, args.langs, args)
    held_out = check_held_out(task_items, args.trained_on)
    rank, world_size = common.setup_distributed()
    settings = {name: value for name, value in vars(args).items()
                if name not in ("output", "batch_size", "token_budget", "trust_remote_code", "server",
                                "server_concurrency", "answers_only")}
    common.claim(os.path.join(args.output, "eval.json"), settings, rank, partial=False)
    judging = "winrate" in args.tasks and len(columns) > 1 and not args.answers_only
    # The judge's server is asked for its models now: a wrong URL, key or model name fails before any generation.
    api = server_judge(common.connect(args.judge_server, args.judge, args.server_concurrency), args.judge_max_tokens) \
        if judging and args.judge_server else None
    work = os.path.join(args.output, "work")
    counts = {"new_tokens": 0, "predictions": 0, "judged": 0, "no_number": 0, "unreadable_verdicts": 0}
    started = time.perf_counter()

    # 1. Predict: every column's answers to every task (work files, resumable).
    predictions = {column["label"]: predict(column, task_items, work, args, rank, world_size, counts)
                   for column in columns if column.get("servers") or not args.answers_only}
    if args.answers_only:
        print(f"05_eval --answers-only: answered {', '.join(predictions)} ({counts['predictions']} now) in {work}")
        return common.cleanup_distributed()
    # 2. Judge: each later column's win-rate answers against the first column's.
    judgements, judge_text = judge_all(columns, predictions, work, args, rank, world_size, counts, api) \
        if judging else ({}, "")
    # 3. Write eval.json, predictions.jsonl and the report.
    if rank == 0:
        write_outputs(args.output, columns, predictions, judgements, judge_text, task_items, held_out, args.langs, args)
    print(common.summary_line(
        "05_eval" + (f"[rank {rank}]" if world_size > 1 else ""), time.perf_counter() - started, counts["new_tokens"],
        models=len(columns), tasks=len(task_items), predictions_made_now=counts["predictions"],
        judged_now=counts["judged"], answers_without_a_number=counts["no_number"],
        unreadable_judge_replies=counts["unreadable_verdicts"]))
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
