// Fault-injection stress: seeded rounds that mix normal items, exceptions,
// crashes (SIGKILL, abort, _exit(3)), hangs past Options::task_timeout and
// crash-once items under retries, across imap, imap_unordered, apply_async,
// map_async and map, with and without chunking, maxtasksperchild, a small
// in-flight window and a small imap prefetch. A model of the pool's promised
// semantics predicts every item's outcome and how often each item ran; the
// test asserts both exactly: nothing lost, nothing duplicated, no hang.
//
// The seed is fixed (so CI is reproducible) and printed on failure; set
// PROCPOOL_STRESS_SEED=<number> to try another scenario, and
// PROCPOOL_STRESS_VERBOSE=1 to print each round's plan and duration.
#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common.hpp"

// A named namespace: a worker finds a task's code by its type's name.
namespace stress_test {

using namespace std::chrono_literals;

constexpr std::uint64_t default_seed = 20240917;
constexpr auto task_timeout = 300ms;
/// How long the test waits for any one result before calling it a hang.
constexpr auto hang_limit = 30s;

enum Behaviour : int {
  normal = 0,
  throws,   // std::runtime_error("boom <index>")
  sigkill,  // raise(SIGKILL)
  sigabrt,  // abort() with SIGABRT's default action
  exit3,    // _exit(3)
  hang,     // sleeps far past the task timeout
  flaky,    // SIGKILL the first time it runs, a value after (a marker file remembers)
};

struct Item {
  long index = 0;
  long value = 0;
  int behaviour = normal;
  std::string dir;  // the round's directory: its run log and flaky markers
  template <class Archive>
  void serialize(Archive& ar) {
    ar(index, value, behaviour, dir);
  }
};

/// What an item yields when it succeeds: its index (so imap_unordered's
/// results can be matched to their input) and a function of its value.
using Result = std::pair<long, long>;

long expected_value(long value) { return 2 * value + 1; }

/// One line per run, written with one write() to an O_APPEND file: atomic
/// between processes, and on disk before the item can crash.
void log_run(const Item& item) {
  std::string path = item.dir + "/runs";
  int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot open " + path);
  std::string line = std::to_string(item.index) + "\n";
  [[maybe_unused]] auto n = ::write(fd, line.data(), line.size());
  ::close(fd);
}

Result run_item(Item item) {
  log_run(item);
  switch (item.behaviour) {
    case throws:
      throw std::runtime_error("boom " + std::to_string(item.index));
    case sigkill:
      ::raise(SIGKILL);
      break;
    case sigabrt: {
      rlimit no_core{0, 0};
      ::setrlimit(RLIMIT_CORE, &no_core);
      ::signal(SIGABRT, SIG_DFL);  // not a handler inherited from the test runner
      std::abort();
    }
    case exit3:
      ::_exit(3);
    case hang:
      std::this_thread::sleep_for(30s);
      break;
    case flaky: {
      std::string marker = item.dir + "/crashed-" + std::to_string(item.index);
      if (::access(marker.c_str(), F_OK) != 0) {
        test::append_line(marker, "crashed once");
        ::raise(SIGKILL);
      }
      break;
    }
    default:
      break;
  }
  return {item.index, expected_value(item.value)};
}

// ---- the scenario ------------------------------------------------------------

/// splitmix64: the same sequence from the same seed with every standard library.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  /// Uniform enough in [0, n).
  std::size_t below(std::size_t n) { return static_cast<std::size_t>(next() % n); }

 private:
  std::uint64_t state_;
};

enum class Api { imap, imap_unordered, apply_async, map_async, map };

const char* api_name(Api api) {
  switch (api) {
    case Api::imap:
      return "imap";
    case Api::imap_unordered:
      return "imap_unordered";
    case Api::apply_async:
      return "apply_async";
    case Api::map_async:
      return "map_async";
    case Api::map:
      return "map";
  }
  return "?";
}

struct Round {
  Api api = Api::imap;
  std::size_t processes = 2;
  std::size_t chunksize = 1;
  std::size_t retries = 0;
  std::size_t maxtasksperchild = 0;
  std::size_t in_flight = 8;
  std::size_t prefetch = 0;
  std::vector<int> behaviours;
  std::vector<long> values;
};

const char* behaviour_name(int b) {
  static const char* names[] = {"normal", "throws", "sigkill", "sigabrt", "exit3", "hang", "flaky"};
  return b >= 0 && b <= flaky ? names[b] : "?";
}

