"""Issue 5's workloads through Python's multiprocessing.Pool ("pool") or
concurrent.futures.ProcessPoolExecutor ("ppe"), measured the way
procpool_bench_workloads measures procpool. Prints one JSON line.

usage: python3 py_workloads.py <pool|ppe> <workload> [method=fork] [processes=2] [key=value...]

  map1        map, chunksize 1                            n=20000       -> tasks/s
  mapdefault  map, Pool's default chunking                n=1000000     -> items/s
              (ppe: its default is chunksize 1, far too slow here; it gets
              Pool's default, ceil(n / (4 * processes)), instead)
  imapu1      imap_unordered, chunksize 1                 n=20000       -> tasks/s
              (ppe has none: submit() every item, then as_completed())
  bytes       map of echo over bytes objects, chunksize 1 size=1048576 n=256 -> MiB/s
              (each buffer is sent and returned whole; MiB/s counts one direction)
  shared      map of bump_shared over multiprocessing.shared_memory blocks, size=67108864 n=4 -> MiB/s
              chunksize 1: the worker attaches by name, adds 1 to every byte in
              place, closes and returns the name; MiB/s = n * size / time
  cpu         map of ~ms-long CPU-bound tasks, chunksize 1  n=40 ms=20  -> % parallel efficiency
  idle_mem    memory of each idle worker (smaps_rollup)                 -> MiB beyond shared pages
  peak_mem    peak RSS (VmHWM) after n imap_unordered items n=100000 chunksize=1 -> MiB
              (ppe: map(), which submits everything at once)
  startup     pool creation to the first result, median   repeats=5     -> ms
  recycle     maxtasksperchild=1 (ppe: max_tasks_per_child=1)  n=200    -> workers/s

Every timed workload except startup and recycle runs on a pool that already
answered a warm-up map.
"""
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing import resource_tracker, shared_memory

MIB = 1024 * 1024
BUMP = bytes((b + 1) % 256 for b in range(256))  # translate() table: b -> b + 1, mod 256


def identity(x):
    return x


def echo(b):
    return b


def bump_shared(name):
    shm = shared_memory.SharedMemory(name=name)
    shm.buf[:] = bytes(shm.buf).translate(BUMP)  # every byte + 1, at C speed
    shm.close()
    return name


def spin(iterations):
    x = 88172645463325252 + iterations
    for _ in range(iterations):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
    return x


def pids(_):
    return os.getpid(), os.getppid()


def calibrate_spin(ms):
    probe = 200_000
    best = min(_timed(spin, probe) for _ in range(3))
    return max(1, int(probe * (ms / 1000.0) / best))


def _timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def proc_field_kb(path, field):
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def process_memory(pid):
    path = f"/proc/{pid}/smaps_rollup"
    private = proc_field_kb(path, "Private_Clean") + proc_field_kb(path, "Private_Dirty")
    return {"rss": proc_field_kb(path, "Rss") / 1024, "pss": proc_field_kb(path, "Pss") / 1024,
            "private": private / 1024}


def peak_rss_mib():
    return proc_field_kb("/proc/self/status", "VmHWM") / 1024


class Impl:
    """The same calls on a Pool or a ProcessPoolExecutor."""

    def __init__(self, kind, ctx, processes, **kw):
        self.kind = kind
        if kind == "pool":
            self.pool = ctx.Pool(processes, **kw)
        else:
            if "maxtasksperchild" in kw:
                kw = {"max_tasks_per_child": kw["maxtasksperchild"]}
            self.pool = cf.ProcessPoolExecutor(processes, mp_context=ctx, **kw)

    def map(self, fn, items, chunksize):
        if self.kind == "pool":
            return self.pool.map(fn, items, chunksize)
        return list(self.pool.map(fn, items, chunksize=chunksize))

    def imap_unordered(self, fn, items, chunksize=1):
        if self.kind == "pool":
            return self.pool.imap_unordered(fn, items, chunksize)
        if chunksize != 1:
            return self.pool.map(fn, items, chunksize=chunksize)
        return (f.result() for f in cf.as_completed([self.pool.submit(fn, x) for x in items]))

    def apply(self, fn, *args):
        if self.kind == "pool":
            return self.pool.apply(fn, args)
        return self.pool.submit(fn, *args).result()

    def close(self):
        if self.kind == "pool":
            self.pool.terminate()
            self.pool.join()
        else:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def warm_up(self):
        assert len(self.map(identity, [1] * 200, 1)) == 200


