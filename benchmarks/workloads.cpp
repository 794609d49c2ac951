// procpool on the workloads of issue 5, one workload and one start method per
// run; prints one JSON line. benchmarks/compare.py runs it beside Python's
// multiprocessing (py_workloads.py) and the raw-pipe reference (raw_pipes.cpp).
//
// usage: procpool_bench_workloads <workload> [method=forkserver] [processes=2] [key=value...]
//
//   map1        map of a trivial function, chunksize 1           n=20000      -> tasks/s
//   mapdefault  map with the default chunking                    n=1000000    -> items/s
//   imapu1      imap_unordered, chunksize 1                      n=20000      -> tasks/s
//   bytes       map of echo over byte buffers, one per task;     size=1048576 n=256 -> MiB/s
//               each buffer is sent and returned whole; MiB/s counts one direction
//   shared      map of bump over procpool::SharedMemory blocks,  size=67108864 n=4 -> MiB/s
//               one per task; the worker adds 1 to every byte in place and
//               returns the block: only references travel; MiB/s = n * size / time
//   cpu         map of ~ms-long CPU-bound tasks, chunksize 1     n=40 ms=20   -> parallel efficiency
//               = serial time / (pool time * processes)
//   skewed      map where the first 5% of the items cost us= microseconds n=200000 us=200
//               of CPU and the rest nothing, with chunksize 1, the default
//               and procpool::adaptive, on one pool      -> adaptive's speedup over the better other
//   idle_mem    memory of each idle worker (smaps_rollup)                     -> MiB beyond shared pages
//   peak_mem    parent's peak RSS (VmHWM) after n imap_unordered items        n=100000 chunksize=1 -> MiB
//   as_completed  n apply_async of a trivial task, taken with procpool::as_completed
//               or with get() in order, interleaved over rounds    n=10000 rounds=7
//               -> median time of as_completed / median time of get() in order
//
// Pool start-up and maxtasksperchild=1 recycling are procpool_bench_start's.
// Every timed workload runs on a pool that already answered a warm-up map.
#include <procpool/procpool.hpp>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <ranges>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "bench_util.hpp"

