#!/usr/bin/env python3
"""procpool beside Python's multiprocessing.Pool, concurrent.futures.ProcessPoolExecutor
and a raw fork-and-pipes reference (no serialization), on the workloads of issue 5.

Everything is measured in one run, interleaved in rounds (in each round every
implementation runs every workload, in a shuffled order, close in time to the
others), so that drift on a shared machine falls on all of them alike; the
table shows medians over the rounds and the ratios between them.

usage: python3 benchmarks/compare.py [--build BUILD_DIR] [--suite SUITE] [--rounds N] [--quick] [-v]

suites: all (the default; ~7-10 minutes on a 2-core machine), tasks (1-3),
payloads (4-5, with 5b), cpu (6), lifecycle (7-8), memory (9-10), start (the
older start-method table, procpool against Python only), or mpi (procpool on MPI
ranks against mpi4py.futures; compare_mpi.py says how). --workloads 1,4,7 picks
workloads by number instead (5 brings 5b). --quick shrinks every size for a run
of about a minute (CI): its figures are rougher.

Build first: cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2
"""
import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# procpool's start method -> Python's name for the same idea.
METHODS = [("fork", "fork"), ("posix_spawn", "spawn"), ("forkserver", "forkserver")]
PY_METHOD = dict(METHODS)

COLUMNS = ["procpool", "python", "ppe", "raw"]

SUITES = {
    "all": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    "tasks": [1, 2, 3],
    "payloads": [4, 5],
    "cpu": [6],
    "lifecycle": [7, 8],
    "memory": [9, 10],
}

VERBOSE = False


def log(msg):
    if VERBOSE:
        print(msg, file=sys.stderr, flush=True)


def run_json(cmd, timeout=1200):
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"  {time.perf_counter() - start:6.2f}s  {' '.join(os.path.basename(c) for c in cmd[:3])} "
        f"{' '.join(cmd[3:])} -> {result.get('value', '')}")
    return result


# ---- the start suite (kept as it was: procpool against Python's Pool) --------

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


# ---- the issue-5 table ------------------------------------------------------

class Cell:
    """One measurement: a command printing JSON, and the field to read."""

    def __init__(self, cmd, field="value", note=""):
        self.cmd = [str(c) for c in cmd]
        self.field = field
        self.note = note  # shown in the cell, e.g. what PPE ran instead


class Row:
    def __init__(self, number, label, unit, cells, target="", check=None, lower_better=False, once=False,
                 extra=None):
        self.number = number
        self.label = label
        self.unit = unit
        self.cells = cells  # column -> Cell
        self.target = target
        self.check = check  # (figures) -> (met: bool, how: str) or None
        self.lower_better = lower_better
        self.once = once  # deterministic figure (memory): measured in the first round only
        self.extra = extra  # (samples of the procpool column) -> text appended to its cell


def fmt_value(value, unit):
    if value is None:
        return "—"
    if unit in ("tasks/s", "workers/s"):
        return f"{value:,.0f}/s"
    if unit == "items/s":
        return f"{value / 1e6:,.2f} M/s"
    if unit == "MiB/s":
        return f"{value:,.0f} MiB/s"
    if unit == "%":
        return f"{value:.1f} %"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "MiB":
        return f"{value:.2f} MiB" if value < 100 else f"{value:,.0f} MiB"
    return f"{value:.3g} {unit}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r):
    if r is None:
        return "—"
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x"


def need(minimum, against):
    """A check: ratio procpool/`against` must be at least `minimum`."""

    def check(fig):
        r = ratio(fig.get("procpool"), fig.get(against))
        if r is None:
            return None
        name = "Python" if against == "python" else against
        return r >= minimum, "met" if r >= minimum else f"{fmt_ratio(r)} of {name}, not {fmt_ratio(minimum)}"

    return check


def both(*checks):
    def check(fig):
        results = [c(fig) for c in checks]
        if any(r is None for r in results):
            return None
        misses = [how for ok, how in results if not ok]
        return not misses, "; ".join(misses) if misses else "met"

    return check


