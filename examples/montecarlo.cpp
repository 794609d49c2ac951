// montecarlo: estimates pi by throwing random points at the unit square and
// counting those inside the quarter circle, in many independently seeded
// batches spread over a procpool::Pool. Shows pool.imap_unordered over a lazy
// range of batch numbers, a procpool::ProgressBar told of progress by the
// pool (CallOptions::progress), and results that do not depend on which
// worker ran what: each batch's generator is seeded from the run's seed and the batch number, so the same
// arguments always give the same estimate.
//
//   ./montecarlo [BATCHES] [--samples S] [--seed N] [--processes P]
//
// BATCHES defaults to 400 and S (points per batch) to 1000000. The bar is
// drawn on stderr when it is a terminal. Prints the estimate, its error and
// the error in standard errors; exits 1 if that is over 5 (a broken run),
// 2 on a bad argument.
#include <procpool/procpool.hpp>

#include <fmt/core.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>
#include <ranges>
#include <string_view>

namespace {

// What travels to a worker: which batch, how big, and the run's seed.
struct Batch {
  std::uint64_t index = 0;
  std::uint64_t samples = 0;
  std::uint64_t seed = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(index, samples, seed);
  }
};

// A double in [0, 1) from the top 53 bits. std::uniform_real_distribution
// would do, but its output may differ between standard libraries;
// mt19937_64's sequence is fixed by the standard, and so is this.
double unit(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// Runs in a worker: the number of the batch's points inside the quarter circle.
std::uint64_t count_hits(Batch batch) {
  // seed_seq spreads nearby seeds (batch 0, 1, 2...) over the whole state.
  std::seed_seq seq{batch.seed, batch.index};
  std::mt19937_64 rng(seq);
  std::uint64_t hits = 0;
  for (std::uint64_t i = 0; i < batch.samples; ++i) {
    const double x = unit(rng), y = unit(rng);
    if (x * x + y * y < 1.0) ++hits;
  }
  return hits;
}

template <class T>
bool parse_number(std::string_view text, T& value) {
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return error == std::errc{} && end == text.data() + text.size();
}

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);

  std::uint64_t batches = 400, samples = 1'000'000, seed = 2024;
  std::size_t processes = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    bool ok = false;
    if (arg == "--samples" && i + 1 < argc) {
      ok = parse_number(argv[++i], samples) && samples > 0;
    } else if (arg == "--seed" && i + 1 < argc) {
      ok = parse_number(argv[++i], seed);
    } else if (arg == "--processes" && i + 1 < argc) {
      ok = parse_number(argv[++i], processes);
    } else {
      ok = parse_number(arg, batches) && batches > 0;
    }
    if (!ok) {
      fmt::print(stderr, "usage: {} [BATCHES] [--samples S] [--seed N] [--processes P]\n", argv[0]);
      return 2;
    }
  }

  procpool::Pool pool({.processes = processes});
  procpool::ProgressBar bar("batches");
  // The batches are made as the pool asks for them: an input of a billion
  // batches would take no more memory than this one.
  auto inputs = std::views::iota(std::uint64_t{0}, batches) | std::views::transform([&](std::uint64_t i) {
                  return Batch{i, samples, seed};
                });
  std::uint64_t hits = 0;
  // Completion order is fine: a sum does not care which batch came first.
  // The pool tells the bar as batches complete (the input's size is its total).
  for (std::uint64_t batch_hits : pool.imap_unordered<count_hits>(inputs, {.progress = bar})) hits += batch_hits;
  bar.finish();

  const double n = static_cast<double>(batches * samples);
  const double p = static_cast<double>(hits) / n;  // estimates pi / 4
  const double estimate = 4 * p;
  const double error = estimate - std::numbers::pi;
  // Standard error of 4p for n independent points: 4 sqrt(p (1 - p) / n).
  const double standard_error = 4 * std::sqrt(p * (1 - p) / n);
  const double sigmas = std::abs(error) / standard_error;
  const bool plausible = sigmas <= 5;
  fmt::print("{} points in {} batches on {} processes (seed {})\n", batches * samples, batches, pool.processes(), seed);
  fmt::print("pi ~ {:.8f} (error {:+.2e}, {:.2f} standard errors): {}\n", estimate, error, sigmas,
             plausible ? "ok" : "TOO FAR");
  return plausible ? 0 : 1;
}
