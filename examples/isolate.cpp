// isolate: runs a crash-prone "third-party" function over many inputs
// without letting it take the program down. On some inputs the function
// segfaults, aborts, hangs or throws; each input runs in a worker process,
// so a crash costs that input only (procpool::WorkerLost, naming the
// signal), a hang is cut off by Options::task_timeout (procpool::TaskTimeout),
// and an exception comes back as procpool::RemoteError. Shows imap with one
// item per task, reading each item's outcome with next() inside try/catch,
// and a pool that keeps working after its workers die.
//
//   ./isolate [N] [--timeout-ms T] [--processes P]
//
// Runs inputs 0 .. N-1 (N defaults to 24; T, the per-input time limit, to
// 1000 ms), prints one line per input and a summary line
// "ok=... raised=... crashed=... timed_out=...". Exits 0 whatever the
// inputs did: surviving them is the point. Exits 2 on a bad argument.
#include <procpool/procpool.hpp>

#include <fmt/core.h>

#include <sys/resource.h>
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <string>
#include <string_view>

namespace {

// Stands in for a library you cannot fix: deterministic, but it crashes or
// hangs on some inputs instead of reporting an error.
namespace thirdparty {

std::int64_t checksum(std::int64_t x) {
  if (x % 7 == 3) {
    // A real invalid write, not raise(SIGSEGV): the volatile pointer keeps
    // the compiler from seeing the null and replacing the store with a trap.
    int* volatile pointer = nullptr;
    *pointer = 1;
  }
  if (x % 7 == 5) std::abort();  // a failed assertion deep inside
  if (x % 11 == 9) {
    for (;;) ::pause();  // a deadlock: only a signal ends it
  }
  if (x % 13 == 0) throw std::invalid_argument(fmt::format("checksum({}): input not supported", x));
  auto h = static_cast<std::uint64_t>(x);
  for (int round = 0; round < 1000; ++round) h = h * 6364136223846793005u + 1442695040888963407u;
  return static_cast<std::int64_t>(h % 1'000'000'007);
}

}  // namespace thirdparty

template <class T>
bool parse_number(std::string_view text, T& value) {
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return error == std::errc{} && end == text.data() + text.size();
}

// Runs once in each worker: a crashing input should cost a line in the
// report, not a core file in the current directory per crash.
void no_core_files() {
  const rlimit none{0, 0};
  ::setrlimit(RLIMIT_CORE, &none);
}

// "SIGSEGV (Segmentation fault)", or "exit code 3" when no signal killed it.
std::string how_it_died(const procpool::WorkerLost& lost) {
  if (lost.signal() == 0) return fmt::format("exit code {}", lost.exit_code());
  const char* abbrev = ::sigabbrev_np(lost.signal());
  return fmt::format("SIG{} ({})", abbrev != nullptr ? abbrev : "?", ::strsignal(lost.signal()));
}

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);

  std::int64_t n = 24;
  std::int64_t timeout_ms = 1000;
  std::size_t processes = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    bool ok = false;
    if (arg == "--timeout-ms" && i + 1 < argc) {
      ok = parse_number(argv[++i], timeout_ms) && timeout_ms > 0;
    } else if (arg == "--processes" && i + 1 < argc) {
      ok = parse_number(argv[++i], processes);
    } else {
      ok = parse_number(arg, n) && n >= 0;
    }
    if (!ok) {
      fmt::print(stderr, "usage: {} [N] [--timeout-ms T] [--processes P]\n", argv[0]);
      return 2;
    }
  }

  procpool::Pool pool({
      .processes = processes,
      .initializer = procpool::initializer<no_core_files>(),
      // A crash here is deterministic, so running it again would crash
      // again; for flaky crashes (a race in the library), .retries = 2
      // reruns a lost input on a fresh worker before reporting it.
      .retries = 0,
      .task_timeout = std::chrono::milliseconds(timeout_ms),
  });

  // chunksize 1: each input is its own task, so a crash or a hang fails
  // that input alone; with larger chunks it would fail the whole chunk.
  std::vector<std::int64_t> inputs(static_cast<std::size_t>(n));
  for (std::int64_t x = 0; x < n; ++x) inputs[static_cast<std::size_t>(x)] = x;
  auto results = pool.imap<thirdparty::checksum>(inputs, 1);
  std::size_t ok = 0, raised = 0, crashed = 0, timed_out = 0;
  // imap keeps input order, so the k-th outcome is input k. next() consumes
  // an item whether it holds a value or throws its error.
  for (std::int64_t x = 0;; ++x) {
    try {
      std::optional<std::int64_t> value = results.next();
      if (!value) break;
      fmt::print("input {:>3}: ok, checksum {}\n", x, *value);
      ++ok;
    } catch (const procpool::WorkerLost& e) {
      fmt::print("input {:>3}: crashed, worker killed by {}\n", x, how_it_died(e));
      ++crashed;
    } catch (const procpool::TaskTimeout&) {
      fmt::print("input {:>3}: timed out after {} ms, worker stopped\n", x, timeout_ms);
      ++timed_out;
    } catch (const procpool::RemoteError& e) {
      fmt::print("input {:>3}: raised {}: {}\n", x, e.type_name(), e.message());
      ++raised;
    }
  }

  // The pool replaced every worker it lost and is as good as new.
  const std::int64_t after = pool.apply<thirdparty::checksum>(std::int64_t{1});
  fmt::print("pool still works after the crashes: checksum(1) = {}\n", after);
  fmt::print("inputs={} ok={} raised={} crashed={} timed_out={}\n", n, ok, raised, crashed, timed_out);
  return 0;
}
