// primes: counts the primes below N on a procpool::Pool, then again serially
// to check the count and show the speedup. Shows pool.map over a vector of
// independent work items (blocks of the range) with an explicit chunksize
// and a progress bar.
//
//   ./primes [N] [--processes P] [--no-serial]
//
// N defaults to 20000000, P to the CPU count; --no-serial skips the serial
// count (and so the check and the speedup). Exits 1 if the two counts
// disagree, 2 on a bad argument.
#include <procpool/procpool.hpp>

#include <fmt/core.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string_view>
#include <utility>
#include <vector>

namespace {

using Block = std::pair<std::uint64_t, std::uint64_t>;  // the numbers [first, last)

// Trial division, on purpose: work that is all CPU, with a tiny argument
// and result, is what a process pool speeds up best.
bool is_prime(std::uint64_t n) {
  if (n < 2) return false;
  if (n % 2 == 0) return n == 2;
  for (std::uint64_t d = 3; d * d <= n; d += 2) {
    if (n % d == 0) return false;
  }
  return true;
}

// Blocks need nothing from each other, so any worker can count any block.
std::uint64_t count_primes(Block block) {
  std::uint64_t count = 0;
  for (std::uint64_t n = block.first; n < block.second; ++n) {
    if (is_prime(n)) ++count;
  }
  return count;
}

// Reads a whole argument as a number into `value`; false if it is not one.
template <class T>
bool parse_number(std::string_view text, T& value) {
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return error == std::errc{} && end == text.data() + text.size();
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);

  std::uint64_t n = 20'000'000;
  std::size_t processes = 0;  // 0: one worker per CPU
  bool serial = true;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    bool ok = false;
    if (arg == "--no-serial") {
      serial = false;
      ok = true;
    } else if (arg == "--processes" && i + 1 < argc) {
      ok = parse_number(argv[++i], processes);
    } else {
      ok = parse_number(arg, n);
    }
    if (!ok) {
      fmt::print(stderr, "usage: {} [N] [--processes P] [--no-serial]\n", argv[0]);
      return 2;
    }
  }

  // Far more blocks than workers, so the workers finish together even though
  // blocks of larger numbers take longer.
  constexpr std::uint64_t block_size = 250'000;
  std::vector<Block> blocks;
  for (std::uint64_t first = 0; first < n; first += block_size) {
    blocks.emplace_back(first, std::min(first + block_size, n));
  }

  // Start the workers before the clock: a pool is made once and reused.
  procpool::Pool pool({.processes = processes});
  procpool::ProgressBar bar("pool");
  auto start = std::chrono::steady_clock::now();
  // chunksize 1: a block is already a sizeable task, and one block per task
  // balances the load best.
  std::vector<std::uint64_t> counts = pool.map<count_primes>(blocks, {.chunksize = 1, .progress = bar});
  std::uint64_t pool_count = 0;
  for (std::uint64_t count : counts) pool_count += count;
  const double pool_time = seconds_since(start);
  bar.finish();

  fmt::print("primes below {}: {}\n", n, pool_count);
  fmt::print("pool:     {:.3f} s  (processes = {})\n", pool_time, pool.processes());
  if (!serial) return 0;

  fmt::print("counting again serially, to check and compare (--no-serial skips this)...\n");
  std::fflush(stdout);
  start = std::chrono::steady_clock::now();
  std::uint64_t serial_count = 0;
  for (const Block& block : blocks) serial_count += count_primes(block);
  const double serial_time = seconds_since(start);
  fmt::print("serial:   {:.3f} s\n", serial_time);
  fmt::print("speedup:  {:.2f}x\n", serial_time / pool_time);
  if (pool_count != serial_count) {
    fmt::print(stderr, "error: the pool counted {} primes but the serial loop counted {}\n", pool_count, serial_count);
    return 1;
  }
  return 0;
}
