"""Run every stage's benchmark and print one table.

    python bench/run_all.py            # the full benchmarks (2-core CPU: over half an hour)
    python bench/run_all.py --quick    # smaller inputs, for a first look

Each row: stage, what was measured, our figure, the baseline's, their ratio, peak memory.
Each bench/bench_*.py also runs on its own and documents its baseline.
"""
import argparse
import importlib.util
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ["bench_generate", "bench_translate", "bench_scorer", "bench_dpo", "bench_eval", "bench_serve"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def number(value):
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names, e.g. bench_dpo")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else BENCHMARKS
    rows = []
    for name in names:
        start = time.perf_counter()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += load(name).run(quick=args.quick)
        print(f"  {name} took {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    header = ["stage", "metric", "ours", "baseline", "ratio", "peak memory (MB)"]
    table = [[r["stage"], r["metric"], number(r["ours"]), number(r["baseline"]),
              f"{r['ratio']:.2f}x" if isinstance(r["ratio"], float) else str(r["ratio"]),
              str(r["peak_memory_mb"])] for r in rows]
    print(f"\ncommand: python bench/run_all.py{' --quick' if args.quick else ''}   "
          f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for line in table:
        print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main()
