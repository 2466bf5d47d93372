"""03_reward.py: turn the policy's own answers into preference pairs (or SFT rows).

In:  translated.jsonl from 02_translate.py (methods imbalance and crossin), responses.jsonl
     from 01_generate.py (implicit), or any of these or a prompts JSONL (qalign).
Out: pairs.jsonl: {"id", "lang", "prompt", "chosen", "rejected", "method", ...scores} per pair,
     or {"id", "lang", "prompt", "completion", "method", ...} per SFT row (crossin, qalign);
     pairs.summary.json (rows made and skipped, per language and reason); with --eval-frac a
     held-out pairs.eval.jsonl (whole prompt ids, never on both sides); for implicit the
     cache pairs.scores.jsonl (every sample's log-probs, so a killed run does not rescore).

    python 03_reward.py --method imbalance --input runs/loop/iter1/translated.jsonl \
        --output runs/loop/iter1/pairs.jsonl

Methods (English, the dominant language, is the teacher; X is any other language):
  imbalance  language-imbalance-driven rewarding. Prompt in X: chosen = the English answer
             translated into X, rejected = the native X answer. Prompt in English: chosen =
             the native English answer, rejected = the X answer translated into English.
             Sample i is paired with sample i.
  implicit   implicit cross-lingual rewarding. Every answer is scored after the *English*
             instruction plus a line asking for language X; reward = beta * (log pi_dpo -
             log pi_ref); chosen = best, rejected = worst of the N samples after length
             control (reward - alpha * characters, alpha per language chosen on a grid so
             the mean chosen-minus-rejected length is closest to zero). English answers
             are scored after their own instruction, so English gets pairs too (leave it
             out with --langs). Needs --dpo-model and --ref-model (e.g. last iteration's
             trained model and its reference) and N >= 2 samples per prompt. Two LoRA
             policies of one base (or one and its base) are scored on ONE base in memory.
  crossin    CrossIn SFT rows: English instruction + "answer in X" -> the English answer
             translated into X; X instruction + "answer in English" -> the English answer;
             "translate this X instruction into English" -> the English instruction.
  qalign     QAlign stage one SFT rows: "translate this question from X into English" ->
             the English question (the gold English prompt of the same id, else prompt_en).
Rerunning a finished run does nothing; the outputs appear only when complete.
"""
import argparse
import math
import os
import random
import time
from collections import Counter, defaultdict

import numpy as np
import torch
from tqdm import tqdm

import common

