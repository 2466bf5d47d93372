"""How long must an answer be for 05 to tell its language? The demo's effect, read at shorter answer lengths.

05 answers greedily, so the answer it would give with --max-new-tokens N is the first N tokens of a longer
answer. This reads one 05 run (its predictions.jsonl and eval.json), cuts every win-rate answer to its first N
tokens (re-encoded with the first model's tokenizer), judges its language again with 05's own check, and prints
for each N:
  - how often the verdict on the cut answer agrees with the full answer's, per language (the lowest over the
    models) and per model;
  - each model's language fidelity and the effect (each later model minus the first, per language and pooled
    over the languages besides English), with 05's intervals.
A length whose effects match the full length's is as good as it for the demo's question, at less decoding.
Last, the power arithmetic: from the spread of the per-prompt differences at full length, how many prompts per
language an --effect-point difference needs for its interval to exclude zero in 80% of runs.

    python bench/eval_length.py runs/loop/eval --lengths 64,48,32,24,16
"""
import argparse
import importlib.util
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

spec = importlib.util.spec_from_file_location("eval05", os.path.join(REPO, "05_eval.py"))
eval05 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval05)


def cut_predictions(rows, tokenizer, length):
    """{model: {"winrate": rows}} with each answer cut to its first `length` tokens and judged again."""
    cut = {}
    for row in rows:
        ids = tokenizer(row["response"], add_special_tokens=False).input_ids
        text = tokenizer.decode(ids[:length], skip_special_tokens=True) if len(ids) > length else row["response"]
        cut.setdefault(row["model"], {"winrate": []})["winrate"].append(
            {**row, "response": text, "in_language": eval05.in_language(text, row["lang"])})
    return cut


def interval(value):
    return f"{100 * value['score']:+.1f} [{100 * value['ci'][0]:+.1f}, {100 * value['ci'][1]:+.1f}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dir", help="a 05_eval.py --output folder (loop.sh: runs/loop/eval)")
    parser.add_argument("--lengths", default="64,48,32,24,16", help="answer lengths to read, in tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    parser.add_argument("--effect", type=float, default=0.08, help="the effect the power arithmetic is for")
    args = parser.parse_args()
    summary = common.read_json(os.path.join(args.eval_dir, "eval.json"))
    labels, langs = [model["label"] for model in summary["models"]], summary["langs"]
    rows = [row for _, row in common.read_jsonl(os.path.join(args.eval_dir, "predictions.jsonl"))
            if row["task"] == "winrate"]
    tokenizer = common.load_tokenizer(summary["models"][0]["model"])
    full = cut_predictions(rows, tokenizer, 10 ** 9)
    columns = [{"label": label} for label in labels]
    print(f"{args.eval_dir}: {len(rows)} answers, {summary['max_new_tokens']} tokens at most, "
          f"models {', '.join(labels)}\n")
    for length in [int(n) for n in args.lengths.split(",")]:
        cut = cut_predictions(rows, tokenizer, length)
        agree = {(label, lang): [a["in_language"] == b["in_language"] for a, b in
                                 zip(full[label]["winrate"], cut[label]["winrate"]) if a["lang"] == lang]
                 for label in labels for lang in langs}
        lowest = {lang: min(sum(v) / len(v) for (_, l), v in agree.items() if l == lang) for lang in langs}
        print(f"## {length} tokens\n\nagreement with the full answer's verdict (lowest over models): "
              + ", ".join(f"{lang} {100 * share:.1f}%" for lang, share in lowest.items()))
        for k, label in enumerate(labels):
            fidelity = eval05.per_language(cut[label]["winrate"], "in_language", langs, args.seed)
            fidelity.update(eval05.pooled_others(cut[label]["winrate"], "in_language", langs, args.seed))
            line = ", ".join(f"{lang} {100 * value['score']:.1f}" for lang, value in fidelity.items())
            if k:
                effect = eval05.compute_effect([columns[0], columns[k]], cut, langs, args.seed)
                line += "; minus the first: " + ", ".join(
                    f"{lang} {interval(value)}" for lang, value in effect[eval05.INSTRUCTION_FIDELITY].items())
            print(f"- `{label}` fidelity {line}")
        print()
    # The power arithmetic: n = ((z_0.975 + z_0.8) * sd / effect)^2 prompts per language, sd the spread of the
    # per-prompt difference (last model minus first, each -1, 0 or +1), so that an `effect`-point difference
    # has an interval that excludes zero in 80% of runs.
    first = {(r["id"], r["lang"]): r["in_language"] for r in full[labels[0]]["winrate"]}
    print(f"prompts per language for 80% power at a {100 * args.effect:.0f}-point effect, from the spread of "
          f"`{labels[-1]}` - `{labels[0]}` at full length:")
    for lang in langs:
        diffs = [float(r["in_language"]) - first[r["id"], lang] for r in full[labels[-1]]["winrate"]
                 if r["lang"] == lang]
        needed = math.ceil(((1.959964 + 0.841621) * np.std(diffs) / args.effect) ** 2)
        print(f"- {lang}: sd {np.std(diffs):.3f} over {len(diffs)} prompts, mean {100 * np.mean(diffs):+.1f}: "
              f"n = {needed}")


if __name__ == "__main__":
    main()