std::string describe(const Round& r) {
  std::ostringstream out;
  out << api_name(r.api) << " processes=" << r.processes << " chunksize=" << r.chunksize << " retries=" << r.retries
      << " maxtasksperchild=" << r.maxtasksperchild << " max_tasks_in_flight=" << r.in_flight
      << " imap_prefetch=" << r.prefetch << " items=" << r.behaviours.size() << ":";
  for (std::size_t i = 0; i < r.behaviours.size(); ++i) {
    if (r.behaviours[i] != normal) out << ' ' << i << '=' << behaviour_name(r.behaviours[i]);
  }
  return out.str();
}

/// The rounds one seed makes: twice over, every API with chunksize 1 and > 1,
/// plus rounds with retries. Hangs are few (each costs the task timeout).
std::vector<Round> make_rounds(std::uint64_t seed) {
  Rng rng(seed);
  struct Shape {
    Api api;
    bool chunked;
    std::size_t retries;
    bool flaky_only;
  };
  const Shape shapes[] = {
      {Api::imap, false, 0, false},
      {Api::imap, true, 0, false},
      {Api::imap_unordered, false, 0, false},
      {Api::imap_unordered, true, 0, false},
      {Api::apply_async, false, 0, false},
      {Api::map_async, false, 0, false},
      {Api::map_async, true, 0, false},
      {Api::map, true, 0, false},
      {Api::imap, false, 1, true},
      {Api::imap_unordered, true, 1, false},
  };
  std::vector<Round> rounds;
  for (int pass = 0; pass < 2; ++pass) {
    for (const Shape& shape : shapes) {
      Round r;
      r.api = shape.api;
      r.processes = 1 + rng.below(3);
      r.chunksize = shape.chunked ? 2 + rng.below(4) : 1;
      r.retries = shape.retries;
      r.maxtasksperchild = rng.below(3) == 0 ? 0 : 1 + rng.below(4);
      r.in_flight = rng.below(2) == 0 ? 1 : 8;
      r.prefetch = rng.below(2) == 0 ? 0 : 2 + rng.below(3);
      const std::size_t n = 20 + rng.below(41);
      for (std::size_t i = 0; i < n; ++i) {
        r.values.push_back(static_cast<long>(rng.below(1'000'000)) - 500'000);
        std::size_t p = rng.below(100);
        int b = normal;
        if (shape.flaky_only) {
          b = p < 25 ? flaky : normal;
        } else if (shape.retries > 0) {
          b = p < 10 ? throws : p < 30 ? flaky : p < 34 ? sigkill : normal;
        } else {
          b = p < 10 ? throws : p < 14 ? sigkill : p < 17 ? sigabrt : p < 20 ? exit3 : normal;
        }
        r.behaviours.push_back(b);
      }
      // At most one hang a round, in about half the rounds, none when all must succeed.
      if (!shape.flaky_only && rng.below(2) == 0) r.behaviours[rng.below(n)] = hang;
      rounds.push_back(std::move(r));
    }
  }
  return rounds;
}

// ---- the model ---------------------------------------------------------------

/// What the test saw or expects for one item, as one comparable line.
using Outcome = std::string;

std::string call_input(Api api, std::size_t index) {
  if (api == Api::apply_async) return "the apply_async task";
  return std::string(api_name(api)) + " input #" + std::to_string(index);
}

struct Plan {
  std::vector<Outcome> outcomes;  // by input index
  std::vector<int> runs;          // how often each item's function starts
};

/// The pool's promises, applied to one round: a chunk runs its items in
/// order; an exception fails only its item; a crash fails every item of
/// the chunk with WorkerLost (the items before it ran, the ones after never
/// start), unless retries are left, when the whole chunk runs again; a hang
/// fails the whole chunk with TaskTimeout and is never retried.
Plan simulate(const Round& r) {
  const std::size_t n = r.behaviours.size();
  const std::size_t chunksize = r.api == Api::apply_async ? 1 : r.chunksize;
  Plan plan;
  plan.outcomes.resize(n);
  plan.runs.assign(n, 0);
  std::vector<bool> marker(n, false);
  for (std::size_t start = 0; start < n; start += chunksize) {
    const std::size_t end = std::min(n, start + chunksize);
    std::size_t deaths = 0;
    for (;;) {
      std::optional<std::string> fatal;  // the chunk's failure, minus the input
      for (std::size_t i = start; i < end && !fatal; ++i) {
        ++plan.runs[i];
        switch (r.behaviours[i]) {
          case sigkill:
            fatal = "WorkerLost signal 9";
            break;
          case sigabrt:
            fatal = "WorkerLost signal 6";
            break;
          case exit3:
            fatal = "WorkerLost exit 3";
            break;
          case hang:
            fatal = "TaskTimeout";
            break;
          case flaky:
            if (!marker[i]) {
              marker[i] = true;
              fatal = "WorkerLost signal 9";
            }
            break;
          default:
            break;
        }
      }
      if (fatal && fatal->starts_with("WorkerLost") && deaths < r.retries) {
        ++deaths;
        continue;
      }
      for (std::size_t i = start; i < end; ++i) {
        const std::string at = " at " + call_input(r.api, i);
        const std::string index = " #" + std::to_string(r.api == Api::apply_async ? 0 : i);
        if (fatal) {
          plan.outcomes[i] = *fatal + (fatal->starts_with("WorkerLost") ? index : "") + at;
        } else if (r.behaviours[i] == throws) {
          plan.outcomes[i] = "RemoteError std::runtime_error: boom " + std::to_string(i) + index + at;
        } else {
          plan.outcomes[i] = "value " + std::to_string(expected_value(r.values[i]));
        }
      }
      break;
    }
  }
  return plan;
}

// ---- what the pool did -----------------------------------------------------------

/// The input an error message names ("imap input #5", "the apply_async task").
std::string named_input(const std::string& what) {
  if (what.find("the apply_async task") != std::string::npos) return "the apply_async task";
  auto at = what.find(" input #");
  if (at == std::string::npos) return "(no input named in: " + what + ")";
  auto begin = what.rfind(' ', at - 1);
  begin = begin == std::string::npos ? 0 : begin + 1;
  auto end = what.find_first_not_of("0123456789", at + 8);
  return what.substr(begin, end - begin);
}

/// An error as the model spells it, with the input its message names.
Outcome observe(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const procpool::RemoteError& e) {
    return "RemoteError " + e.type_name() + ": " + e.message() + " #" + std::to_string(e.input_index()) + " at " +
           named_input(e.what());
  } catch (const procpool::WorkerLost& e) {
    std::string how =
        e.signal() != 0 ? "signal " + std::to_string(e.signal()) : "exit " + std::to_string(e.exit_code());
    return "WorkerLost " + how + " #" + std::to_string(e.input_index()) + " at " + named_input(e.what());
  } catch (const procpool::TaskTimeout& e) {
    std::string what = e.what();
    std::string ms = std::to_string(std::chrono::milliseconds(task_timeout).count()) + " ms";
    return std::string("TaskTimeout") + (what.find(ms) == std::string::npos ? " (no " + ms + ")" : "") + " at " +
           named_input(what);
  } catch (const procpool::TimeoutError& e) {
    return std::string("HANG: ") + e.what();
  } catch (const std::exception& e) {
    return std::string("unexpected ") + procpool::detail::current_exception_type_name() + ": " + e.what();
  }
}

