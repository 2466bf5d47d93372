"""01_generate.py: sample the policy's answers to the same prompts in every language.

In:  prompts, as a directory of {lang}.jsonl files (default: the bundled data/alpagasus, training
     prompts; 05 evaluates on data/x-alpacaeval, which no stage trains on),
     a JSONL file with "lang" + "prompt", an MGSM-style TSV, or a Hugging Face dataset.
Out: responses.jsonl, one record per (id, language): the prompt's fields plus
     "responses" (N samples), "truncated" (per sample: hit --max-new-tokens),
     "model" and "sampling" (the settings used).

    python 01_generate.py --langs en,es,de --limit 10 --max-new-tokens 128

The defaults are the language-imbalance paper's: one greedy sample, repetition
penalty 1.1. For implicit cross-lingual rewarding sample several, e.g.
--num-samples 10 --temperature 0.9. Under `torchrun --nproc_per_node=K` the prompts
are split across ranks and rank 0 merges the output. A killed run, rerun with the
same command, continues where it stopped. At scale, --server sends the same prompts (rendered
here with --model's tokenizer) to an OpenAI-compatible serving engine instead:

    vllm serve <model dir> --port 8000 &
    python 01_generate.py --model <model dir> --server http://127.0.0.1:8000/v1 \
        --num-samples 10 --temperature 0.9
"""
import argparse
import time

import torch

import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--prompts", default="data/alpagasus",
        help="prompt file, directory of {lang}.jsonl, TSV, or hub dataset name[:config]")
    add("--output", default="runs/loop/iter1/responses.jsonl",
        help="where to write the responses (default: iteration 1 of loop.sh)")
    add("--model", default=common.EMBEDDED_MODEL,
        help=f"hub id, local directory, or the embedded default, {common.EMBEDDED_MODEL}")
    add("--langs", default=None, help="comma-separated language codes to keep (default: all found)")
    add("--limit", type=int, default=None, help="keep the first N prompt ids (same ids in every language)")
    add("--num-samples", type=int, default=1, help="answers per prompt (N)")
    add("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    add("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    add("--repetition-penalty", type=float, default=1.1, help="1.0 turns it off")
    add("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    add("--batch-size", type=int, default=32,
        help="prompts decoded at once (times --num-samples rows); a finished one's rows go to the next")
    add("--seed", type=int, default=0, help="random seed for sampling")
    add("--split", default="train", help="split to use when --prompts is a hub dataset")
    common.add_server_flags(parser)
    add("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    args = parser.parse_args(argv)
    counts = (args.num_samples, args.max_new_tokens, args.batch_size, 1 if args.limit is None else args.limit)
    common.refuse({
        "--num-samples, --max-new-tokens, --batch-size and --limit must be at least 1": min(counts) < 1,
        "--temperature must be >= 0, --top-p in (0, 1], --repetition-penalty > 0":
            not (args.temperature >= 0 and 0 < args.top_p <= 1 and args.repetition_penalty > 0),
        "--num-samples > 1 with greedy decoding gives N identical answers; set --temperature":
            args.num_samples > 1 and args.temperature == 0})
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world_size = common.setup_distributed()
    langs = args.langs.split(",") if args.langs else None
    prompts = common.load_prompts(args.prompts, langs=langs, limit=args.limit, split=args.split)
    if not prompts:
        raise common.InputError(f"{args.prompts}: no prompts")
    sampling = {name: getattr(args, name) for name in ("temperature", "top_p", "repetition_penalty",
                                                       "max_new_tokens", "num_samples", "seed")}
    settings = {"model": args.model, "langs": args.langs, "limit": args.limit, "split": args.split,
                **sampling, "prompts": common.content_key(prompts)}
    # The model loads and the servers serve it: checked before anything is written.
    load_engine = common.check_engine(args.model, args.server, args.server_model, args.server_concurrency,
                                      args.trust_remote_code)
    if common.claim(args.output, settings, rank, files={"prompts": args.prompts}):
        return
    engine, tokenizer, context = load_engine()
    counts = {"new_tokens": 0, "truncated": 0}
    started = time.perf_counter()
    # A prompt that leaves no room for the answer in the model's context is skipped (and counted), never run.
    texts = {(p["id"], p["lang"]): common.chat_prompt_text(tokenizer, p["prompt"]) for p in prompts}
    lengths = {key: len(common.prompt_ids(tokenizer, text)) for key, text in texts.items()}
    too_long = [p for p in prompts if lengths[p["id"], p["lang"]] + args.max_new_tokens > context]
    if too_long and rank == 0:
        print(f"skipped {len(too_long)} prompt(s) longer than the model's {context}-token context minus "
              f"--max-new-tokens (first: id {too_long[0]['id']}, {too_long[0]['lang']})")
    prompts = [p for p in prompts if lengths[p["id"], p["lang"]] + args.max_new_tokens <= context]

    key = lambda record: (record["id"], record["lang"])  # noqa: E731
    already_done, mine = common.resume(args.output, prompts, key, rank, world_size)
    batches = common.generate(
        engine, tokenizer, [texts[key(p)] for p in mine], num_samples=args.num_samples,
        temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        desc=f"generate[rank {rank}]" if world_size > 1 else "generate", seed=args.seed)
    for batch in batches:  # each batch goes to disk as soon as it is done
        records = []
        for index, samples in batch:
            counts["new_tokens"] += sum(s["new_tokens"] for s in samples)
            counts["truncated"] += sum(s["truncated"] for s in samples)
            records.append({**mine[index], "responses": [s["text"] for s in samples],
                            "truncated": [s["truncated"] for s in samples], "model": args.model,
                            "sampling": sampling, "engine": common.engine_name(engine)})
        common.save_batch(args.output, records, rank)
    common.finish(args.output, prompts, key, rank)
    languages = sorted({p["lang"] for p in prompts})
    print(common.summary_line(
        f"01_generate[rank {rank}]" if world_size > 1 else "01_generate", time.perf_counter() - started,
        counts["new_tokens"], prompts=len(prompts), languages=",".join(languages), resumed_from=already_done,
        generated=len(mine), samples_truncated=counts["truncated"], skipped_too_long=len(too_long),
        engine=common.engine_name(engine))
        + (f" -> {args.output}" if rank == 0 else ""))
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)