def build_rows(args):
    b = os.path.join(args.build, "benchmarks")
    pp = os.path.join(b, "procpool_bench_workloads")
    raw = os.path.join(b, "procpool_bench_raw")
    start = os.path.join(b, "procpool_bench_start")
    py = [sys.executable, os.path.join(HERE, "py_workloads.py")]
    py_start = [sys.executable, os.path.join(HERE, "py_start_methods.py")]
    q = args.quick
    n1 = 5000 if q else 20000
    n2 = 200_000 if q else 1_000_000
    n4, n5 = (64, 2) if q else (256, 4)
    ncpu, mscpu = (10, 10) if q else (40, 20)
    n_ppe = 2000 if q else 10000  # PPE manages ~5,000 tasks/s: fewer tasks, the same rate
    args.n_ppe = n_ppe
    start_repeats, start_recycle = ("3", "300") if q else ("10", "2000")
    py_repeats = "2" if q else "5"
    py_recycle = {"fork": 60, "spawn": 8, "forkserver": 20} if q else {"fork": 400, "spawn": 60, "forkserver": 150}
    ppe_recycle = 6 if q else 40
    raw_echo = Cell([raw, "echo", f"n={5 * n1}", "inflight=8"])
    rows = []
    want = set(args.workloads)

    def add(row):
        if row.number in want:
            rows.append(row)

    target_1 = ">= 10x Python, >= 70% of raw"
    check_1 = both(need(10, "python"), need(0.70, "raw"))
    for ours, theirs in METHODS:
        add(Row(1, f"(1) map, chunksize 1, {n1:,} ints [{ours}]", "tasks/s", {
            "procpool": Cell([pp, "map1", f"method={ours}", f"n={n1}"]),
            "python": Cell(py + ["pool", "map1", f"n={n1}"]),
            "ppe": Cell(py + ["ppe", "map1", f"n={n_ppe}"], note="ᵈ"),
            "raw": raw_echo,
        }, target_1, check_1))
    add(Row(2, f"(2) map, default chunking, {n2:,} ints", "items/s", {
        "procpool": Cell([pp, "mapdefault", f"n={n2}"]),
        "python": Cell(py + ["pool", "mapdefault", f"n={n2}"]),
        "ppe": Cell(py + ["ppe", "mapdefault", f"n={n2}"], note="ᵃ"),
        "raw": Cell([raw, "chunked", f"n={n2}"]),
    }, ">= 3x Python", need(3, "python")))
    add(Row(3, f"(3) imap_unordered, chunksize 1, {n1:,} ints", "tasks/s", {
        "procpool": Cell([pp, "imapu1", f"n={n1}"]),
        "python": Cell(py + ["pool", "imapu1", f"n={n1}"]),
        "ppe": Cell(py + ["ppe", "imapu1", f"n={n_ppe}"], note="ᵇᵈ"),
        "raw": raw_echo,
    }, target_1, check_1))
    add(Row(4, f"(4) 1 MiB buffers echoed, {n4} tasks", "MiB/s", {
        "procpool": Cell([pp, "bytes", f"size={1 << 20}", f"n={n4}"]),
        "python": Cell(py + ["pool", "bytes", f"size={1 << 20}", f"n={n4}"]),
        "ppe": Cell(py + ["ppe", "bytes", f"size={1 << 20}", f"n={n4}"]),
        "raw": Cell([raw, "bytes", f"size={1 << 20}", f"n={n4}"]),
    }, ">= 90% of raw", need(0.90, "raw")))
    raw_64 = [raw, "bytes", f"size={64 << 20}", f"n={n5}"]
    add(Row(5, f"(5) 64 MiB buffers echoed, {n5} tasks", "MiB/s", {
        "procpool": Cell([pp, "bytes", f"size={64 << 20}", f"n={n5}"]),
        "python": Cell(py + ["pool", "bytes", f"size={64 << 20}", f"n={n5}"]),
        "ppe": Cell(py + ["ppe", "bytes", f"size={64 << 20}", f"n={n5}"]),
        "raw": Cell(raw_64),
    }, ">= 2x raw", need(2, "raw")))
    # 5b: workload 5 through shared memory, in 5's group (run with it, interleaved); its raw cell is
    # (5)'s own run (one run per command and round serves both), the pipe bandwidth it is set against.
    add(Row(5, f"(5b) 64 MiB SharedMemory, worker writes every byte, {n5} tasks", "MiB/s", {
        "procpool": Cell([pp, "shared", f"size={64 << 20}", f"n={n5}"]),
        "python": Cell(py + ["pool", "shared", f"size={64 << 20}", f"n={n5}"]),
        "raw": Cell(raw_64, note="ᵉ"),
    }, "report ((5)'s is >= 2x raw)"))

    def efficiency(fig):
        v = fig.get("procpool")
        return None if v is None else (v >= 95, "met" if v >= 95 else f"{v:.1f} % < 95 %")

    add(Row(6, f"(6) CPU-bound, {ncpu} tasks of ~{mscpu} ms: parallel efficiency", "%", {
        "procpool": Cell([pp, "cpu", f"n={ncpu}", f"ms={mscpu}"]),
        "python": Cell(py + ["pool", "cpu", f"n={ncpu}", f"ms={mscpu}"]),
        "ppe": Cell(py + ["ppe", "cpu", f"n={ncpu}", f"ms={mscpu}"]),
        "raw": Cell([raw, "cpu", f"n={ncpu}", f"ms={mscpu}"]),
    }, ">= 95 %", efficiency))
    for ours, theirs in METHODS:
        cells = {
            "procpool": Cell([start, ours, start_repeats, start_recycle], "startup_ms"),
            "python": Cell(py_start + [theirs, py_repeats, py_recycle[theirs]], "startup_ms"),
            "ppe": Cell(py + ["ppe", "startup", f"method={theirs}", f"repeats={py_repeats}"]),
        }
        if ours == "fork":
            cells["raw"] = Cell([raw, "startup", f"repeats={start_repeats}"])
        add(Row(7, f"(7) start to first result, 2 workers [{ours} / Py {theirs}] (lower is better)", "ms",
                cells, "report (start-method issue)", lower_better=True))
    for ours, theirs in METHODS:
        cells = {
            "procpool": Cell([start, ours, start_repeats, start_recycle], "recycle_per_s"),
            "python": Cell(py_start + [theirs, py_repeats, py_recycle[theirs]], "recycle_per_s"),
        }
        if theirs != "fork":  # ProcessPoolExecutor refuses max_tasks_per_child with fork
            cells["ppe"] = Cell(py + ["ppe", "recycle", f"method={theirs}", f"n={ppe_recycle}"])
        if ours == "fork":
            cells["raw"] = Cell([raw, "recycle", f"n={start_recycle}"])
        add(Row(8, f"(8) maxtasksperchild=1 [{ours} / Py {theirs}]", "workers/s", cells,
                "report (start-method issue)"))

    def small_worker(fig):
        v = fig.get("procpool")
        return None if v is None else (v < 4, "met" if v < 4 else f"{v:.2f} MiB >= 4 MiB")

    def rss_pss(samples):
        rss = statistics.median(s["rss_mib"] for s in samples)
        pss = statistics.median(s["pss_mib"] for s in samples)
        text = f" (Pss {pss:.2f}, Rss {rss:.1f})"
        if "server_private_mib" in samples[0]:
            srv = statistics.median(s["server_private_mib"] for s in samples)
            spss = statistics.median(s["server_pss_mib"] for s in samples)
            text += f"; fork server {srv:.2f} (Pss {spss:.2f})"
        return text

    for ours, theirs in METHODS:
        cells = {
            "procpool": Cell([pp, "idle_mem", f"method={ours}"]),
            "python": Cell(py + ["pool", "idle_mem", f"method={theirs}"]),
            "ppe": Cell(py + ["ppe", "idle_mem", f"method={theirs}"]),
        }
        if ours == "fork":
            cells["raw"] = Cell([raw, "idle_mem"])
        add(Row(9, f"(9) idle worker, private MiB [{ours} / Py {theirs}] (lower is better)", "MiB", cells,
                "< 4 MiB beyond shared pages", small_worker, lower_better=True, once=False, extra=rss_pss))

    peak_rows = []
    for n in args.peak_items:
        cells = {
            "procpool": Cell([pp, "peak_mem", f"n={n}"]),
            "python": Cell(py + ["pool", "peak_mem", f"n={n}"]),
            "raw": Cell([raw, "peak_mem", f"n={n}"]),
        }
        if n <= args.ppe_peak_max:
            cells["ppe"] = Cell(py + ["ppe", "peak_mem", f"n={n}"], note="ᶜ")
        row = Row(10, f"(10) parent peak RSS, {n:,.0f} imap_unordered items (lower is better)", "MiB", cells,
                  "flat in the number of items", lower_better=True, once=True)
        row.items = n
        peak_rows.append(row)
        add(row)
    if len(peak_rows) > 1:
        first = peak_rows[0]

        def flat(fig, first=first):
            lo, hi = first.figures.get("procpool"), fig.get("procpool")
            if lo is None or hi is None:
                return None
            growth = hi - lo
            ok = growth <= max(1.0, 0.05 * lo)
            return ok, f"{growth:+.2f} MiB from {first.items:,} items"

        for row in peak_rows[1:]:
            row.check = flat
    return rows