Outcome observe(const Result& r) { return "value " + std::to_string(r.second); }

/// Index of the input an unordered outcome belongs to.
std::optional<std::size_t> index_of(const std::string& named) {
  auto hash = named.rfind('#');
  if (hash == std::string::npos) return std::nullopt;
  return static_cast<std::size_t>(std::stoul(named.substr(hash + 1)));
}

struct Observed {
  std::vector<Outcome> outcomes;      // by input index; empty string: never reported
  std::vector<std::string> problems;  // duplicates, strays, hangs
};

void record(Observed& seen, std::size_t index, Outcome outcome) {
  if (index >= seen.outcomes.size()) {
    seen.problems.push_back("outcome for unknown input #" + std::to_string(index) + ": " + outcome);
  } else if (!seen.outcomes[index].empty()) {
    seen.problems.push_back("second outcome for input #" + std::to_string(index) + ": " + outcome +
                            " (first: " + seen.outcomes[index] + ")");
  } else {
    seen.outcomes[index] = std::move(outcome);
  }
}

/// Drains an IMap, one item at a time, each failure caught on its own.
template <class IMap>
void drain(IMap& results, bool ordered, Observed& seen) {
  for (std::size_t position = 0;; ++position) {
    std::optional<Result> got;
    try {
      got = results.next(hang_limit);
    } catch (const procpool::TimeoutError& e) {
      seen.problems.push_back(std::string("no result for ") + std::to_string(hang_limit.count()) + " s: " + e.what());
      return;
    } catch (...) {
      Outcome outcome = observe(std::current_exception());
      auto index = ordered ? std::optional(position) : index_of(outcome);
      if (!index) {
        seen.problems.push_back("an outcome naming no input: " + outcome);
        continue;
      }
      record(seen, *index, std::move(outcome));
      continue;
    }
    if (!got) return;
    if (ordered && static_cast<std::size_t>(got->first) != position) {
      seen.problems.push_back("imap yielded input #" + std::to_string(got->first) + " in position " +
                              std::to_string(position));
    }
    record(seen, static_cast<std::size_t>(got->first), observe(*got));
  }
}