namespace {

long identity(long x) { return x; }

std::vector<char> echo(std::vector<char> buffer) { return buffer; }

// Adds 1 to every byte of the block, in place, and returns it: the parent gets the same block back.
procpool::SharedMemory bump(procpool::SharedMemory block) {
  for (auto& b : block.as<unsigned char>()) ++b;
  return block;
}

std::uint64_t spin_task(std::uint64_t iterations) { return bench::spin(iterations); }

std::pair<long, long> pids(long) { return {static_cast<long>(::getpid()), static_cast<long>(::getppid())}; }

procpool::StartMethod parse_method(const std::string& name) {
  if (name == "fork") return procpool::StartMethod::fork;
  if (name == "posix_spawn") return procpool::StartMethod::posix_spawn;
  if (name == "forkserver") return procpool::StartMethod::forkserver;
  throw std::invalid_argument("unknown start method " + name);
}

void warm_up(procpool::Pool& pool) {
  auto r = pool.map<identity>(std::vector<long>(200, 1L), 1);
  if (r.size() != 200) throw std::runtime_error("warm-up failed");
}

void check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(std::string("wrong result: ") + what);
}

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  if (argc < 2) {
    fmt::print(stderr,
               "usage: {} <map1|mapdefault|imapu1|bytes|shared|cpu|skewed|idle_mem|peak_mem|as_completed> "
               "[method=...] [key=value...]\n",
               argv[0]);
    return 2;
  }
  try {
    const std::string workload = argv[1];
    const bench::Args args(argc, argv, 2);
    const std::string method = args.str("method", "forkserver");
    const std::size_t processes = args.size("processes", 2);
    bench::Json out("procpool", workload);
    out.add("method", method).add("processes", processes);
    procpool::Options options{.processes = processes, .start_method = parse_method(method)};
    options.shared_memory_threshold = args.size("shm", options.shared_memory_threshold);
    options.max_tasks_in_flight = args.size("inflight", options.max_tasks_in_flight);
    options.imap_prefetch = args.size("prefetch", options.imap_prefetch);
    options.worker_spin = args.size("spin", 1) != 0;
    out.add("shm", options.shared_memory_threshold);
    procpool::Pool pool(options);

    if (workload == "map1" || workload == "mapdefault") {
      const bool one = workload == "map1";
      const std::size_t n = args.size("n", one ? 20'000 : 1'000'000);
      const std::size_t chunksize = one ? 1 : args.size("chunksize", 0);
      warm_up(pool);
      std::vector<long> items(n);
      for (std::size_t i = 0; i < n; ++i) items[i] = static_cast<long>(i);
      auto start = bench::Clock::now();
      auto results = pool.map<identity>(items, chunksize);
      double s = bench::seconds_since(start);
      check(results.size() == n && results.back() == static_cast<long>(n - 1), "map");
      out.add("n", n)
          .add("seconds", s)
          .add("value", static_cast<double>(n) / s)
          .add("unit", one ? "tasks/s" : "items/s");
    } else if (workload == "imapu1") {
      const std::size_t n = args.size("n", 20'000);
      warm_up(pool);
      auto start = bench::Clock::now();
      long sum = 0;
      std::size_t count = 0;
      for (long r : pool.imap_unordered<identity>(std::views::iota(0L, static_cast<long>(n)))) {
        sum += r;
        ++count;
      }
      double s = bench::seconds_since(start);
      check(count == n && sum == static_cast<long>(n * (n - 1) / 2), "imap_unordered");
      out.add("n", n).add("seconds", s).add("value", static_cast<double>(n) / s).add("unit", "tasks/s");
    } else if (workload == "bytes") {
      const std::size_t size = args.size("size", std::size_t{1} << 20);
      const std::size_t n = args.size("n", 256);
      warm_up(pool);
      std::vector<char> buffer(size);
      for (std::size_t i = 0; i < size; ++i) buffer[i] = static_cast<char>(i * 7);
      // Every task's argument is the same buffer, read in place: no copies before the pool's own.
      auto inputs = std::views::iota(std::size_t{0}, n) |
                    std::views::transform([&buffer](std::size_t) -> const std::vector<char>& { return buffer; });
      auto start = bench::Clock::now();
      auto results = pool.map<echo>(inputs, 1);
      double s = bench::seconds_since(start);
      check(results.size() == n, "bytes: count");
      for (auto& r : results) check(r.size() == size && r[size / 2] == buffer[size / 2], "bytes: echo");
      out.add("n", n)
          .add("size", size)
          .add("seconds", s)
          .add("value", static_cast<double>(n) * static_cast<double>(size) / bench::mib / s)
          .add("unit", "MiB/s");
    } else if (workload == "shared") {
      const std::size_t size = args.size("size", std::size_t{64} << 20);
      const std::size_t n = args.size("n", 4);
      check(size > 0, "shared: size must be positive");
      warm_up(pool);
      // The blocks are made and filled before the clock starts, as bytes' buffer is: their pages exist.
      std::vector<procpool::SharedMemory> inputs;
      inputs.reserve(n);
      for (std::size_t k = 0; k < n; ++k) {
        auto bytes = inputs.emplace_back(size).as<unsigned char>();
        for (std::size_t i = 0; i < size; ++i) bytes[i] = static_cast<unsigned char>(i * 7 + k);
      }
      // What the first, middle and last byte of each block must read after one bump.
      const std::array<std::size_t, 3> probes{0, size / 2, size - 1};
      auto sample = [&probes](const procpool::SharedMemory& block) {
        std::array<unsigned char, 3> got{};
        for (std::size_t j = 0; j < probes.size(); ++j) got[j] = block.as<unsigned char>()[probes[j]];
        return got;
      };
      std::vector<std::array<unsigned char, 3>> expected(n);
      for (std::size_t k = 0; k < n; ++k) {
        expected[k] = sample(inputs[k]);
        for (auto& e : expected[k]) ++e;
      }
      auto start = bench::Clock::now();
      auto results = pool.map<bump>(inputs, 1);
      double s = bench::seconds_since(start);
      check(results.size() == n, "shared: count");
      for (std::size_t k = 0; k < n; ++k) {
        check(results[k].shares_with(inputs[k]) && results[k].size() == size, "shared: not the same block");
        check(sample(results[k]) == expected[k], "shared: bytes not bumped exactly once");
      }
      out.add("n", n)
          .add("size", size)
          .add("seconds", s)
          .add("value", static_cast<double>(n) * static_cast<double>(size) / bench::mib / s)
          .add("unit", "MiB/s");
    } else if (workload == "cpu") {
      const std::size_t n = args.size("n", 40);
      const double ms = static_cast<double>(args.num("ms", 20));
      warm_up(pool);
      const std::uint64_t iterations = bench::calibrate_spin(ms);
      std::vector<std::uint64_t> items(n, iterations);
      // Serial time, in this process, before and after the pool run: drift falls on both sides.
      auto serial = [&] {
        auto start = bench::Clock::now();
        std::uint64_t x = 0;
        for (auto i : items) x += bench::spin(i);
        double s = bench::seconds_since(start);
        check(x != 1, "spin");
        return s;
      };
      double serial_before = serial();
      auto start = bench::Clock::now();
      auto results = pool.map<spin_task>(items, 1);
      double parallel = bench::seconds_since(start);
      double serial_after = serial();
      check(results.size() == n && results[0] == bench::spin(iterations), "cpu");
      double serial_s = (serial_before + serial_after) / 2;
      out.add("n", n)
          .add("task_ms", serial_s / static_cast<double>(n) * 1000)
          .add("serial_s", serial_s)
          .add("pool_s", parallel)
          .add("value", 100 * serial_s / (parallel * static_cast<double>(processes)))
          .add("unit", "% efficiency");
    } else if (workload == "skewed") {
      // Skewed task times, the case for adaptive chunking: chunksize 1 pays
      // per-task overhead on every cheap item, and the default chunking puts
      // all the costly items in one chunk, which one worker runs alone. The
      // three run on one pool and one calibration, in rotating order, `rounds`
      // times; medians.
      const std::size_t n = args.size("n", 200'000);
      const std::size_t rounds = args.size("rounds", 3);
      warm_up(pool);
      const std::uint64_t costly = bench::calibrate_spin(static_cast<double>(args.num("us", 200)) / 1000);
      std::vector<std::uint64_t> items(n, 0);
      for (std::size_t i = 0; i < n / 20; ++i) items[i] = costly;
      const std::vector<std::pair<std::string, std::size_t>> ways{{"chunksize_1", 1},
                                                                  {"default", 0},
                                                                  {"adaptive", procpool::adaptive}};
      std::vector<std::vector<double>> times(ways.size());
      for (std::size_t round = 0; round < rounds; ++round) {
        for (std::size_t k = 0; k < ways.size(); ++k) {
          const std::size_t w = (k + round) % ways.size();
          auto start = bench::Clock::now();
          auto results = pool.map<spin_task>(items, {.chunksize = ways[w].second});
          times[w].push_back(bench::seconds_since(start));
          check(results.size() == n && results[0] == bench::spin(costly), "skewed");
        }
      }
      auto median = [](std::vector<double> v) {
        std::sort(v.begin(), v.end());
        return v[v.size() / 2];
      };
      out.add("n", n);
      for (std::size_t w = 0; w < ways.size(); ++w) out.add(ways[w].first + "_s", median(times[w]));
      const double adaptive_s = median(times[2]);
      out.add("value", std::min(median(times[0]), median(times[1])) / adaptive_s)
          .add("unit", "x faster than the better of chunksize 1 and default");
    } else if (workload == "idle_mem") {
      warm_up(pool);
      std::set<std::pair<long, long>> seen;
      for (int round = 0; round < 100 && seen.size() < processes; ++round) {
        for (auto p : pool.map<pids>(std::vector<long>(100, 0L), 1)) seen.insert(p);
      }
      check(seen.size() == processes, "idle_mem: not every worker answered");
      std::this_thread::sleep_for(std::chrono::milliseconds(200));  // let them go idle
      bench::ProcessMemory sum;
      std::set<long> parents;
      for (auto [pid, ppid] : seen) {
        auto m = bench::process_memory(pid);
        sum.rss += m.rss;
        sum.pss += m.pss;
        sum.private_ += m.private_;
        if (ppid != static_cast<long>(::getpid())) parents.insert(ppid);
      }
      const auto k = static_cast<double>(seen.size());
      out.add("rss_mib", sum.rss / k).add("pss_mib", sum.pss / k).add("private_mib", sum.private_ / k);
      // The fork server (forkserver only) is a per-pool cost on top.
      for (long server : parents) {
        auto m = bench::process_memory(server);
        out.add("server_rss_mib", m.rss).add("server_pss_mib", m.pss).add("server_private_mib", m.private_);
      }
      out.add("value", sum.private_ / k).add("unit", "MiB private");
    } else if (workload == "peak_mem") {
      const std::size_t n = args.size("n", 100'000);
      const std::size_t chunksize = args.size("chunksize", 1);
      warm_up(pool);
      double before = bench::peak_rss_mib();
      auto start = bench::Clock::now();
      std::size_t count = 0;
      for (long r : pool.imap_unordered<identity>(std::views::iota(0L, static_cast<long>(n)), chunksize)) {
        count += r >= 0 ? 1 : 0;
      }
      double s = bench::seconds_since(start);
      check(count == n, "peak_mem");
      out.add("n", n)
          .add("chunksize", chunksize)
          .add("seconds", s)
          .add("hwm_before_mib", before)
          .add("value", bench::peak_rss_mib())
          .add("unit", "MiB peak RSS");
    } else if (workload == "as_completed") {
      const std::size_t n = args.size("n", 10'000);
      const std::size_t rounds = args.size("rounds", 7);
      warm_up(pool);
      // Submitting and taking n results, one way or the other.
      auto run = [&](bool completed) {
        auto start = bench::Clock::now();
        std::vector<procpool::AsyncResult<long>> results;
        results.reserve(n);
        for (std::size_t i = 0; i < n; ++i) results.push_back(pool.apply_async<identity>(static_cast<long>(i)));
        long sum = 0;
        if (completed) {
          for (const auto& r : procpool::as_completed(results)) sum += r.get();
        } else {
          for (const auto& r : results) sum += r.get();
        }
        check(sum == static_cast<long>(n * (n - 1) / 2), "as_completed");
        return bench::seconds_since(start);
      };
      std::vector<double> in_order, completed;
      for (std::size_t round = 0; round < rounds; ++round) {
        // Alternating which goes first, so drift falls on both alike.
        const bool first = round % 2 == 0;
        (first ? in_order : completed).push_back(run(!first));
        (first ? completed : in_order).push_back(run(first));
      }
      const double a = bench::median(completed), g = bench::median(in_order);
      out.add("n", n)
          .add("rounds", rounds)
          .add("get_seconds", g)
          .add("as_completed_seconds", a)
          .add("value", a / g)
          .add("unit", "x the time of get() in order");
    } else {
      fmt::print(stderr, "unknown workload {}\n", workload);
      return 2;
    }
    out.print();
  } catch (const std::exception& e) {
    fmt::print(stderr, "procpool_bench_workloads: {}\n", e.what());
    return 1;
  }
  return 0;
}