ANSWER_IN = "Please answer in {language}."
TRANSLATE_INSTRUCTION = "Translate the following {language} instruction into English."
TIE = 1e-4  # rewards closer than this are equal: the scorer is exact to about 1e-5


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--method", choices=("imbalance", "implicit", "crossin", "qalign"), default="imbalance",
        help="how rows are made (see above)")
    add("--input", default="runs/loop/iter1/translated.jsonl", help="translated.jsonl or responses.jsonl")
    add("--output", default="runs/loop/iter1/pairs.jsonl", help="the pairs or SFT rows")
    add("--langs", default=None, help="comma-separated languages to use (default: all in the input); the "
        "dominant language's records are always read, as the teacher")
    add("--limit", type=int, default=None, help="use only the first N prompt ids")
    add("--seed", type=int, default=0, help="seed of the held-out split and the crossin mix")
    add("--eval-frac", type=float, default=0.0,
        help="hold out this share of prompt ids into <output>.eval.jsonl (at least one id)")
    add("--conversational", action="store_true",
        help="write TRL's form: chat messages (README, \"The four published methods\")")
    add("--keep-truncated", action="store_true",
        help="also use answers that hit max_new_tokens in 01 (skipped by default)")
    add("--dominant", default="en", help="the teacher language")
    add = parser.add_argument_group("imbalance").add_argument
    add("--check-answer", action="store_true",
        help="skip pairs whose chosen answer's last number is not the record's gold 'answer'")
    add = parser.add_argument_group("implicit").add_argument
    add("--dpo-model", default=None, help="the English-aligned DPO model (hub id or directory)")
    add("--ref-model", default=None, help="its reference model (same tokenizer)")
    add("--beta", type=float, default=1.0, help="reward = beta * (log pi_dpo - log pi_ref)")
    add("--alpha", type=float, default=None, help="fixed length penalty per character "
        "(0 turns length control off); default: chosen per language on a grid")
    add("--min-margin", type=float, default=0.0,
        help="drop prompts whose best and worst (length-controlled) scores differ by less than this")
    add("--batch-size", type=int, default=16, help="records scored (and cached) together")
    add("--token-budget", type=int, default=8192, help="scorer batch size in tokens")
    add("--trust-remote-code", action="store_true", help="allow model code from the hub")
    add = parser.add_argument_group("crossin (share of the possible rows of each kind to keep)").add_argument
    add("--mix-answer-in-x", type=float, default=1.0, help="English instruction, answer in X")
    add("--mix-answer-in-en", type=float, default=1.0, help="X instruction, answer in English")
    add("--mix-translate", type=float, default=1.0, help="translate the X instruction into English")
    add = parser.add_argument_group("qalign").add_argument
    add("--qalign-source", choices=("auto", "gold", "prompt_en"), default="auto", help="English question: "
        "the English record of the same id (gold), 02's prompt_en, or gold where there is one (auto)")
    args = parser.parse_args(argv)
    implicit = args.method == "implicit"
    mixes = (args.mix_answer_in_x, args.mix_answer_in_en, args.mix_translate)
    common.refuse({  # "not in range" rather than "out of range": a comparison with nan is False
        "out of range: --eval-frac in [0, 1)": not 0 <= args.eval_frac < 1,
        "out of range: --mix-* in [0, 1]": not all(0 <= share <= 1 for share in mixes),
        "out of range: --beta > 0": not args.beta > 0,
        "out of range: --min-margin >= 0": not args.min_margin >= 0,
        "out of range: --alpha finite": not math.isfinite(args.alpha or 0),
        "out of range: --batch-size, --token-budget, --limit >= 1":
            min(args.batch_size, args.token_budget, 1 if args.limit is None else args.limit) < 1,
        "--method implicit needs --dpo-model and --ref-model":
            implicit and not (args.dpo_model and args.ref_model),
        "--dpo-model and --ref-model are the same model: every reward would be 0":
            implicit and args.dpo_model == args.ref_model})
    common.language_name(args.dominant, "--dominant")
    return args


def sidecar(output, name):
    """pairs.jsonl -> pairs.<name>.jsonl (or .json for the summary)."""
    return f"{output.removesuffix('.jsonl')}.{name}.{'json' if name == 'summary' else 'jsonl'}"


# ----------------------------------------------------------------------------
# Reading and checking the input. Every problem is one line naming file and line.


def read_input(path, method, dominant, limit):
    """{(id, lang): (where, record)}, in file order, checked for what `method` needs."""
    required = ("id", "lang", "prompt") + (() if method == "qalign" else ("responses",))
    records = {}
    for line_number, record in common.read_jsonl(path, required):
        where = f"{path}:{line_number}"
        common.language_name(record["lang"], where)
        key = (str(record["id"]), record["lang"])
        if key in records:
            raise common.InputError(f"{where}: id '{key[0]}' appears twice in language '{key[1]}'")
        responses = record.get("responses", [])
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise common.InputError(f"{where}: 'responses' must be a list of strings")
        truncated = record.setdefault("truncated", [False] * len(responses))
        if not isinstance(truncated, list) or len(truncated) != len(responses):
            raise common.InputError(f"{where}: 'truncated' must be a list as long as 'responses'")
        translations = record.get("translations", {})
        if not isinstance(translations, dict):
            raise common.InputError(f"{where}: 'translations' must be an object {{lang: [str or null, ...]}}")
        for lang, texts in translations.items():
            if not isinstance(texts, list) or len(texts) != len(responses) \
                    or not all(t is None or isinstance(t, str) for t in texts):
                raise common.InputError(f"{where}: translations['{lang}'] must be {len(responses)} strings "
                                        "or nulls, one per response")
        if not isinstance(record["prompt"], str):
            raise common.InputError(f"{where}: 'prompt' must be a string")
        records[key] = (where, record)
    records = dict(common.first_ids(list(records.items()), limit, id_of=lambda item: item[0][0]))
    if not any(lang == dominant for _, lang in records) and not (method == "qalign"):
        raise common.InputError(f"{path}: no '{dominant}' records; {method} needs the teacher's answers")
    return records