/// map and map_async report only the first failed item by input index.
Plan first_error_only(const Plan& plan) {
  Plan only = plan;
  auto failed = std::find_if(plan.outcomes.begin(), plan.outcomes.end(),
                             [](const Outcome& o) { return !o.starts_with("value "); });
  if (failed != plan.outcomes.end()) only.outcomes = {*failed};
  return only;
}

/// Runs one round on a fresh pool; returns what each item's caller saw.
template <class Method>
Observed run_round(const Round& r, const std::string& dir, std::string& callback_problem) {
  const std::size_t n = r.behaviours.size();
  // Before the pool: map_async's callbacks refer to them from its I/O thread.
  std::atomic<int> callbacks{0}, error_callbacks{0};
  std::vector<Item> items;
  for (std::size_t i = 0; i < n; ++i) items.push_back({static_cast<long>(i), r.values[i], r.behaviours[i], dir});

  procpool::Pool pool(test::options<Method>({.processes = r.processes,
                                             .maxtasksperchild = r.maxtasksperchild,
                                             .max_tasks_in_flight = r.in_flight,
                                             .imap_prefetch = r.prefetch,
                                             .retries = r.retries,
                                             .task_timeout = task_timeout}));
  Observed seen;
  seen.outcomes.resize(n);
  switch (r.api) {
    case Api::imap: {
      auto results = pool.imap<run_item>(items, r.chunksize);
      drain(results, true, seen);
      break;
    }
    case Api::imap_unordered: {
      auto results = pool.imap_unordered<run_item>(items, r.chunksize);
      drain(results, false, seen);
      break;
    }
    case Api::apply_async: {
      std::vector<procpool::AsyncResult<Result>> pending;
      for (const Item& item : items) pending.push_back(pool.apply_async<run_item>(item));
      for (std::size_t i = 0; i < n; ++i) {
        try {
          const Result& got = pending[i].get(hang_limit);
          if (static_cast<std::size_t>(got.first) != i) {
            seen.problems.push_back("apply_async #" + std::to_string(i) + " got input #" + std::to_string(got.first) +
                                    "'s result");
          }
          record(seen, i, observe(got));
        } catch (...) {
          record(seen, i, observe(std::current_exception()));
        }
      }
      break;
    }
    case Api::map_async:
    case Api::map: {
      // The outcome is all values, or the first failed item's error: kept in
      // slot 0 of a one-slot vector (see first_error_only) when it fails.
      std::vector<Result> values;
      std::exception_ptr error;
      try {
        if (r.api == Api::map) {
          values = pool.map<run_item>(items, r.chunksize);
        } else {
          auto async = pool.map_async<run_item>(
              items, r.chunksize, [&](const std::vector<Result>&) { ++callbacks; },
              [&](const procpool::Error&) { ++error_callbacks; });
          values = async.get(hang_limit);
        }
      } catch (...) {
        error = std::current_exception();
      }
      if (error) {
        seen.outcomes = {observe(error)};
      } else if (values.size() != n) {
        seen.problems.push_back("map returned " + std::to_string(values.size()) + " results for " + std::to_string(n) +
                                " items");
      } else {
        for (std::size_t i = 0; i < n; ++i) {
          if (static_cast<std::size_t>(values[i].first) != i) seen.problems.push_back("map results out of order");
          seen.outcomes[i] = observe(values[i]);
        }
      }
      if (r.api == Api::map_async) {
        // Callbacks run on the I/O thread just after the waiters are woken.
        auto deadline = std::chrono::steady_clock::now() + 5s;
        while (callbacks + error_callbacks == 0 && std::chrono::steady_clock::now() < deadline) {
          std::this_thread::sleep_for(1ms);
        }
        std::this_thread::sleep_for(10ms);
        const int want_ok = error ? 0 : 1, want_error = error ? 1 : 0;
        if (callbacks != want_ok || error_callbacks != want_error) {
          callback_problem = "callback ran " + std::to_string(callbacks) + " times, error_callback " +
                             std::to_string(error_callbacks) + " times";
        }
      }
      break;
    }
  }
  pool.close();
  pool.join();  // every task is over: the run log is complete
  return seen;
}

