"""The MPI section of the comparison runner (compare.py --suite mpi): procpool on MPI ranks
beside mpi4py.futures and beside procpool's own local forkserver pool.

Every cell is a run of its own: `mpirun -np 3 procpool_bench_mpi <workload>` (rank 0 runs the
pool, ranks 1 and 2 serve, 2 worker processes), `mpirun -np 3 /usr/bin/python3 -m
mpi4py.futures py_mpi_workloads.py <workload>` (2 worker ranks), and `procpool_bench_mpi
<workload> backend=local` (2 local worker processes). Each workload runs over shared memory
(Open MPI's default) and over TCP (`--mca btl self,tcp`). Cells run interleaved in rounds, in
a shuffled order; the table shows medians.
"""
import os
import random
import statistics

# What mpirun needs on a CI machine: root, 2 cores for 3 ranks, TCP on loopback.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_btl_tcp_if_include": "lo",
    "OMPI_MCA_oob_tcp_if_include": "lo",
}
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, which has python3-mpi4py

# workload, label, unit, target (procpool / mpi4py), target (procpool MPI / procpool local)
ROWS = [
    ("map1", "`map` of a trivial function, chunksize 1", "tasks/s", 20, 0.3),
    ("map1m", "`map` of 1,000,000 ints, default chunking", "items/s", 5, None),
    ("echo", "1 MiB buffers, echoed", "MiB/s", 2, None),
    ("idle", "CPU of an idle serving rank", "% of a core", None, None),
]


def run(args, run_json, quick):
    here = os.path.dirname(os.path.abspath(__file__))
    bench = os.path.join(args.build, "benchmarks", "procpool_bench_mpi")
    if not os.path.exists(bench):
        raise SystemExit(f"{bench} is missing: build with an MPI installed (apt-get install libopenmpi-dev)")
    os.environ.update(MPI_ENV)
    py = os.path.join(here, "py_mpi_workloads.py")
    sizes = {"map1": ["n=4000"], "map1m": ["n=200000"], "echo": ["n=32"], "idle": ["secs=1"]} if quick else {}
    cells = []
    for workload, *_ in ROWS:
        extra = sizes.get(workload, [])
        for net, flags in (("shm", []), ("tcp", ["--mca", "btl", "self,tcp"])):
            cells.append((workload, net, "procpool", ["mpirun", "-np", "3", *flags, bench, workload, *extra]))
            cells.append((workload, net, "mpi4py",
                          ["mpirun", "-np", "3", *flags, SYSTEM_PYTHON, "-m", "mpi4py.futures", py, workload, *extra]))
        if workload != "idle":
            cells.append((workload, "-", "local", [bench, workload, "backend=local", *extra]))
    samples = {}
    rng = random.Random(args.seed)
    for _ in range(args.rounds):
        order = list(cells)
        rng.shuffle(order)
        for workload, net, impl, cmd in order:
            samples.setdefault((workload, net, impl), []).append(run_json(cmd)["value"])
    med = {key: statistics.median(values) for key, values in samples.items()}

    print(f"procpool on MPI ranks: mpirun -np 3 (rank 0 + 2 serving ranks), 2 worker processes; "
          f"{args.rounds} interleaved rounds, medians.\n")
    print("| workload | over | procpool MPI | mpi4py.futures | procpool / mpi4py | target "
          "| procpool local forkserver | MPI / local |")
    print("|---|---|---|---|---|---|---|---|")
    for workload, label, unit, target, local_target in ROWS:
        for net in ("shm", "tcp"):
            ours, theirs = med[(workload, net, "procpool")], med[(workload, net, "mpi4py")]
            if workload == "idle":
                print(f"| {label} | {net} | {ours:.2f} {unit} | {theirs:.2f} {unit} | | under 2 % | | |")
                continue
            local = med.get((workload, "-", "local"))
            ratio = ours / theirs
            mark = "" if target is None else (" (met)" if ratio >= target else " (not met)")
            vs_local = f"{ours / local:.0%}" if local else ""
            if local_target is not None and local:
                vs_local += " (met)" if ours / local >= local_target else " (not met)"
            print(f"| {label} | {net} | {ours:,.0f} {unit} | {theirs:,.0f} {unit} | {ratio:.1f}x | "
                  f"{'' if target is None else f'{target}x'}{mark} | {local:,.0f} {unit} | {vs_local} |")
