"""Python's multiprocessing, measured the way procpool_bench_start measures procpool.

usage: python3 py_start_methods.py <fork|spawn|forkserver> [repeats] [recycle tasks]
Prints one JSON object.
"""
import json
import multiprocessing as mp
import statistics
import sys
import time


def identity(x):
    return x


def main():
    method = sys.argv[1]
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    recycle_tasks = int(sys.argv[3]) if len(sys.argv) > 3 else 500
    ctx = mp.get_context(method)

    startup = []
    for _ in range(repeats):
        start = time.perf_counter()
        pool = ctx.Pool(2)
        one = pool.apply(identity, (1,))
        startup.append((time.perf_counter() - start) * 1000)
        assert one == 1
        pool.terminate()
        pool.join()

    pool = ctx.Pool(2, maxtasksperchild=1)
    start = time.perf_counter()
    results = pool.map(identity, [1] * recycle_tasks, chunksize=1)
    recycle = recycle_tasks / (time.perf_counter() - start)
    assert len(results) == recycle_tasks
    pool.terminate()
    pool.join()
    print(json.dumps({"impl": "python", "method": method,
                      "startup_ms": round(statistics.median(startup), 3),
                      "recycle_per_s": round(recycle, 1)}))


if __name__ == "__main__":
    main()