def run_table(args):
    rows = build_rows(args)
    rng = random.Random(args.seed)
    samples = {}  # (row index, column) -> list of JSON results
    load_before = os.getloadavg()
    started = time.perf_counter()
    for rnd in range(args.rounds):
        cache = {}  # one run of a command serves every cell that names it, within a round
        log(f"round {rnd + 1}/{args.rounds}")
        # Group by workload number so that every implementation runs a workload
        # close in time to the others; shuffle the order within the group.
        groups = {}
        for i, row in enumerate(rows):
            if row.once and rnd > 0:
                continue
            for col, cell in row.cells.items():
                groups.setdefault(row.number, []).append((i, col, cell))
        order = list(groups)
        for number in order:
            jobs = groups[number]
            rng.shuffle(jobs)
            for i, col, cell in jobs:
                key = tuple(cell.cmd)
                if key not in cache:
                    try:
                        cache[key] = run_json(cell.cmd)
                    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                        print(f"warning: {e}", file=sys.stderr)
                        cache[key] = None
                if cache[key] is not None:
                    samples.setdefault((i, col), []).append(cache[key])
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"row": rows[i].label, "column": col, "samples": got}
                       for (i, col), got in sorted(samples.items())], f, indent=1)

    print(f"procpool vs Python {platform.python_version()} multiprocessing.Pool, ProcessPoolExecutor "
          f"and raw fork+pipes; 2 worker processes; {platform.node()}, {os.cpu_count()} CPUs, "
          f"{platform.platform()}. {args.rounds} interleaved round(s), medians"
          f"{' (--quick sizes)' if args.quick else ''}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; {elapsed:.0f} s.\n")
    print("| workload | procpool | Python Pool | ProcessPoolExecutor | raw pipes | procpool / Python "
          "| procpool / raw | target | met? |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, row in enumerate(rows):
        fig = {}
        texts = {}
        for col in COLUMNS:
            cell = row.cells.get(col)
            got = samples.get((i, col))
            if cell is None or not got:
                texts[col] = "—"
                continue
            fig[col] = statistics.median(s[cell.field] for s in got)
            texts[col] = fmt_value(fig[col], row.unit) + cell.note
            if col == "procpool" and row.extra:
                texts[col] += row.extra(got)
        row.figures = fig
        verdict = row.check(fig) if row.check else None
        if verdict is None:
            met = "—"
        elif verdict[0]:
            met = "yes" if verdict[1] == "met" else f"yes ({verdict[1]})"
        else:
            met = f"**no** ({verdict[1]})"
        print(f"| {row.label} | {texts['procpool']} | {texts['python']} | {texts['ppe']} | {texts['raw']} "
              f"| {fmt_ratio(ratio(fig.get('procpool'), fig.get('python')))} "
              f"| {fmt_ratio(ratio(fig.get('procpool'), fig.get('raw')))} | {row.target} | {met} |")
    print()
    print("Procpool uses the forkserver start method (its default) unless the row names another; Python's Pool "
          "and ProcessPoolExecutor use fork (Linux's default in 3.11) unless named. Raw pipes: plain fork(), one "
          "pipe pair per worker, fixed-size binary messages, no serialization, up to 8 messages in flight per "
          "worker (procpool's default max_tasks_in_flight), one write per answer; for (6) one task in flight, "
          "as procpool sends long tasks one at a time. (4)/(5): each buffer is sent to a worker and the worker "
          "returns it whole (the raw workers too); MiB/s counts one direction. (5b): blocks of "
          "procpool::SharedMemory (Python: multiprocessing.shared_memory.SharedMemory), made and filled before the "
          "clock starts; each task gets a reference (Python: the name, which the worker attaches), adds 1 to every "
          "byte in place (Python: bytes.translate, at C speed) and returns the block (Python: the name); MiB/s = "
          "tasks x 64 MiB / time. (2) raw sends the same chunks (ceil(n / 8) ints) as binary arrays. (6): serial "
          "time in the parent / (pool time x 2), serial measured before and after the pool run; efficiency needs "
          "two idle cores. (9): private = Private_Clean + Private_Dirty of smaps_rollup, the memory a worker costs "
          "beyond pages it shares; Pss and Rss in parentheses. (10): VmHWM of the parent after the loop, the "
          "workers not counted.")
    print("ᵃ ProcessPoolExecutor.map's default chunksize is 1 (hours here); it gets Pool's default, "
          "ceil(n / (4 x 2)). ᵇ it has no imap_unordered: submit() each item, then as_completed(). "
          f"ᶜ its map() submits every item at once. ᵈ {args.n_ppe:,} tasks (it runs a few thousand a second); the rate "
          "is per task. ᵉ (5)'s raw pipes, the same run: 64 MiB echoed through pipes, the copying shared "
          "memory does without.")


def main():
    global VERBOSE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=os.path.join(HERE, "..", "build"), help="the CMake build directory")
    parser.add_argument("--suite", default="all", choices=sorted(SUITES) + ["start", "mpi"])
    parser.add_argument("--workloads", help="comma-separated workload numbers (1-10), instead of --suite")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: about a minute")
    parser.add_argument("--peak-items", default=None,
                        help="item counts for workload 10, comma-separated (default 1e5,1e6; add 1e7 for the "
                             "issue's figure: procpool then needs minutes, Python's Pool about ten)")
    parser.add_argument("--ppe-peak-max", type=float, default=1e5,
                        help="largest workload-10 count given to ProcessPoolExecutor (it runs ~4,000 items/s and "
                             "holds every future)")
    parser.add_argument("--seed", type=int, default=5, help="seed of the shuffled order within a round")
    parser.add_argument("--json", metavar="PATH", help="also write every sample (all rounds) to PATH as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every run on stderr")
    args = parser.parse_args()
    VERBOSE = args.verbose
    args.build = os.path.abspath(args.build)
    if args.suite == "start":
        start_suite(args.build, args.rounds)
        return
    if args.suite == "mpi":
        import compare_mpi
        compare_mpi.run(args, run_json, args.quick)
        return
    if args.quick and "--rounds" not in sys.argv:
        args.rounds = 1
    args.workloads = ([int(w) for w in args.workloads.split(",")] if args.workloads else SUITES[args.suite])
    if args.peak_items is None:
        args.peak_items = "1e4,5e4" if args.quick else "1e5,1e6"
    args.peak_items = [int(float(n)) for n in args.peak_items.split(",")]
    if args.quick:
        args.ppe_peak_max = min(args.ppe_peak_max, 1e4)
    run_table(args)


if __name__ == "__main__":
    main()
