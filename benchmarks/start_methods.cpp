// Start-method benchmark: pool creation to first result (2 workers), and
// worker recycling rate (maxtasksperchild = 1). Prints one JSON object.
//
// usage: procpool_bench_start <fork|posix_spawn|forkserver> [repeats] [recycle tasks]
// benchmarks/compare.py runs it beside Python's multiprocessing.
#include <procpool/procpool.hpp>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include <fmt/format.h>

namespace {

long identity(long x) { return x; }

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

procpool::StartMethod parse_method(const std::string& name) {
  if (name == "fork") return procpool::StartMethod::fork;
  if (name == "posix_spawn") return procpool::StartMethod::posix_spawn;
  if (name == "forkserver") return procpool::StartMethod::forkserver;
  throw std::invalid_argument("unknown start method " + name);
}

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  if (argc < 2) {
    fmt::print(stderr, "usage: {} <fork|posix_spawn|forkserver> [repeats] [recycle tasks]\n", argv[0]);
    return 2;
  }
  const auto method = parse_method(argv[1]);
  const int repeats = argc > 2 ? std::stoi(argv[2]) : 20;
  const long recycle_tasks = argc > 3 ? std::stol(argv[3]) : 2000;

  std::vector<double> startup;
  for (int i = 0; i < repeats; ++i) {
    auto start = Clock::now();
    procpool::Pool pool({.processes = 2, .start_method = method});
    long one = pool.apply<identity>(1L);
    startup.push_back(seconds_since(start) * 1000);
    if (one != 1) return 1;
  }
  std::sort(startup.begin(), startup.end());

  std::vector<long> inputs(static_cast<std::size_t>(recycle_tasks), 1L);
  procpool::Pool pool({.processes = 2, .start_method = method, .maxtasksperchild = 1});
  auto start = Clock::now();
  auto results = pool.map<identity>(inputs, 1);
  double recycle = static_cast<double>(recycle_tasks) / seconds_since(start);
  if (results.size() != inputs.size()) return 1;

  fmt::print("{{\"impl\": \"procpool\", \"method\": \"{}\", \"startup_ms\": {:.3f}, \"recycle_per_s\": {:.1f}}}\n",
             argv[1], startup[startup.size() / 2], recycle);
  return 0;
}
