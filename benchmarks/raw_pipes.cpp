// The physical-limit reference for procpool's transport: plain fork() of the
// workers, one pipe pair each, fixed-size binary messages, no serialization,
// up to `inflight` messages outstanding per worker (procpool's default
// max_tasks_in_flight is 8). One single-threaded parent drives every pipe with
// poll(), non-blocking; a worker reads what has arrived and answers each
// message with its own write as soon as it has it. Prints one JSON line.
//
// usage: procpool_bench_raw <workload> [processes=2] [inflight=8] [key=value...]
//
//   echo        n messages of `size` bytes echoed back       n=100000 size=8  -> tasks/s
//   chunked     n longs in messages of `chunksize` longs,     n=1000000        -> items/s
//               echoed (chunksize 0: ceil(n / (4 * processes)), Python's default)
//   bytes       n messages of `size` bytes echoed back        n=256 size=1MiB  -> MiB/s (one direction)
//   cpu         n messages of ~ms of spin() each              n=40 ms=20 inflight=1 -> % efficiency
//   idle_mem    memory of each idle worker                                    -> MiB beyond shared pages
//   peak_mem    parent's peak RSS after n echo messages       n=100000         -> MiB
//   startup     fork of the workers to the first answer       repeats=10       -> ms (median)
//   recycle     one fresh worker per message                  n=2000           -> workers/s
#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "bench_util.hpp"

namespace {

[[noreturn]] void fail(const char* call) { throw std::system_error(errno, std::generic_category(), call); }

/// What a worker does with each message.
enum class Action { echo, spin };

void write_all(int fd, const char* data, std::size_t size) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      ::_exit(1);
    }
    data += n;
    size -= static_cast<std::size_t>(n);
  }
}

/// The worker: blocking reads of whatever has arrived; one write per answer.
[[noreturn]] void worker_loop(int in, int out, std::size_t size, Action action, long max_tasks) {
  std::vector<char> buffer(std::max<std::size_t>(size, 65536));
  std::size_t have = 0;
  long done = 0;
  const char ready = 'r';
  write_all(out, &ready, 1);
  for (;;) {
    ssize_t n = ::read(in, buffer.data() + have, buffer.size() - have);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) ::_exit(0);
    have += static_cast<std::size_t>(n);
    std::size_t at = 0;
    for (; have - at >= size; at += size) {
      if (action == Action::echo) {
        write_all(out, buffer.data() + at, size);
      } else {
        std::uint64_t iterations;
        std::memcpy(&iterations, buffer.data() + at, 8);
        std::uint64_t result = bench::spin(iterations);
        write_all(out, reinterpret_cast<const char*>(&result), 8);
      }
      if (max_tasks > 0 && ++done >= max_tasks) ::_exit(0);
    }
    if (at > 0) {
      std::memmove(buffer.data(), buffer.data() + at, have - at);
      have -= at;
    }
  }
}

struct Worker {
  pid_t pid = -1;
  int task = -1;    // parent writes
  int result = -1;  // parent reads
  std::size_t inflight = 0;
  bool eof = false;
  // Outgoing: small messages are composed into `out`; large ones are all the
  // shared payload, written straight from it (`big_queued` of them).
  std::vector<char> out;
  std::size_t out_offset = 0;
  std::size_t big_queued = 0, big_offset = 0;
  std::vector<char> in;
  std::size_t in_have = 0;
};

std::vector<int>& open_fds() {
  static std::vector<int> fds;
  return fds;
}

void set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags == -1 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) == -1) fail("fcntl");
}

/// Forks a worker. With `wait_ready`, waits for its first byte and makes its
/// pipes non-blocking; without, leaves both to the caller.
Worker start_worker(std::size_t size, Action action, long max_tasks, std::size_t reply_size, bool wait_ready = true) {
  int task[2], result[2];
  if (::pipe2(task, O_CLOEXEC) == -1 || ::pipe2(result, O_CLOEXEC) == -1) fail("pipe2");
  pid_t pid = ::fork();
  if (pid < 0) fail("fork");
  if (pid == 0) {
    for (int fd : open_fds()) ::close(fd);  // siblings' pipes: they must see EOF
    ::close(task[1]);
    ::close(result[0]);
    worker_loop(task[0], result[1], size, action, max_tasks);
  }
  ::close(task[0]);
  ::close(result[1]);
  Worker w;
  w.pid = pid;
  w.task = task[1];
  w.result = result[0];
  open_fds().push_back(w.task);
  open_fds().push_back(w.result);
  w.in.resize(std::max<std::size_t>(reply_size, 65536));
  if (!wait_ready) return w;
  char ready;
  if (::read(w.result, &ready, 1) != 1) throw std::runtime_error("worker did not start");
  set_nonblocking(w.task);
  set_nonblocking(w.result);
  return w;
}

