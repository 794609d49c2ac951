#!/usr/bin/env python3
"""mpi4py.futures on the workloads of procpool_bench_mpi (mpi_workloads.cpp), one per run;
prints one JSON line. Run it with Debian's system Python, which has python3-mpi4py:

    mpirun -np 3 /usr/bin/python3 -m mpi4py.futures benchmarks/py_mpi_workloads.py <workload> [key=value...]

Rank 0 runs this script; ranks 1 and 2 are MPIPoolExecutor's workers.

  map1   map of a trivial function, chunksize 1    n=10000            -> tasks/s
  map1m  map of 1,000,000 items in 16 chunks         n=1000000          -> items/s
  echo   map of echo over 1 MiB bytes, chunksize 1  size=1048576 n=64  -> MiB/s (one direction)
  idle   CPU the worker ranks use while the executor waits, over secs=3 -> % of a core (the busiest)
"""
import json
import os
import sys
import time

from mpi4py.futures import MPIPoolExecutor


def identity(x):
    return x


def echo(b):
    return b


def my_pid(_):
    return os.getpid()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    workload = sys.argv[1]
    args = dict(a.split("=", 1) for a in sys.argv[2:])
    out = {"impl": "mpi4py", "workload": workload}
    with MPIPoolExecutor() as ex:
        assert list(ex.map(identity, range(200))) == list(range(200))  # warm-up
        if workload in ("map1", "map1m"):
            one = workload == "map1"
            n = int(float(args.get("n", 10000 if one else 1000000)))
            start = time.perf_counter()
            got = list(ex.map(identity, range(n), chunksize=1 if one else n // 16))
            s = time.perf_counter() - start
            assert got == list(range(n))
            out.update(n=n, seconds=s, value=n / s, unit="tasks/s" if one else "items/s")
        elif workload == "echo":
            size = int(args.get("size", 1 << 20))
            n = int(args.get("n", 64))
            buf = bytes(i * 7 % 256 for i in range(size))
            start = time.perf_counter()
            got = list(ex.map(echo, [buf] * n))
            s = time.perf_counter() - start
            assert all(g == buf for g in got)
            out.update(n=n, size=size, seconds=s, value=n * size / (1 << 20) / s, unit="MiB/s")
        elif workload == "idle":
            secs = float(args.get("secs", 3))
            pids = set(ex.map(my_pid, range(40)))
            time.sleep(0.3)
            before = {p: cpu_seconds(p) for p in pids}
            start = time.perf_counter()
            time.sleep(secs)
            wall = time.perf_counter() - start
            busiest = max((cpu_seconds(p) - before[p]) / wall for p in pids)
            out.update(ranks=len(pids), value=100 * busiest, unit="% of a core")
        else:
            sys.exit(f"unknown workload {workload}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
