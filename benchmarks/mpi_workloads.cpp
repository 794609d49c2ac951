// procpool on MPI ranks, one workload per run; prints one JSON line.
// benchmarks/compare.py --suite mpi runs it beside mpi4py.futures
// (py_mpi_workloads.py) and beside itself on local processes.
//
// usage: mpirun -np 3 procpool_bench_mpi <workload> [backend=world] [key=value...]
//        procpool_bench_mpi <workload> backend=local      (a local forkserver pool)
//
//   map1      map of a trivial function, chunksize 1      n=20000           -> tasks/s
//   map1m     map with the default chunking                n=1000000         -> items/s
//   echo      map of echo over byte buffers, chunksize 1   size=1048576 n=128 -> MiB/s (one direction)
//   idle      CPU the serving ranks use while the pool waits, over secs=3    -> % of a core (the busiest rank)
//
// Two worker processes (processes=2), forkserver. Every timed workload runs
// on a pool that already answered a warm-up map.
#include <procpool/mpi.hpp>

#include <unistd.h>

#include <fstream>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.hpp"

namespace {

long identity(long x) { return x; }
std::vector<char> echo(std::vector<char> v) { return v; }

long parent_of(long pid) {
  std::ifstream stat(fmt::format("/proc/{}/stat", pid));
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  std::istringstream rest(text.substr(text.rfind(')') + 2));
  char state = 0;
  long ppid = 0;
  rest >> state >> ppid;
  return ppid;
}

// The serving rank a worker runs for: its ancestor that mpirun (or orted) started.
long rank_pid(long) {
  long pid = ::getppid();
  for (int k = 0; k < 8 && pid > 1; ++k) {
    std::ifstream comm(fmt::format("/proc/{}/comm", parent_of(pid)));
    std::string name;
    std::getline(comm, name);
    if (name == "mpirun" || name == "orted" || name == "mpiexec") return pid;
    pid = parent_of(pid);
  }
  return 0;
}

double cpu_seconds(long pid) {
  std::ifstream stat(fmt::format("/proc/{}/stat", pid));
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  std::istringstream rest(text.substr(text.rfind(')') + 2));
  std::string field;
  for (int k = 3; k < 14; ++k) rest >> field;
  double utime = 0, stime = 0;
  rest >> utime >> stime;
  return (utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

void check(bool ok, const char* what) {
  if (!ok) throw std::runtime_error(fmt::format("wrong result: {}", what));
}

}  // namespace

int main(int argc, char** argv) {
  procpool::mpi::init(argc, argv);
  if (argc < 2) {
    fmt::print(stderr, "usage: mpirun -np 3 {} <map1|map1m|echo|idle> [backend=world|local] [key=value...]\n", argv[0]);
    return 2;
  }
  const std::string workload = argv[1];
  const bench::Args args(argc, argv, 2);
  const std::string backend = args.str("backend", "world");
  procpool::Pool pool({.processes = args.size("processes", 2),
                       .backend = backend == "local" ? procpool::Backend{} : procpool::mpi::world()});
  check(pool.map<identity>(std::vector<long>(200, 1), 1).size() == 200, "warm-up");
  bench::Json out(backend == "local" ? "procpool-local" : "procpool-mpi", workload);
  if (workload == "map1" || workload == "map1m") {
    const bool one = workload == "map1";
    const auto n = static_cast<long>(args.size("n", one ? 20000 : 1000000));
    std::vector<long> xs(static_cast<std::size_t>(n));
    std::iota(xs.begin(), xs.end(), 0L);
    const auto start = bench::Clock::now();
    auto results = pool.map<identity>(xs, one ? 1 : 0);
    const double s = bench::seconds_since(start);
    check(results == xs, "map");
    out.add("n", n).add("seconds", s).add("value", static_cast<double>(n) / s).add("unit", one ? "tasks/s" : "items/s");
  } else if (workload == "echo") {
    const std::size_t size = args.size("size", std::size_t{1} << 20);
    const std::size_t n = args.size("n", 128);
    std::vector<std::vector<char>> inputs(n, std::vector<char>(size));
    for (std::size_t i = 0; i < size; ++i) inputs[0][i] = static_cast<char>(i * 7);
    for (auto& in : inputs) in = inputs[0];
    const auto start = bench::Clock::now();
    auto results = pool.map<echo>(inputs, 1);
    const double s = bench::seconds_since(start);
    for (const auto& r : results) check(r == inputs[0], "echo");
    out.add("n", n).add("size", size).add("seconds", s);
    out.add("value", static_cast<double>(n) * static_cast<double>(size) / bench::mib / s).add("unit", "MiB/s");
  } else if (workload == "idle") {
    const double secs = static_cast<double>(args.num("secs", 3));
    auto ranks = pool.map<rank_pid>(std::vector<long>(40), 1);
    std::set<long> pids(ranks.begin(), ranks.end());
    check(!pids.empty() && !pids.contains(0), "the ranks' pids");
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    std::vector<double> before;
    for (long pid : pids) before.push_back(cpu_seconds(pid));
    const auto start = bench::Clock::now();
    std::this_thread::sleep_for(std::chrono::duration<double>(secs));
    const double wall = bench::seconds_since(start);
    double busiest = 0;
    std::size_t k = 0;
    for (long pid : pids) busiest = std::max(busiest, (cpu_seconds(pid) - before[k++]) / wall);
    out.add("ranks", pids.size()).add("value", 100 * busiest).add("unit", "% of a core");
  } else {
    fmt::print(stderr, "unknown workload {}\n", workload);
    return 2;
  }
  out.print();
}
