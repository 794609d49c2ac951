// procpool - the output relay: when a pool does not let its workers inherit
// the parent's stdout and stderr, each worker's fds 1 and 2 are pipes, and
// one thread per pool reads them all, cuts what arrives into lines, and
// hands on each whole line: with one write() to the parent's fd 1 or 2
// (optionally prefixed), or to Options::on_worker_output.
//
// It is a thread of its own rather than part of the dispatcher's poll loop so
// that a slow terminal or a slow callback never delays tasks and results.
#pragma once

#include <sys/eventfd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "../worker_output.hpp"
#include "handlers.hpp"
#include "launcher.hpp"
#include "system.hpp"
#include "thread.hpp"

namespace procpool::detail {

class OutputRelay {
 public:
  /// Longest line kept whole; a longer one is handed on in pieces this long,
  /// so a worker printing without newlines cannot grow the parent's memory.
  static constexpr std::size_t max_line = 64 * 1024;

  /// The pipes for one worker about to start.
  struct Pipes {
    Pipe out;
    Pipe err;
    /// The ends the worker gets as its fds 1 and 2.
    ChildStdio child() const { return {out.write.get(), err.write.get()}; }
  };

  OutputRelay(WorkerOutput mode, std::function<void(const WorkerLine&)> callback)
      : prefixed_(mode == WorkerOutput::prefixed), callback_(std::move(callback)) {
    wake_ = make_tracked("eventfd", [] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); });
    thread_ = InternalThread("the pool's output relay", [this] { run(); });
  }

  OutputRelay(const OutputRelay&) = delete;
  OutputRelay& operator=(const OutputRelay&) = delete;
  ~OutputRelay() { finish(std::chrono::milliseconds(0), std::chrono::milliseconds(0)); }

  /// Pipes for a worker about to be launched (close-on-exec, registered).
  static Pipes open() { return {make_pipe(), make_pipe()}; }

  /// Starts relaying a launched worker's output. Takes the read ends; the
  /// write ends close when `pipes` goes, so only the worker holds them and
  /// its exit is seen as EOF.
  void attach(std::size_t slot, pid_t pid, Pipes pipes) {
    set_nonblocking(pipes.out.read.get());
    set_nonblocking(pipes.err.read.get());
    open_pipes_.fetch_add(2, std::memory_order_relaxed);
    {
      std::lock_guard lock(mutex_);
      incoming_.push_back(Source{slot, pid, WorkerStream::out, std::move(pipes.out.read), {}});
      incoming_.push_back(Source{slot, pid, WorkerStream::err, std::move(pipes.err.read), {}});
    }
    wake();
  }

  /// Pipes it still reads, or has yet to: two for each worker alive, and
  /// two for each ended one until their EOF is read and they are closed.
  std::size_t open_pipes() const noexcept { return open_pipes_.load(std::memory_order_acquire); }

  /// Delivers what is left, then stops the thread: waits until every pipe
  /// has reached EOF (all workers have exited), but gives up once nothing
  /// has arrived for `quiet` or after `limit` in all (a grandchild of a worker
  /// may hold its stdout open for ever). Partial last lines are delivered.
  /// Idempotent; never throws. From Options::on_worker_output (the relay's
  /// own thread) it only asks the relay to stop: a later finish() waits.
  void finish(std::chrono::milliseconds quiet, std::chrono::milliseconds limit) noexcept {
    {
      std::lock_guard lock(mutex_);
      if (!stop_) stop_ = Stop{quiet, Clock::now() + limit};
    }
    wake();
    if (thread_.is_current()) return;
    std::lock_guard join_lock(join_mutex_);
    thread_.join();
  }

 private:
  using Clock = std::chrono::steady_clock;

  struct Source {
    std::size_t slot;
    pid_t pid;
    WorkerStream stream;
    Fd fd;
    std::string pending;  // bytes read after the last newline
  };
  struct Stop {
    std::chrono::milliseconds quiet;
    Clock::time_point deadline;
  };

  void wake() noexcept {
    std::uint64_t one = 1;
    [[maybe_unused]] auto n = ::write(wake_.get(), &one, sizeof(one));
  }

  void run() noexcept {
    std::vector<Source> sources;
    std::vector<pollfd> fds;
    for (;;) {
      std::optional<Stop> stop;
      {
        std::lock_guard lock(mutex_);
        for (auto& s : incoming_) sources.push_back(std::move(s));
        incoming_.clear();
        stop = stop_;
      }
      if (stop && sources.empty()) break;
      int timeout_ms = -1;
      if (stop) {
        auto left = std::chrono::ceil<std::chrono::milliseconds>(stop->deadline - Clock::now());
        timeout_ms = static_cast<int>(std::clamp<long long>(std::min(left, stop->quiet).count(), 0, 60'000));
      }
      fds.assign(1, {wake_.get(), POLLIN, 0});
      for (auto& s : sources) fds.push_back({s.fd.get(), POLLIN, 0});
      int ready = retry_eintr([&] { return ::poll(fds.data(), fds.size(), timeout_ms); });
      if (ready < 0) break;
      if (fds[0].revents != 0) {
        std::uint64_t drained;
        [[maybe_unused]] auto n = ::read(wake_.get(), &drained, sizeof(drained));
      }
      // Quiet for too long, or out of time: what has not reached EOF by now
      // is held open by someone other than our (dead) workers.
      if (stop && (ready == 0 || Clock::now() >= stop->deadline)) break;
      std::size_t kept = 0;
      for (std::size_t k = 0; k < sources.size(); ++k) {
        bool open = fds[k + 1].revents == 0 || read_from(sources[k]);
        if (!open) flush_partial(sources[k]);
        if (open && kept != k) sources[kept] = std::move(sources[k]);
        kept += open;
      }
      const std::size_t closed = sources.size() - kept;
      sources.resize(kept);  // closes the pipes at EOF
      if (closed != 0) open_pipes_.fetch_sub(closed, std::memory_order_release);
    }
    for (auto& s : sources) {
      drain_available(s);
      flush_partial(s);
    }
  }

  /// Reads what is there and hands on its whole lines; false at EOF (or error).
  bool read_from(Source& s) {
    ssize_t n = retry_eintr([&] { return ::read(s.fd.get(), buffer_.data(), buffer_.size()); });
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK;
    if (n == 0) return false;
    std::size_t scan = s.pending.size();  // no newline before this
    s.pending.append(buffer_.data(), static_cast<std::size_t>(n));
    std::size_t begin = 0;  // where the current line starts
    for (;;) {
      const char* data = s.pending.data();
      const void* newline = std::memchr(data + scan, '\n', s.pending.size() - scan);
      const std::size_t end =
          newline != nullptr ? static_cast<std::size_t>(static_cast<const char*>(newline) - data) : s.pending.size();
      if (end - begin > max_line) {
        deliver(s, std::string_view(data + begin, max_line));
        begin += max_line;
        scan = std::max(scan, begin);
        continue;
      }
      if (newline == nullptr) break;
      deliver(s, std::string_view(data + begin, end - begin));
      begin = scan = end + 1;
    }
    s.pending.erase(0, begin);
    return true;
  }

  /// At the end, without waiting: whatever is already in the pipe.
  void drain_available(Source& s) {
    for (int guard = 0; guard < 64; ++guard) {
      pollfd p{s.fd.get(), POLLIN, 0};
      if (::poll(&p, 1, 0) <= 0 || !read_from(s)) return;
    }
  }

  void flush_partial(Source& s) {
    if (!s.pending.empty()) deliver(s, s.pending);
    s.pending.clear();
  }

  void deliver(const Source& s, std::string_view text) {
    if (callback_) {
      try {
        callback_(WorkerLine{s.slot, s.pid, s.stream, std::string(text)});
      } catch (...) {
        std::string what = "procpool: Options::on_worker_output threw " + current_exception_summary() + "\n";
        write_whole(2, what);
      }
      return;
    }
    // fmt::format, not format_to: format_to would compile all of fmt's
    // formatting into every program that includes procpool.
    std::string line = prefixed_ ? fmt::format("[worker {} pid {}] ", s.slot, s.pid) : std::string();
    line.reserve(line.size() + text.size() + 1);
    line.append(text);
    line.push_back('\n');
    write_whole(s.stream == WorkerStream::out ? 1 : 2, line);
  }

  /// One write() for the line, so it lands whole; a pipe may take less than
  /// all of a line over PIPE_BUF, and the rest follows. One lock for every
  /// pool's relay, so two pools' lines never mix either. The wait for room
  /// gives up once finish()'s time is out: a stdout that nobody reads must
  /// not hang terminate() or join() (a line longer than the room a full pipe
  /// frees at once can still block in write()).
  void write_whole(int fd, std::string_view line) noexcept {
    static std::mutex terminal;
    std::lock_guard lock(terminal);
    while (!line.empty()) {
      pollfd room{fd, POLLOUT, 0};
      const int wait_ms = out_of_time() ? 0 : 100;  // out of time: drop the rest at once
      int ready = retry_eintr([&] { return ::poll(&room, 1, wait_ms); });
      if (ready == 0) {
        if (out_of_time()) return;  // the line is dropped
        continue;
      }
      ssize_t n = retry_eintr([&] { return ::write(fd, line.data(), line.size()); });
      if (n <= 0) return;  // stdout closed or full of errors: the line is dropped, as a worker's would be
      line.remove_prefix(static_cast<std::size_t>(n));
    }
  }

  bool out_of_time() {
    std::lock_guard lock(mutex_);
    return stop_ && Clock::now() >= stop_->deadline;
  }

  const bool prefixed_;
  const std::function<void(const WorkerLine&)> callback_;
  std::vector<char> buffer_ = std::vector<char>(max_line);  // the relay thread's
  Fd wake_;
  std::mutex mutex_;
  std::vector<Source> incoming_;
  std::optional<Stop> stop_;
  std::atomic<std::size_t> open_pipes_{0};
  std::mutex join_mutex_;
  InternalThread thread_;  // last: it runs on every member above
};

}  // namespace procpool::detail