def check_parallel(records, path, dominant, needs_translations):
    """Every X record needs the dominant record of its id, and the reverse.

    needs_translations: "both" (the dominant record into every X; every X record has run through 02, whose
    --no-into-dominant leaves its translation into the dominant language out), "dominant" (only the first)
    or None.
    """
    languages = {lang for _, lang in records}
    for (record_id, lang), (where, record) in records.items():
        if lang == dominant:
            missing = [x for x in sorted(languages - {dominant}) if (record_id, x) not in records]
            if missing:
                raise common.InputError(f"{where}: id '{record_id}' is in '{dominant}' but not in "
                                        f"{', '.join(missing)} (every language needs the same ids)")
            if needs_translations:
                for x in sorted(languages - {dominant}):
                    if x not in record.get("translations", {}):
                        raise common.InputError(f"{where}: the '{dominant}' record has no translations into "
                                                f"'{x}' (run 02_translate.py on a file with both languages)")
        else:
            if (record_id, dominant) not in records:
                raise common.InputError(f"{where}: id '{record_id}' in '{lang}' has no '{dominant}' record "
                                        f"with the same id in {path}")
            if needs_translations == "both" and "translations" not in record:
                raise common.InputError(f"{where}: no translations (run 02_translate.py)")


def answer_is_right(text, answer):
    return common.same_number(common.extract_last_number(text),
                              common.parse_number(answer) if isinstance(answer, str) else answer)


# ----------------------------------------------------------------------------
# Methods. Each returns (rows, skipped) with skipped a list of (lang, reason).


def imbalance_rows(records, langs, dominant, keep_truncated, check_answer):
    rows, skipped = [], []
    for (record_id, lang), (_, native) in records.items():
        if lang == dominant:
            continue
        _, teacher = records[(record_id, dominant)]
        into_dominant = native["translations"].get(dominant)  # None: 02 ran with --no-into-dominant
        for i in range(min(len(native["responses"]), len(teacher["responses"]))):
            cut = not keep_truncated and (native["truncated"][i] or teacher["truncated"][i])
            # (prompt record, chosen, rejected, which side is a translation, its source language)
            candidates = [
                (native, teacher["translations"][lang][i], native["responses"][i], "chosen", dominant),
                (teacher, teacher["responses"][i], into_dominant and into_dominant[i], "rejected", lang)]
            for prompt_record, chosen, rejected, translated, source in candidates:
                pair_lang = prompt_record["lang"]
                if pair_lang not in langs:
                    continue
                reason = ("not_translated" if translated == "rejected" and into_dominant is None else
                          "truncated" if cut else
                          "null_translation" if chosen is None or rejected is None else
                          "identical" if chosen.strip() == rejected.strip() else
                          "wrong_answer" if check_answer and prompt_record.get("answer") is not None
                          and not answer_is_right(chosen, prompt_record["answer"]) else None)
                if reason:
                    skipped.append((pair_lang, reason))
                    continue
                rows.append({"id": record_id, "lang": pair_lang, "prompt": prompt_record["prompt"],
                             "chosen": chosen, "rejected": rejected, "method": "imbalance", "sample": i,
                             "translated": translated, "translated_from": source})
        unpaired = abs(len(native["responses"]) - len(teacher["responses"]))
        skipped += [(lang, "unpaired_sample")] * unpaired
    return rows, skipped


