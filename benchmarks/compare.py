#!/usr/bin/env python3
"""procpool beside Python's multiprocessing, measured in one run, interleaved
so that drift on a shared machine falls on both alike. Prints a Markdown table.

usage: python3 benchmarks/compare.py [--build BUILD_DIR] [--rounds N] [--suite start]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# procpool's start method -> Python's name for the same idea.
METHODS = [("fork", "fork"), ("posix_spawn", "spawn"), ("forkserver", "forkserver")]


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def start_suite(build, rounds):
    bench = os.path.join(build, "benchmarks", "procpool_bench_start")
    py = os.path.join(HERE, "py_start_methods.py")
    samples = {}
    for _ in range(rounds):
        for ours, theirs in METHODS:
            a = run_json([bench, ours, "10", "2000"])
            # Python's spawn recycles slowly; fewer tasks keep the run short.
            b = run_json([sys.executable, py, theirs, "5", "100" if theirs == "spawn" else "400"])
            samples.setdefault(ours, []).append((a, b))
    print(f"Start methods: 2 workers; {rounds} interleaved rounds, medians. "
          f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.\n")
    print("| start method | startup procpool | startup Python | Python / procpool "
          "| recycling procpool | recycling Python | procpool / Python |")
    print("|---|---|---|---|---|---|---|")
    for ours, theirs in METHODS:
        rows = samples[ours]
        sa = statistics.median(r[0]["startup_ms"] for r in rows)
        sb = statistics.median(r[1]["startup_ms"] for r in rows)
        ra = statistics.median(r[0]["recycle_per_s"] for r in rows)
        rb = statistics.median(r[1]["recycle_per_s"] for r in rows)
        print(f"| {ours} (Python: {theirs}) | {sa:.1f} ms | {sb:.1f} ms | {sb / sa:.1f}x "
              f"| {ra:,.0f} workers/s | {rb:,.0f} workers/s | {ra / rb:.1f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build", default=os.path.join(HERE, "..", "build"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--suite", default="start", choices=["start"])
    args = parser.parse_args()
    if args.suite == "start":
        start_suite(args.build, args.rounds)


if __name__ == "__main__":
    main()