def main():
    kind, workload = sys.argv[1], sys.argv[2]
    args = dict(a.split("=", 1) for a in sys.argv[3:])
    num = lambda key, default: int(float(args.get(key, default)))  # noqa: E731 (accepts 1e6)
    method = args.get("method", "fork")
    processes = num("processes", 2)
    ctx = mp.get_context(method)
    out = {"impl": "python" if kind == "pool" else "ppe", "workload": workload, "method": method,
           "processes": processes}

    if workload == "startup":
        ms = []
        for _ in range(num("repeats", 5)):
            start = time.perf_counter()
            impl = Impl(kind, ctx, processes)
            assert impl.apply(identity, 1) == 1
            ms.append((time.perf_counter() - start) * 1000)
            impl.close()
        out.update(value=statistics.median(ms), unit="ms")
        return out
    if workload == "recycle":
        n = num("n", 200)
        impl = Impl(kind, ctx, processes, maxtasksperchild=1)
        start = time.perf_counter()
        assert len(impl.map(identity, [1] * n, 1)) == n
        s = time.perf_counter() - start
        impl.close()
        out.update(n=n, seconds=s, value=n / s, unit="workers/s")
        return out

    if workload == "shared":
        # A worker attaching a block registers it with the resource tracker (Python < 3.13). Started
        # here, before the workers, the parent's tracker is theirs too; otherwise each starts its own,
        # which warns at exit of "leaked" blocks the parent has unlinked.
        resource_tracker.ensure_running()
    impl = Impl(kind, ctx, processes)
    impl.warm_up()
    if workload in ("map1", "mapdefault"):
        one = workload == "map1"
        n = num("n", 20_000 if one else 1_000_000)
        chunksize = 1 if one else None
        if not one and kind == "ppe":
            chunksize = -(-n // (4 * processes))
        items = list(range(n))
        start = time.perf_counter()
        results = impl.map(identity, items, chunksize)
        s = time.perf_counter() - start
        assert len(results) == n and results[-1] == n - 1
        out.update(n=n, seconds=s, value=n / s, unit="tasks/s" if one else "items/s")
    elif workload == "imapu1":
        n = num("n", 20_000)
        start = time.perf_counter()
        total = count = 0
        for r in impl.imap_unordered(identity, range(n)):
            total += r
            count += 1
        s = time.perf_counter() - start
        assert count == n and total == n * (n - 1) // 2
        out.update(n=n, seconds=s, value=n / s, unit="tasks/s")
    elif workload == "bytes":
        size, n = num("size", MIB), num("n", 256)
        buffer = (bytes(range(256)) * (size // 256 + 1))[:size]
        start = time.perf_counter()
        results = impl.map(echo, [buffer] * n, 1)
        s = time.perf_counter() - start
        assert len(results) == n and all(len(r) == size and r[size // 2] == buffer[size // 2] for r in results)
        out.update(n=n, size=size, seconds=s, value=n * size / MIB / s, unit="MiB/s")
    elif workload == "shared":
        size, n = num("size", 64 * MIB), num("n", 4)
        pattern = (bytes(range(256)) * (size // 256 + 1))[:size]
        blocks = []
        try:
            for _ in range(n):  # made and filled before the clock starts, as bytes' buffer is
                blocks.append(shared_memory.SharedMemory(create=True, size=size))
                blocks[-1].buf[:size] = pattern
            probes = (0, size // 2, size - 1)
            expected = [[(b.buf[p] + 1) % 256 for p in probes] for b in blocks]
            names = [b.name for b in blocks]
            start = time.perf_counter()
            results = impl.map(bump_shared, names, 1)
            s = time.perf_counter() - start
            assert results == names
            assert all([b.buf[p] for p in probes] == e for b, e in zip(blocks, expected))
        finally:
            for b in blocks:
                b.close()
                b.unlink()
        out.update(n=n, size=size, seconds=s, value=n * size / MIB / s, unit="MiB/s")
    elif workload == "cpu":
        n, ms = num("n", 40), float(args.get("ms", 20))
        iterations = calibrate_spin(ms)
        items = [iterations] * n

        def serial():
            start = time.perf_counter()
            for i in items:
                spin(i)
            return time.perf_counter() - start

        before = serial()
        start = time.perf_counter()
        results = impl.map(spin, items, 1)
        parallel = time.perf_counter() - start
        serial_s = (before + serial()) / 2
        assert results[0] == spin(iterations)
        out.update(n=n, task_ms=serial_s / n * 1000, serial_s=serial_s, pool_s=parallel,
                   value=100 * serial_s / (parallel * processes), unit="% efficiency")
    elif workload == "idle_mem":
        seen = set()
        for _ in range(100):
            seen.update(impl.map(pids, range(100), 1))
            if len(seen) >= processes:
                break
        assert len(seen) == processes, seen
        time.sleep(0.2)
        mems = [process_memory(pid) for pid, _ in seen]
        for key in ("rss", "pss", "private"):
            out[f"{key}_mib"] = sum(m[key] for m in mems) / len(mems)
        for server in {ppid for _, ppid in seen if ppid != os.getpid()}:
            m = process_memory(server)
            out.update(server_rss_mib=m["rss"], server_pss_mib=m["pss"], server_private_mib=m["private"])
        out.update(value=out["private_mib"], unit="MiB private")
    elif workload == "peak_mem":
        n, chunksize = num("n", 100_000), num("chunksize", 1)
        before = peak_rss_mib()
        start = time.perf_counter()
        count = sum(1 for r in impl.imap_unordered(identity, range(n), chunksize) if r >= 0)
        s = time.perf_counter() - start
        assert count == n
        out.update(n=n, chunksize=chunksize, seconds=s, hwm_before_mib=before, value=peak_rss_mib(),
                   unit="MiB peak RSS")
    else:
        sys.exit(f"unknown workload {workload}")
    impl.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