void close_worker_fds(Worker& w) {
  ::close(w.task);
  ::close(w.result);
  std::erase(open_fds(), w.task);
  std::erase(open_fds(), w.result);
}

void stop_worker(Worker& w) {
  close_worker_fds(w);
  int status;
  while (::waitpid(w.pid, &status, 0) == -1 && errno == EINTR) {
  }
}

struct Run {
  std::size_t n = 0;           // messages
  std::size_t size = 8;        // bytes per message
  std::size_t reply_size = 8;  // bytes per answer
  std::size_t inflight = 8;
  Action action = Action::echo;
  std::uint64_t small_value = 0;  // for spin: the iteration count every message carries
};

constexpr std::size_t small_limit = 4096;

/// Sends `run.n` messages through the workers; returns seconds. Checks the answers.
double drive(std::vector<Worker>& workers, const Run& run, const std::vector<char>& payload) {
  const bool big = run.size > small_limit;
  std::size_t next = 0, done = 0;
  std::uint64_t sum = 0;
  std::vector<pollfd> fds;
  std::vector<std::pair<Worker*, bool>> owners;  // worker, is-result-fd
  auto start = bench::Clock::now();
  while (done < run.n) {
    // Hand out work: fill every worker to its window, least loaded first.
    for (;;) {
      Worker* best = nullptr;
      for (auto& w : workers) {
        if (w.inflight < run.inflight && (best == nullptr || w.inflight < best->inflight)) best = &w;
      }
      if (best == nullptr || next >= run.n) break;
      if (big) {
        ++best->big_queued;
      } else {
        std::uint64_t value = run.action == Action::spin ? run.small_value : next;
        const char* bytes = reinterpret_cast<const char*>(&value);
        best->out.insert(best->out.end(), bytes, bytes + 8);
        best->out.resize(best->out.size() + (run.size - 8));
      }
      ++best->inflight;
      ++next;
    }
    // Write what can be written now.
    for (auto& w : workers) {
      for (;;) {
        const char* data;
        std::size_t left;
        if (big) {
          if (w.big_queued == 0) break;
          data = payload.data() + w.big_offset;
          left = run.size - w.big_offset;
        } else {
          if (w.out_offset == w.out.size()) break;
          data = w.out.data() + w.out_offset;
          left = w.out.size() - w.out_offset;
        }
        ssize_t n = ::write(w.task, data, left);
        if (n < 0) {
          if (errno == EAGAIN || errno == EINTR) break;
          fail("write");
        }
        auto written = static_cast<std::size_t>(n);
        if (big) {
          w.big_offset += written;
          if (w.big_offset == run.size) {
            w.big_offset = 0;
            --w.big_queued;
          }
        } else {
          w.out_offset += written;
          if (w.out_offset == w.out.size()) {
            w.out.clear();
            w.out_offset = 0;
          }
        }
      }
    }
    fds.clear();
    owners.clear();
    for (auto& w : workers) {
      if (!w.eof) {
        fds.push_back({w.result, POLLIN, 0});
        owners.push_back({&w, true});
      }
      if ((big && w.big_queued > 0) || (!big && w.out_offset < w.out.size())) {
        fds.push_back({w.task, POLLOUT, 0});
        owners.push_back({&w, false});
      }
    }
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      fail("poll");
    }
    for (std::size_t k = 0; k < fds.size(); ++k) {
      if (fds[k].revents == 0 || !owners[k].second) continue;
      Worker& w = *owners[k].first;
      for (;;) {
        ssize_t n = ::read(w.result, w.in.data() + w.in_have, w.in.size() - w.in_have);
        if (n < 0) {
          if (errno == EAGAIN || errno == EINTR) break;
          fail("read");
        }
        if (n == 0) {
          if (w.inflight > 0) throw std::runtime_error("a worker died");
          w.eof = true;  // a worker with max_tasks that answered its last
          break;
        }
        w.in_have += static_cast<std::size_t>(n);
        std::size_t at = 0;
        for (; w.in_have - at >= run.reply_size; at += run.reply_size) {
          if (big) {
            if (w.in[at + run.reply_size / 2] != payload[run.reply_size / 2]) throw std::runtime_error("bad echo");
          } else {
            std::uint64_t value;
            std::memcpy(&value, w.in.data() + at, 8);
            sum += value;
          }
          --w.inflight;
          ++done;
        }
        if (at > 0) {
          std::memmove(w.in.data(), w.in.data() + at, w.in_have - at);
          w.in_have -= at;
        }
      }
    }
  }
  double s = bench::seconds_since(start);
  if (!big && run.action == Action::echo && sum != run.n * (run.n - 1) / 2) throw std::runtime_error("bad sum");
  if (run.action == Action::spin && sum == 0) throw std::runtime_error("bad spin");
  return s;
}