/// How often each item's function started, from the round's run log.
std::vector<int> read_runs(const std::string& dir, std::size_t n, std::vector<std::string>& problems) {
  std::vector<int> runs(n, 0);
  for (const std::string& line : test::read_lines(dir + "/runs")) {
    std::size_t index = std::stoul(line);
    if (index < n) {
      ++runs[index];
    } else {
      problems.push_back("run log names unknown input " + line);
    }
  }
  return runs;
}

/// "input #i: saw X, expected Y" for each item where they differ.
std::vector<std::string> mismatches(const std::vector<Outcome>& seen, const std::vector<Outcome>& expected) {
  std::vector<std::string> out;
  for (std::size_t i = 0; i < std::max(seen.size(), expected.size()); ++i) {
    const Outcome none = "(nothing)";
    const Outcome& a = i < seen.size() && !seen[i].empty() ? seen[i] : none;
    const Outcome& b = i < expected.size() ? expected[i] : none;
    if (a != b) out.push_back("input #" + std::to_string(i) + ": saw " + a + ", expected " + b);
  }
  return out;
}

std::uint64_t seed_from_env() {
  const char* text = std::getenv("PROCPOOL_STRESS_SEED");
  if (text == nullptr || *text == '\0') return default_seed;
  return std::strtoull(text, nullptr, 0);
}

bool verbose() {
  const char* text = std::getenv("PROCPOOL_STRESS_VERBOSE");
  return text != nullptr && *text != '\0' && std::string(text) != "0";
}

}  // namespace stress_test

namespace stress_test {

POOL_TEST("stress: seeded crashes, exceptions and timeouts across the API, every outcome exact", "[stress][faults]") {
  const std::uint64_t seed = seed_from_env();
  CAPTURE(seed);  // reproduce with PROCPOOL_STRESS_SEED=<seed>
  const auto began = std::chrono::steady_clock::now();
  const auto rounds = make_rounds(seed);
  for (std::size_t k = 0; k < rounds.size(); ++k) {
    const Round& r = rounds[k];
    const std::string plan_text = describe(r);
    CAPTURE(k, plan_text);
    test::TempDir dir;
    const Plan full = simulate(r);
    const bool first_only = r.api == Api::map || r.api == Api::map_async;
    const Plan plan = first_only ? first_error_only(full) : full;

    const auto round_began = std::chrono::steady_clock::now();
    std::string callback_problem;
    Observed seen = run_round<TestType>(r, dir.path(), callback_problem);
    const auto round_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - round_began).count();
    if (verbose()) {
      std::printf("[stress %s seed %llu] round %zu, %lld ms: %s\n",
                  std::string(procpool::to_string(TestType::method)).c_str(), static_cast<unsigned long long>(seed), k,
                  static_cast<long long>(round_ms), plan_text.c_str());
    }

    CHECK(seen.problems == std::vector<std::string>{});
    CHECK(callback_problem == std::string{});
    // Every item, exactly: nothing lost, nothing duplicated, no wrong error.
    CHECK(seen.outcomes.size() == plan.outcomes.size());
    CHECK(mismatches(seen.outcomes, plan.outcomes) == std::vector<std::string>{});

    std::vector<std::string> run_problems;
    auto runs = read_runs(dir.path(), r.behaviours.size(), run_problems);
    CHECK(run_problems == std::vector<std::string>{});
    CHECK(runs == full.runs);  // each item started exactly as often as the model says

    if (r.retries > 0 &&
        std::none_of(r.behaviours.begin(), r.behaviours.end(), [](int b) { return b != normal && b != flaky; })) {
      // Crash-once items under retries=1 all succeed.
      CHECK(std::all_of(seen.outcomes.begin(), seen.outcomes.end(),
                        [](const Outcome& o) { return o.starts_with("value "); }));
    }
  }
  const auto total = std::chrono::steady_clock::now() - began;
  if (verbose()) {
    std::printf("[stress %s seed %llu] total %lld ms\n", std::string(procpool::to_string(TestType::method)).c_str(),
                static_cast<unsigned long long>(seed),
                static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(total).count()));
  }
  CHECK(total < 60s);  // bounded: well under the ctest timeout, even on a loaded machine
}

}  // namespace stress_test