def crossin_rows(records, dominant, keep_truncated, mix, seed):
    """mix: {kind: share of the possible rows of that kind to keep}."""
    candidates, skipped = defaultdict(list), []
    for (record_id, lang), (_, native) in records.items():
        if lang == dominant:
            continue
        _, teacher = records[(record_id, dominant)]
        name = common.language_name(lang)
        answer_in_x, answer_in_en = (ANSWER_IN.format(language=language)
                                     for language in (name, common.language_name(dominant)))
        for i, answer in enumerate(teacher["responses"]):
            if teacher["truncated"][i] and not keep_truncated:
                skipped += [(lang, "truncated")] * 2
                continue
            translated = teacher["translations"][lang][i]
            if translated is None:
                skipped.append((lang, "null_translation"))
            else:
                candidates["answer_in_x"].append(
                    (record_id, lang, f"{teacher['prompt']}\n\n{answer_in_x}", translated, i))
            candidates["answer_in_en"].append(
                (record_id, lang, f"{native['prompt']}\n\n{answer_in_en}", answer, i))
        candidates["translate"].append(
            (record_id, lang, f"{TRANSLATE_INSTRUCTION.format(language=name)}\n\n{native['prompt']}",
             teacher["prompt"], None))
    rows = []
    generator = random.Random(seed)
    for kind in ("answer_in_x", "answer_in_en", "translate"):
        pool = candidates[kind]
        kept = set(generator.sample(range(len(pool)), round(mix[kind] * len(pool))))
        for index, (record_id, lang, prompt, completion, sample) in enumerate(pool):
            if index not in kept:
                skipped.append((lang, f"mix_{kind}"))
                continue
            rows.append({"id": record_id, "lang": lang, "prompt": prompt, "completion": completion,
                         "method": "crossin", "kind": kind, **({} if sample is None else {"sample": sample})})
    return rows, skipped


def qalign_rows(records, dominant, source, path):
    rows, skipped = [], []
    for (record_id, lang), (where, record) in records.items():
        if lang == dominant:
            continue
        gold = records.get((record_id, dominant))
        if gold is not None and source in ("auto", "gold"):
            english, origin = gold[1]["prompt"], "gold"
        elif source in ("auto", "prompt_en") and "prompt_en" in record:
            english, origin = record["prompt_en"], "prompt_en"
        else:
            gold_record = f"a '{dominant}' record with id '{record_id}'"
            wanted = {"gold": gold_record, "prompt_en": "a 'prompt_en' field",
                      "auto": f"{gold_record} or a 'prompt_en' field"}[source]
            raise common.InputError(f"{where}: no English question for qalign: needs {wanted} in {path}")
        reason = ("null_translation" if not isinstance(english, str) or not english.strip() else
                  "identical" if english.strip() == record["prompt"].strip() else None)
        if reason:
            skipped.append((lang, reason))
            continue
        header = common.QUESTION_TRANSLATION.format(language=common.language_name(lang))
        rows.append({"id": record_id, "lang": lang, "prompt": f"{header}\n\n{record['prompt']}",
                     "completion": english, "method": "qalign", "source": origin})
    return rows, skipped


# ----------------------------------------------------------------------------
# Implicit cross-lingual rewarding: scoring (the long, resumable part), then selection.


def scoring_prompt(records, key, dominant):
    """The English instruction of the same id, plus a line asking for the answer in the record's language."""
    record_id, lang = key
    english = records[(record_id, dominant)][1]["prompt"]
    if lang == dominant:
        return english
    return f"{english}\n\n{ANSWER_IN.format(language=common.language_name(lang))}"


def score_all(records, keys, args, rank, world_size):
    """{(id, lang): {"dpo_logps": [...], "ref_logps": [...], "tokens": [...]}} for every key.

    Every record's scores go to <output>.scores.jsonl as its batch ends, named by what was
    scored (both models, the prompt, the answers): a killed or repeated run scores only what
    is missing or has changed. Returns (scores on rank 0, tokens scored now).
    """
    path = sidecar(args.output, "scores")
    items = [{"id": key[0], "lang": key[1], "fingerprint": common.content_key(args.dpo_model, args.ref_model,
              scoring_prompt(records, key, args.dominant), records[key][1]["responses"])} for key in keys]
    key_of = lambda item: (item["id"], item["lang"], item["fingerprint"])  # noqa: E731
    _, mine = common.resume(path, items, key_of, rank, world_size)
    tokens_scored = 0
    if mine:
        scorers = load_scorers(args.dpo_model, args.ref_model, args.trust_remote_code)
        desc = f"score[rank {rank}]" if world_size > 1 else "score"
        progress = tqdm(total=len(mine), desc=desc, unit="record")
        for start in range(0, len(mine), args.batch_size):
            batch = mine[start:start + args.batch_size]
            answers = [records[(item["id"], item["lang"])][1]["responses"] for item in batch]
            prompts = [scoring_prompt(records, (item["id"], item["lang"]), args.dominant)
                       for item, texts in zip(batch, answers) for _ in texts]
            responses = [text for texts in answers for text in texts]
            (dpo_logps, tokens), (ref_logps, ref_tokens) = (common.score(
                common.use_adapter(model, adapter), tokenizer, prompts, responses, args.token_budget,
                show_progress=False) for model, tokenizer, adapter in scorers)
            if not (dpo_logps.isfinite().all() and ref_logps.isfinite().all()):
                raise RuntimeError(f"non-finite log-probs while scoring {batch}: check the models' weights")
            if not (tokens == ref_tokens).all():
                raise common.InputError("--dpo-model and --ref-model tokenise the answers differently; "
                                        "the implicit reward needs one tokenizer")
            per_record = zip(batch, *(values.split([len(texts) for texts in answers])
                                      for values in (dpo_logps, ref_logps, tokens)))
            common.save_batch(path, [{**item, "dpo_model": args.dpo_model, "ref_model": args.ref_model,
                                      "dpo_logps": dpo.tolist(), "ref_logps": ref.tolist(),
                                      "tokens": n.tolist()} for item, dpo, ref, n in per_record], rank)
            tokens_scored += 2 * int(tokens.sum())
            progress.update(len(batch))
        progress.close()
    common.finish(path, items, key_of, rank)  # one merged cache, kept for reruns
    if rank != 0:  # rank 0 alone makes the rows
        return {}, tokens_scored
    return {(record["id"], record["lang"]): record for record in common.read_finished(path)}, tokens_scored