std::vector<Worker> start_workers(std::size_t processes, const Run& run) {
  std::vector<Worker> workers;
  for (std::size_t i = 0; i < processes; ++i) workers.push_back(start_worker(run.size, run.action, 0, run.reply_size));
  return workers;
}

void stop_workers(std::vector<Worker>& workers) {
  for (auto& w : workers) stop_worker(w);
  workers.clear();
}

double run_pool(std::size_t processes, const Run& run) {
  std::vector<char> payload(run.size > small_limit ? run.size : 0);
  for (std::size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<char>(i * 7);
  auto workers = start_workers(processes, run);
  // Warm-up: one message per worker, untimed.
  Run warm = run;
  warm.n = processes;
  if (run.action == Action::spin) warm.small_value = 1000;
  drive(workers, warm, payload);
  double s = drive(workers, run, payload);
  stop_workers(workers);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    fmt::print(stderr, "usage: {} <echo|chunked|bytes|cpu|idle_mem|peak_mem|startup|recycle> [key=value...]\n",
               argv[0]);
    return 2;
  }
  try {
    const std::string workload = argv[1];
    const bench::Args args(argc, argv, 2);
    const std::size_t processes = args.size("processes", 2);
    Run run;
    run.inflight = args.size("inflight", 8);
    bench::Json out("raw", workload);
    out.add("method", "fork").add("processes", processes);

    if (workload == "echo") {
      run.n = args.size("n", 100'000);
      run.size = run.reply_size = std::max<std::size_t>(8, args.size("size", 8));
      double s = run_pool(processes, run);
      out.add("n", run.n)
          .add("size", run.size)
          .add("inflight", run.inflight)
          .add("seconds", s)
          .add("value", static_cast<double>(run.n) / s)
          .add("unit", "tasks/s");
    } else if (workload == "chunked") {
      const std::size_t items = args.size("n", 1'000'000);
      std::size_t chunk = args.size("chunksize", 0);
      if (chunk == 0) chunk = (items + 4 * processes - 1) / (4 * processes);
      run.n = (items + chunk - 1) / chunk;
      run.size = run.reply_size = 8 * chunk;
      double s = run_pool(processes, run);
      out.add("n", items)
          .add("chunksize", chunk)
          .add("inflight", run.inflight)
          .add("seconds", s)
          .add("value", static_cast<double>(items) / s)
          .add("unit", "items/s");
    } else if (workload == "bytes") {
      run.n = args.size("n", 256);
      run.size = run.reply_size = std::max<std::size_t>(small_limit + 1, args.size("size", std::size_t{1} << 20));
      double s = run_pool(processes, run);
      out.add("n", run.n)
          .add("size", run.size)
          .add("inflight", run.inflight)
          .add("seconds", s)
          .add("value", static_cast<double>(run.n) * static_cast<double>(run.size) / bench::mib / s)
          .add("unit", "MiB/s");
    } else if (workload == "cpu") {
      run.n = args.size("n", 40);
      run.inflight = args.size("inflight", 1);
      run.action = Action::spin;
      run.small_value = bench::calibrate_spin(static_cast<double>(args.num("ms", 20)));
      auto serial = [&] {
        auto start = bench::Clock::now();
        std::uint64_t x = 0;
        for (std::size_t i = 0; i < run.n; ++i) x += bench::spin(run.small_value);
        if (x == 1) throw std::runtime_error("spin");
        return bench::seconds_since(start);
      };
      double before = serial();
      double parallel = run_pool(processes, run);
      double serial_s = (before + serial()) / 2;
      out.add("n", run.n)
          .add("inflight", run.inflight)
          .add("task_ms", serial_s / static_cast<double>(run.n) * 1000)
          .add("serial_s", serial_s)
          .add("pool_s", parallel)
          .add("value", 100 * serial_s / (parallel * static_cast<double>(processes)))
          .add("unit", "% efficiency");
    } else if (workload == "idle_mem") {
      auto workers = start_workers(processes, run);
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      bench::ProcessMemory sum;
      for (auto& w : workers) {
        auto m = bench::process_memory(w.pid);
        sum.rss += m.rss;
        sum.pss += m.pss;
        sum.private_ += m.private_;
      }
      stop_workers(workers);
      const auto k = static_cast<double>(processes);
      out.add("rss_mib", sum.rss / k)
          .add("pss_mib", sum.pss / k)
          .add("private_mib", sum.private_ / k)
          .add("value", sum.private_ / k)
          .add("unit", "MiB private");
    } else if (workload == "peak_mem") {
      run.n = args.size("n", 100'000);
      double before = bench::peak_rss_mib();
      double s = run_pool(processes, run);
      out.add("n", run.n)
          .add("seconds", s)
          .add("hwm_before_mib", before)
          .add("value", bench::peak_rss_mib())
          .add("unit", "MiB peak RSS");
    } else if (workload == "startup") {
      // Fork every worker, then one message to the first: its ready byte and
      // answer are the first result.
      const long repeats = args.num("repeats", 10);
      std::vector<double> ms;
      for (long i = 0; i < repeats; ++i) {
        auto start = bench::Clock::now();
        std::vector<Worker> workers;
        for (std::size_t k = 0; k < processes; ++k) workers.push_back(start_worker(8, Action::echo, 0, 8, false));
        std::uint64_t message = 42;
        write_all(workers[0].task, reinterpret_cast<const char*>(&message), 8);
        char answer[9];
        for (std::size_t got = 0; got < sizeof(answer);) {
          ssize_t n = ::read(workers[0].result, answer + got, sizeof(answer) - got);
          if (n <= 0) throw std::runtime_error("no answer");
          got += static_cast<std::size_t>(n);
        }
        ms.push_back(bench::seconds_since(start) * 1000);
        stop_workers(workers);
      }
      std::sort(ms.begin(), ms.end());
      out.add("repeats", repeats).add("value", ms[ms.size() / 2]).add("unit", "ms");
    } else if (workload == "recycle") {
      // `processes` slots; each worker answers one message and exits, and a
      // fresh one is forked for its slot as soon as its answer is in. Exited
      // workers are reaped in passing.
      const std::size_t n = args.size("n", 2000);
      std::size_t launched = 0, done = 0, reaped = 0;
      std::vector<Worker> slots(processes);
      std::vector<std::size_t> got(processes, 0);
      auto launch = [&](std::size_t k) {
        slots[k] = start_worker(8, Action::echo, 1, 8, false);
        got[k] = 0;
        std::uint64_t message = launched++;
        write_all(slots[k].task, reinterpret_cast<const char*>(&message), 8);
      };
      auto start = bench::Clock::now();
      for (std::size_t k = 0; k < processes && launched < n; ++k) launch(k);
      std::vector<pollfd> fds(processes);
      while (done < n) {
        for (std::size_t k = 0; k < processes; ++k) fds[k] = {slots[k].pid > 0 ? slots[k].result : -1, POLLIN, 0};
        if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) fail("poll");
        for (std::size_t k = 0; k < processes; ++k) {
          if (fds[k].revents == 0) continue;
          char buffer[16];
          ssize_t r = ::read(slots[k].result, buffer, 9 - got[k]);  // ready byte + answer
          if (r <= 0) throw std::runtime_error("a worker died");
          got[k] += static_cast<std::size_t>(r);
          if (got[k] < 9) continue;
          ++done;
          close_worker_fds(slots[k]);
          slots[k].pid = -1;
          if (launched < n) launch(k);
        }
        int status;
        while (::waitpid(-1, &status, WNOHANG) > 0) ++reaped;
      }
      int status;
      while (reaped<launched&& ::waitpid(-1, &status, 0)> 0) ++reaped;
      double s = bench::seconds_since(start);
      out.add("n", n).add("seconds", s).add("value", static_cast<double>(n) / s).add("unit", "workers/s");
    } else {
      fmt::print(stderr, "unknown workload {}\n", workload);
      return 2;
    }
    out.print();
  } catch (const std::exception& e) {
    fmt::print(stderr, "procpool_bench_raw: {}\n", e.what());
    return 1;
  }
  return 0;
}