def load_scorers(dpo_model, ref_model, trust_remote_code=False):
    """[(model, tokenizer, adapter folder)] for the two models, in fp32 on every device: the reward is a
    difference of two close models, which bf16 rounds away. Before each scores, common.use_adapter puts its
    adapter in.

    LoRA policies of one base (pi_k with pi_k-1, or with the base itself: adapter None) share ONE base in
    memory and take turns with their adapters (of one rank and targets, as a loop's are), so the two differ
    by their adapters exactly. Otherwise (plain models, other bases) each loads whole, its adapter in.
    """
    load = lambda name: common.load_model(name, None, torch.float32, trust_remote_code)  # noqa: E731
    names = (dpo_model, ref_model)
    adapters = [common.adapter_folder(name) for name in names]  # None: a plain model
    bases = {os.path.realpath(common.resolve_model(common.base_model(name))) for name in names}
    if any(adapters) and len(bases) == 1:  # one base, loaded once (with the first adapter's layers)
        model_and_tokenizer = load(names[0] if adapters[0] else names[1])
        return [(*model_and_tokenizer, adapter) for adapter in adapters]
    return [(*load(name), adapter) for name, adapter in zip(names, adapters)]


def alpha_grid(rewards, lengths, valid):
    """Candidate alphas: 0 and +-121 log-spaced values around the reward-per-character scale of the data."""
    masked_reward = np.where(valid, rewards, np.nan)
    masked_length = np.where(valid, lengths, np.nan)
    reward_spread = np.nanmedian(np.nanmax(masked_reward, 1) - np.nanmin(masked_reward, 1))
    length_spread = np.nanmedian(np.nanmax(masked_length, 1) - np.nanmin(masked_length, 1))
    scale = reward_spread / max(length_spread, 1.0)
    if not scale > 0:
        return np.zeros(1)
    steps = scale * np.geomspace(1e-3, 1e3, 121)
    return np.concatenate([-steps[::-1], [0.0], steps])


def choose_alpha(rewards, lengths, valid, grid):
    """The alpha of `grid` whose best-minus-worst mean length gap is closest to zero.

    rewards, lengths: [prompts, samples] arrays; valid: [prompts, samples] bool (padding
    and skipped samples are False). Returns (alpha, mean length gap at that alpha).
    Ties go to the smallest |alpha|: change the reward no more than needed.
    """
    grid = np.asarray(grid, dtype=float)
    gaps = []
    block = max(1, 4_000_000 // max(rewards.size, 1))  # alphas per step: bounded memory
    for start in range(0, len(grid), block):
        alphas = grid[start:start + block, None, None]
        adjusted = rewards[None] - alphas * lengths[None]  # [alphas, prompts, samples]
        best = np.where(valid[None], adjusted, -np.inf).argmax(axis=2)
        worst = np.where(valid[None], adjusted, np.inf).argmin(axis=2)
        chosen_length = np.take_along_axis(lengths[None], best[..., None], axis=2)[..., 0]
        rejected_length = np.take_along_axis(lengths[None], worst[..., None], axis=2)[..., 0]
        gaps.append((chosen_length - rejected_length).mean(axis=1))
    gaps = np.concatenate(gaps)
    pick = np.lexsort((np.abs(grid), np.abs(gaps)))[0]
    return float(grid[pick]), float(gaps[pick])


def search_alpha(rewards, lengths, valid):
    """choose_alpha on the coarse log grid, then on 201 even steps between the winner's neighbours.

    The gap can fall steeply with alpha (many prompts flip at once), so a coarse grid
    alone may step over the zero crossing.
    """
    grid = alpha_grid(rewards, lengths, valid)
    alpha, gap = choose_alpha(rewards, lengths, valid, grid)
    where = int(np.searchsorted(grid, alpha))
    fine = np.linspace(grid[max(where - 1, 0)], grid[min(where + 1, len(grid) - 1)], 201)
    return choose_alpha(rewards, lengths, valid, np.concatenate([[alpha], fine]))


def implicit_rows(records, keys, scores, args):
    """Best-vs-worst pairs per prompt, with per-language length control."""
    rows, skipped, alphas = [], [], {}
    by_lang = {lang: [key for key in keys if key[1] == lang] for lang in {key[1] for key in keys}}
    for lang in sorted(by_lang, key=lambda code: list(common.LANGUAGES).index(code)):
        usable = []  # (key, sample indices, rewards)
        for key in by_lang[lang]:
            record, saved = records[key][1], scores[key]
            samples = [i for i, cut in enumerate(record["truncated"]) if args.keep_truncated or not cut]
            skipped += [(lang, "truncated_sample")] * (len(record["responses"]) - len(samples))
            rewards = [args.beta * (saved["dpo_logps"][i] - saved["ref_logps"][i]) for i in samples]
            if len(samples) < 2:
                skipped.append((lang, "fewer_than_2_samples"))
            elif max(rewards) - min(rewards) <= TIE:
                skipped.append((lang, "all_equal"))
            else:
                usable.append((key, samples, rewards))
        if not usable:
            continue
        width = max(len(samples) for _, samples, _ in usable)
        rewards, lengths = np.zeros((2, len(usable), width))
        valid = np.zeros((len(usable), width), dtype=bool)
        for row, (key, samples, reward) in enumerate(usable):
            rewards[row, :len(samples)] = reward
            lengths[row, :len(samples)] = [len(records[key][1]["responses"][i]) for i in samples]
            valid[row, :len(samples)] = True
        if args.alpha is None:
            alpha, gap = search_alpha(rewards, lengths, valid)
        else:
            alpha, gap = choose_alpha(rewards, lengths, valid, [args.alpha])
        _, gap_before = choose_alpha(rewards, lengths, valid, [0.0])
        alphas[lang] = {"alpha": alpha, "length_gap": gap, "length_gap_without_control": gap_before}
        adjusted = np.where(valid, rewards - alpha * lengths, np.nan)
        for row, (key, samples, reward) in enumerate(usable):
            best, worst = int(np.nanargmax(adjusted[row])), int(np.nanargmin(adjusted[row]))
            responses = records[key][1]["responses"]
            chosen, rejected = responses[samples[best]], responses[samples[worst]]
            margin = adjusted[row, best] - adjusted[row, worst]
            reason = ("all_equal" if margin <= TIE else "near_tie" if margin < args.min_margin else
                      "identical" if chosen.strip() == rejected.strip() else None)
            if reason:
                skipped.append((lang, reason))
                continue
            rows.append({"id": key[0], "lang": lang, "prompt": records[key][1]["prompt"], "chosen": chosen,
                         "rejected": rejected, "method": "implicit",
                         "chosen_reward": reward[best], "rejected_reward": reward[worst],
                         "chosen_score": float(adjusted[row, best]),
                         "rejected_score": float(adjusted[row, worst]),
                         "alpha": alpha, "beta": args.beta, "chosen_sample": samples[best],
                         "rejected_sample": samples[worst],
                         # None: not a candidate
                         "rewards": [reward[samples.index(i)] if i in samples else None
                                     for i in range(len(responses))]})
    return rows, skipped, alphas


# ----------------------------------------------------------------------------


def summarise(rows, skipped):
    """{lang: {"made": n, "skipped": {reason: n}}} and the table printed at the end."""
    made, reasons = Counter(row["lang"] for row in rows), defaultdict(Counter)
    for lang, reason in skipped:
        reasons[lang][reason] += 1
    languages = sorted(set(made) | set(reasons), key=lambda code: list(common.LANGUAGES).index(code))
    summary = {lang: {"made": made[lang], "skipped": dict(reasons[lang])} for lang in languages}
    why = {lang: ", ".join(f"{r} {n}" for r, n in sorted(reasons[lang].items())) for lang in languages}
    lines = [f"  {lang:4} made {made[lang]:6}  skipped {sum(reasons[lang].values()):6}"
             + (f"  ({why[lang]})" if why[lang] else "") for lang in languages]
    return summary, "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    records = read_input(args.input, args.method, args.dominant, args.limit)
    langs = args.langs.split(",") if args.langs else sorted({lang for _, lang in records})
    for code in langs:
        common.language_name(code, "--langs")
    records = {key: value for key, value in records.items() if key[1] in langs or key[1] == args.dominant}
    if args.method != "qalign":
        needs = {"imbalance": "both", "crossin": "dominant", "implicit": None}[args.method]
        check_parallel(records, args.input, args.dominant, needs)
    if args.method == "implicit" and max(len(record["responses"]) for _, record in records.values()) < 2:
        raise common.InputError(f"{args.input}: one answer per prompt; implicit rewarding picks the best and "
                                "worst of N (run 01_generate.py with --num-samples 4 --temperature 0.9)")
    rank, world_size = common.setup_distributed()
    settings = {name: value for name, value in vars(args).items()
                if name not in ("input", "output", "batch_size", "token_budget", "trust_remote_code")}
    settings["input"] = common.content_key([record for _, record in records.values()])
    if common.claim(args.output, settings, rank, files={"input": args.input}):
        return
    tokens, alphas = None, None
    if args.method == "implicit":
        keys = [key for key in records if key[1] in langs]
        scores, tokens = score_all(records, keys, args, rank, world_size)
        if rank == 0:
            rows, skipped, alphas = implicit_rows(records, keys, scores, args)
    elif args.method == "imbalance":
        rows, skipped = imbalance_rows(records, langs, args.dominant, args.keep_truncated, args.check_answer)
    elif args.method == "crossin":
        mix = {kind: getattr(args, f"mix_{kind}") for kind in ("answer_in_x", "answer_in_en", "translate")}
        rows, skipped = crossin_rows(records, args.dominant, args.keep_truncated, mix, args.seed)
    else:
        rows, skipped = qalign_rows(records, args.dominant, args.qalign_source, args.input)
    if rank != 0:  # rank 0 alone writes
        common.cleanup_distributed()
        return
    summary, table = summarise(rows, skipped)
    rows = [common.conversational(row) for row in rows] if args.conversational else rows
    train, held_out = common.split_by_id(rows, args.eval_frac, args.seed)
    common.write_json(sidecar(args.output, "summary"), {
        "method": args.method, "input": args.input, "rows": len(train), "eval_rows": len(held_out),
        "per_language": summary, **({"length_control": alphas} if alphas is not None else {})})
    if args.eval_frac > 0:
        common.write_jsonl(sidecar(args.output, "eval"), held_out)
    common.write_jsonl(args.output, train)  # last: its existence means the stage is complete
    print(f"03_reward ({args.method}) rows made and skipped per language:\n{table}")
    for lang, control in (alphas or {}).items():
        print(f"  {lang:4} alpha {control['alpha']:.3g}: mean chosen-rejected length "
              f"{control['length_gap']:+.1f} characters (without length control "
              f"{control['length_gap_without_control']:+.1f})")
    if not rows:
        print("warning: no rows were made; see the skip reasons above")
    seconds = time.perf_counter() - started
    print(common.summary_line("03_reward", seconds, tokens, method=args.method, rows=len(train),
                              eval_rows=len(held_out), skipped=len(skipped)) + f" -> {args.output}")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
