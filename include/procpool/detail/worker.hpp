// procpool - the loop a worker process runs, whatever started it.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "claims.hpp"
#include "handlers.hpp"
#include "memory_gauge.hpp"
#include "process_title.hpp"
#include "protocol.hpp"
#include "registry.hpp"
#include "serialize.hpp"
#include "shm.hpp"
#include "system.hpp"

namespace procpool::detail {

/// Exit codes a worker uses to tell the parent why it stopped before READY.
inline constexpr int exit_initializer_failed = 3;
inline constexpr int exit_protocol_error = 4;

/// In a worker: whether the task running now came with `task_more_queued`
/// set, that is, whether the worker will look for its next task before it
/// sleeps if this one is short. For tests.
inline bool& running_task_more_queued() {
  static bool more_queued = false;
  return more_queued;
}

/// Reads whole frames from a blocking fd, buffering what arrives early.
class FrameReader {
 public:
  FrameReader(int fd, std::size_t max_payload) : fd_(fd), max_payload_(max_payload) {}

  /// Frames with a longer payload are refused (next() throws).
  void set_max_payload(std::size_t max_payload) { max_payload_ = max_payload; }

  /// Before a read would block: while `wanted()`, waits up to `after` for
  /// bytes, and each time none came calls `idle()`; then blocks as usual.
  void on_idle(std::function<bool()> wanted, std::function<void()> idle, std::chrono::milliseconds after) {
    idle_wanted_ = std::move(wanted);
    idle_ = std::move(idle);
    idle_after_ = after;
  }

  /**
   * Whether to look for the next task for a while before sleeping in
   * read(): for short tasks, whose round trips would otherwise cost a
   * sleep and a wake-up of this process each (see fill()).
   */
  void spin_when_idle(bool on) { spin_wanted_ = on; }

  /// Longest look for the next task before sleeping (spin_when_idle()).
  static constexpr std::chrono::microseconds spin_budget{50};
  /// Looks in a row that found nothing (for tests).
  int spin_misses() const { return spin_misses_; }

  /// false on a clean EOF between frames; throws ProtocolError-worthy
  /// std::runtime_error on a truncated or oversized frame.
  bool next(FrameView& frame) {
    // The previous frame's bytes are dead once the caller asks for the next.
    begin_ = pending_;
    for (;;) {
      Parse parsed = parse_frame(buffer_.data() + begin_, end_ - begin_, max_payload_, frame);
      if (parsed == Parse::complete) {
        pending_ = begin_ + frame_header_size + frame.size;
        return true;
      }
      if (parsed == Parse::too_large) throw std::runtime_error("frame larger than max_message_bytes");
      if (!fill()) {
        if (end_ == begin_) return false;
        throw std::runtime_error("pipe closed in the middle of a frame");
      }
    }
  }

 private:
  bool fill() {
    if (begin_ > 0) {  // keep the unread tail at the front
      std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      pending_ -= begin_;
      begin_ = 0;
    }
    std::size_t want = std::max<std::size_t>(end_ + 65536, buffer_.size());
    if (end_ >= frame_header_size) {  // make room for the whole frame at once
      want = std::max(want, frame_header_size + get<std::uint32_t>(buffer_.data()));
    }
    if (buffer_.size() < want) buffer_.resize(want);
    // Again while there is still something to let go of (a buffer the
    // parent was still reading last time).
    while (idle_ && idle_wanted_()) {
      pollfd p{fd_, POLLIN, 0};
      const int ms = static_cast<int>(idle_after_.count());
      if (retry_eintr([&] { return ::poll(&p, 1, ms); }) != 0) break;
      idle_();
    }
    spin();
    ssize_t n = retry_eintr([&] { return ::read(fd_, buffer_.data() + end_, buffer_.size() - end_); });
    if (n < 0) throw_errno("read");
    if (n == 0) return false;
    end_ += static_cast<std::size_t>(n);
    return true;
  }

  /**
   * Out of tasks: looks for more for up to spin_budget, giving the CPU to
   * any other runnable thread between looks (on a machine with few cores,
   * often the parent's I/O thread that is to send them). The parent's next
   * batch then finds this process awake: no wake-up (on a VM, an
   * inter-processor interrupt) on its path or ours. A look that comes up
   * empty makes the next ones rarer (1, 3, 7 ... up to 63 times out of
   * turn skipped), so a pool fed slowly stops spending CPU on them.
   */
  void spin() {
    if (!spin_wanted_) return;
    if (spin_skip_ > 0) {
      --spin_skip_;
      return;
    }
    const auto until = std::chrono::steady_clock::now() + spin_budget;
    pollfd p{fd_, POLLIN, 0};
    for (;;) {
      if (::poll(&p, 1, 0) != 0) {  // bytes, EOF or an error: read() takes it from here
        spin_misses_ = 0;
        return;
      }
      if (std::chrono::steady_clock::now() >= until) break;
      ::sched_yield();
    }
    spin_misses_ = std::min(spin_misses_ + 1, 6);
    spin_skip_ = (1 << spin_misses_) - 1;
  }

  int fd_;
  std::size_t max_payload_;
  bool spin_wanted_ = false;
  int spin_misses_ = 0;  // looks in a row that found nothing
  int spin_skip_ = 0;    // idle moments left to sleep through at once
  std::function<bool()> idle_wanted_;
  std::function<void()> idle_;
  std::chrono::milliseconds idle_after_{0};
  std::vector<char> buffer_;
  std::size_t begin_ = 0, end_ = 0, pending_ = 0;
};

/// Signals and parent-death handling every worker needs, whatever started it.
/// `parent` is the process that started it.
inline void prepare_worker_process(pid_t parent) {
  // Ctrl-C goes to the whole foreground process group; only the parent
  // should react, and it stops the workers itself. SIGTERM (how the pool
  // stops a worker) must just end it, whatever handler a fork inherited.
  ::signal(SIGINT, SIG_IGN);
  ::signal(SIGTERM, SIG_DFL);
  ::signal(SIGPIPE, SIG_DFL);
  // A crash in a task is the pool's to report (WorkerLost, naming the
  // signal): a crash handler the program installed (and a fork inherited)
  // must not run in the worker, where it would report the parent's crash,
  // or run its atexit handlers. As under posix_spawn, where main() never
  // got to install it.
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS}) {
    struct sigaction current {};
    if (::sigaction(sig, nullptr, &current) == 0 && current.sa_handler != SIG_DFL) ::signal(sig, SIG_DFL);
  }
  // A fork inherits the I/O thread's mask, which blocks everything; only now
  // that the dispositions are ours may a signal that arrived early be taken.
  sigset_t none;
  sigemptyset(&none);
  ::pthread_sigmask(SIG_SETMASK, &none, nullptr);
  // Die with the thread that started us, even if it is SIGKILLed; and if it
  // died before the request took effect, go now.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(0);
}

/// In a worker whose fds 1 and 2 are pipes to the parent's output relay:
/// stdio would buffer a pipe in blocks of 4 KiB, so a line could sit in the
/// worker for the whole of a long task, or be lost if it crashes. Called
/// before anything is printed (in a fork, after the parent's fflush).
inline void use_relayed_output() { std::setvbuf(stdout, nullptr, _IOLBF, BUFSIZ); }

/// Sends on what the task printed without a newline (or through an unsynced
/// std::cout), before its result: the output relay reads it while the
/// parent takes the result.
inline void flush_worker_output() {
  std::cout.flush();
  std::cerr.flush();
  std::fflush(stdout);
  std::fflush(stderr);
}

inline bool send_frame(int fd, const std::vector<char>& frame) { return write_all(fd, frame.data(), frame.size()); }

inline void send_failure_frame(int fd, FrameKind kind, const std::string& type, const std::string& message) {
  std::vector<char> out;
  std::size_t start = begin_frame(out, kind);
  {
    Encoder encoder(out);
    encoder(type, message);
  }
  finish_frame(out, start);
  send_frame(fd, out);
}

/// Runs the worker protocol on an already-connected pair of fds; returns the
/// exit code. `relayed`: stdout and stderr go to the parent's output relay.
/// `claims_fd`: the pool's claim area for this worker (claims.hpp), or -1.
/// One worker's loop: its state, and the steps worker_main runs. Not moved
/// once started (its idle callbacks refer to it).
class WorkerLoop {
 public:
  /// A step's result that lets the loop go on; any other is an exit code.
  static constexpr int go_on = -1;

  WorkerLoop(int task_fd, int result_fd, bool relayed, int claims_fd)
      : claims_(ClaimArea::adopt(claims_fd)),
        result_fd_(result_fd),
        relayed_(relayed),
        reader_(task_fd, std::size_t{1} << 31),
        shm_writer_("procpool-result", true) {
    running_item().word = claims_.running_word();
  }
  WorkerLoop(const WorkerLoop&) = delete;
  WorkerLoop& operator=(const WorkerLoop&) = delete;

  /// Says it started, reads its configuration, sets itself up, runs the
  /// initializer and says it is ready.
  int start() {
    {
      // First of all: whatever happens from here on (a crashing initializer),
      // the parent knows this process reached procpool's loop.
      std::vector<char> hello;
      encode_empty(hello, FrameKind::started);
      if (!send_frame(result_fd_, hello)) return 0;
    }
    FrameView frame{};
    if (!reader_.next(frame)) return 0;
    WorkerConfig config;
    if (!WorkerConfig::decode(frame, config)) return exit_protocol_error;
    ProcessTitle::instance().set("procpool worker " + std::to_string(config.slot), "w" + std::to_string(config.slot));
    max_tasks_ = config.max_tasks;
    max_message_ = config.max_message;
    // The parent sends tasks up to this size (through this pipe where there
    // is no shared memory between us), and a reference to one in shared
    // memory whatever its size; until now, only the configuration came.
    reader_.set_max_payload(std::max(max_message_, ShmLocation::encoded_size));
    max_rss_ = config.max_rss;
    shm_threshold_ = config.shm_threshold;
    remote_ = config.remote != 0;
    // Large results go through shared memory only if this worker can open the
    // pool's (the parent then opens ours the same way).
    shm_ = shm_threshold_ != 0 && can_reach_shm(config.pool_pid, config.probe_fd, config.probe_id);
    // Waiting for work with shared memory or kept argument storage in hand:
    // after a while, let go of the idle result buffers (telling the parent),
    // of the pool's buffers and of the arguments' storage.
    reader_.on_idle([this] { return spares_ || !shm_writer_.empty() || !shm_reader_.empty(); },
                    [this] {
                      std::vector<char> drops;
                      shm_writer_.trim(std::chrono::steady_clock::now(), &drops);
                      shm_reader_.clear();
                      release_spares();
                      spares_ = false;
                      if (!drops.empty()) send_frame(result_fd_, drops);
                    },
                    ShmWriter::keep_idle_for);
    if (config.address_space_limit != 0) {
      // On top of what the worker has mapped at start: under fork, that is
      // the parent's address space, which is not the tasks'.
      address_space_limit_ = config.address_space_limit;
      const std::size_t start = statm_bytes().address_space;
      const rlim_t most = start > RLIM_INFINITY - address_space_limit_ ? RLIM_INFINITY : start + address_space_limit_;
      rlimit limit{most, most};
      ::setrlimit(RLIMIT_AS, &limit);
      memory_limit_note() = address_space_limit_ >= (std::size_t{1} << 20)
                                ? fmt::format("Options::memory_limit_per_child is {} MiB", address_space_limit_ >> 20)
                                : fmt::format("Options::memory_limit_per_child is {} bytes", address_space_limit_);
    }
    if (config.initializer != 0) {
      try {
        const HandlerRegistry::Entry* entry = HandlerRegistry::instance().find(config.initializer);
        if (entry == nullptr) throw std::runtime_error("the initializer is not registered in this binary");
        Decoder decoder(config.initializer_state.data(), config.initializer_state.size());
        Encoder unused(out_);
        entry->fn(decoder, 0, unused);
      } catch (...) {
        send_failure_frame(result_fd_, FrameKind::init_failed, current_exception_type_name(),
                           current_exception_message());
        return exit_initializer_failed;
      }
    }
    out_.clear();
    ReadyMessage{.pid = static_cast<std::int32_t>(::getpid()), .shm = shm_, .claims = static_cast<bool>(claims_)}
        .encode(out_);
    return send_frame(result_fd_, out_) ? go_on : 0;
  }

  /// Runs tasks until the parent closes the task pipe or the worker must
  /// exit; returns its exit code.
  int run() {
    for (;;) {
      TaskHeader header;
      FrameView frame{};
      if (int code = next_task(header, frame); code != go_on) return code;
      if (int code = run_task(header, frame); code != go_on) return code;
      if (int code = after_task(); code != go_on) return code;
    }
  }

 private:
  /// Reads the next task this worker is to run: its header and its frame
  /// (read from shared memory if it came as a reference).
  int next_task(TaskHeader& header, FrameView& frame) {
    for (;;) {
      if (!reader_.next(frame)) return 0;  // the parent closed our pipe: exit quietly
      if (frame.kind == FrameKind::stop) return 0;
      if (frame.kind == FrameKind::shm_off) {
        shm_ = false;  // the parent cannot map our buffers: results take the pipe from now on
        continue;
      }
      if (frame.kind != FrameKind::task_header || !TaskHeader::decode(frame.data, frame.size, header)) {
        return fatal("expected a task header");
      }
      // The pool may have taken it back to run elsewhere: then it is skipped
      // unread (its shared memory may already hold something else). Claimed
      // before its body is read: a body that cannot be read (too large for this
      // worker's memory limit) fails this task, it does not go round the pool.
      const bool mine = !claims_ || claims_.claim(header.id);
      // The task itself (or where it is in shared memory).
      if (!reader_.next(frame)) return 0;
      if (!mine) {
        claims_.skipped(header.id);
        continue;
      }
      if (frame.kind != FrameKind::shm_ref) return go_on;
      try {
        // The mapping stays in shm_reader_'s cache while the frame is read.
        frame = shm_reader_.resolve(frame, max_message_).frame;
        return go_on;
      } catch (const std::exception& e) {
        std::string why = std::string("the worker could not read a task from shared memory: ") + e.what();
        if (address_space_limit_ != 0) why += " (" + memory_limit_note() + ")";
        return fatal(why);
      }
    }
  }

  /// Runs one task's items and sends its result.
  int run_task(const TaskHeader& header, const FrameView& frame) {
    TaskHead task;
    if (!TaskHead::decode(frame, task)) return fatal("unexpected frame kind");
    const bool more_queued = (header.flags & task_more_queued) != 0;
    running_task_more_queued() = more_queued;
    const HandlerRegistry::Entry* entry = HandlerRegistry::instance().find(task.handler);
    if (entry == nullptr) {
      return fatal("the worker has no handler with id " + std::to_string(task.handler) +
                   " (is it running the same binary as the parent?)");
    }
    running_item().task = ClaimArea::running_base(header.id);
    out_.clear();
    const std::size_t start = ResultHead::begin(out_, header.id);  // the run time is set below
    const auto began = std::chrono::steady_clock::now();
    {
      Decoder decoder(frame.data + task_body_offset, frame.size - task_body_offset);
      Encoder encoder(out_, &shared_);
      entry->fn(decoder, task.count, encoder);
    }
    spares_ = have_spares();
    const auto elapsed = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - began);
    // Worth a look for the next task only while tasks are short beside a round trip.
    reader_.spin_when_idle(more_queued && elapsed < spin_below);
    if (relayed_) flush_worker_output();
    ResultHead::set_run_time(out_, start, static_cast<std::uint64_t>(elapsed.count()));
    const bool too_large = out_.size() - start - frame_header_size > max_message_;
    if (too_large || (remote_ && !shared_.empty())) {
      // Cannot be sent: report every item as failed instead.
      std::string why = too_large ? "the result message (" + std::to_string(out_.size() - start - frame_header_size) +
                                        " bytes) is larger than Options::max_message_bytes (" +
                                        std::to_string(max_message_) + ")"
                                  : "its result holds a procpool::SharedMemory block, which cannot reach the pool "
                                    "on another host (this pool's workers run on MPI ranks); return the data as a "
                                    "std::vector instead";
      shared_.clear();
      out_.resize(ResultHead::items_start(start));
      Encoder encoder(out_);
      for (std::uint32_t i = 0; i < task.count; ++i) encoder(outcome_byte(ItemOutcome::unsent), why);
    }
    finish_frame(out_, start);
    return send_result();
  }

  /// Sends the result in out_: after announcing the SharedMemory blocks it
  /// refers to, through shared memory if it is large and the parent can map
  /// this worker's buffers, else through the pipe.
  int send_result() {
    std::vector<char> ref, control;  // out_ stays as it is: its capacity serves the next task
    // Each block once.
    std::sort(shared_.begin(), shared_.end());
    shared_.erase(std::unique(shared_.begin(), shared_.end()), shared_.end());
    const bool sharing = !shared_.empty();
    const std::size_t first_lent = lent_.size();
    for (auto& state : shared_) {
      state->header().expect_reader();
      ShmLocation{static_cast<std::int32_t>(::getpid()), state->fd.get(), state->id(),
                  static_cast<std::uint64_t>(state->size())}
          .encode(control, FrameKind::shm_share);
      lent_.push_back(std::move(state));
      ++announced_;
    }
    shared_.clear();
    ShmBuffer* buffer = nullptr;
    // Under memory_limit_per_child, through the pipe: a result buffer kept
    // mapped would count against the next tasks, depending on timing.
    if (shm_ && out_.size() > shm_threshold_ && address_space_limit_ == 0) {
      buffer = shm_writer_.acquire(out_.size(), &control);
    }
    if (!control.empty() && !send_frame(result_fd_, control)) return 0;
    if (sharing) await_shares(first_lent);
    if (buffer != nullptr) {
      ref = ShmWriter::fill(*buffer, out_.data(), out_.size());
      // A new buffer is referred to only once the parent has it mapped: then
      // the result survives this process.
      if (!ShmWriter::wait_mapped(*buffer, std::chrono::milliseconds(50))) {
        ShmWriter::release(*buffer);
        ref.clear();
      }
    }
    return send_frame(result_fd_, ref.empty() ? out_ : ref) ? go_on : 0;
  }

  /// After a task: exits once it ran maxtasksperchild tasks, holds more
  /// memory than max_memory_per_child, or ran out of its
  /// memory_limit_per_child (what it holds may be a leak: it would fail
  /// every task after, and, failing them fast, take most of them).
  int after_task() {
    if (max_tasks_ != 0 && ++done_ >= max_tasks_) {
      await_parent(share_wait);  // for blocks of earlier results still unmarked
      return 0;
    }
    const bool ran_out = std::exchange(task_ran_out_of_memory(), false) && address_space_limit_ != 0;
    if (address_space_limit_ != 0) {
      // The limit is on what the tasks map: procpool's caches go at once.
      release_spares();
      spares_ = false;
      shm_reader_.clear();
      if (out_.capacity() > out_kept_under_limit) std::vector<char>().swap(out_);
    }
    if (!ran_out) {
      if (max_rss_ == 0) return go_on;
      release_spares();  // the cap is on what the tasks hold, not on procpool's cache
      if (!gauge_.over(max_rss_)) return go_on;
    }
    // Too big to keep: tell the parent that the tasks queued behind this
    // one never started, so it runs them elsewhere.
    out_.clear();
    encode_empty(out_, FrameKind::leaving);
    send_frame(result_fd_, out_);
    await_parent(share_wait);
    return 0;
  }

  /// Waits up to share_wait for the parent to handle the blocks just lent
  /// to it (from `lent_[first]` on). One it handled but did not map, it
  /// could not: the result fails anyway, and none of them is kept for it.
  void await_shares(std::size_t first) {
    const auto deadline = std::chrono::steady_clock::now() + share_wait;
    const auto unmapped = [](const auto& state) { return !state->header().is_mapped(); };
    bool handled = false;
    for (;;) {
      const auto waiting = std::find_if(lent_.begin() + static_cast<std::ptrdiff_t>(first), lent_.end(), unmapped);
      if (waiting == lent_.end()) break;  // all mapped
      if ((handled = claims_ && claims_.handled_shares() >= announced_)) break;
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) break;
      // Its mark wakes us; a refusal wakes nobody: look again within refusal_poll.
      (*waiting)->header().wait_mapped(std::min(deadline, now + refusal_poll));
    }
    if (handled) lent_.erase(lent_.begin() + static_cast<std::ptrdiff_t>(first), lent_.end());
    std::erase_if(lent_, [](const auto& state) { return state->header().is_mapped(); });
  }

  /// Waits up to `limit` for the parent to map the blocks lent to it; lets
  /// go of those it has.
  void await_parent(std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    for (const auto& state : lent_) {
      if (!state->header().wait_mapped(deadline)) break;
    }
    std::erase_if(lent_, [](const auto& state) { return state->header().is_mapped(); });
  }

  int fatal(const std::string& why) {
    send_failure_frame(result_fd_, FrameKind::fatal, "procpool::ProtocolError", why);
    return exit_protocol_error;
  }

  /// How long a result waits for the parent to map the blocks it refers to.
  static constexpr std::chrono::milliseconds share_wait{5000};
  /// How often that wait looks whether the parent has handled every block.
  static constexpr std::chrono::milliseconds refusal_poll{2};
  /// Tasks shorter than this make a worker look for its next one before sleeping.
  static constexpr auto spin_below = std::chrono::microseconds(200);
  /// Under memory_limit_per_child, the result buffer's capacity kept between tasks.
  static constexpr std::size_t out_kept_under_limit = std::size_t{1} << 20;

  ClaimArea claims_;
  const int result_fd_;
  const bool relayed_;
  FrameReader reader_;
  std::uint64_t max_tasks_ = 0;
  std::size_t max_message_ = 0;
  std::size_t max_rss_ = 0;
  MemoryGauge gauge_;
  std::size_t address_space_limit_ = 0;  // memory_limit_per_child; 0: none
  std::size_t shm_threshold_ = 0;
  bool remote_ = false;  // the pool is on another host: SharedMemory cannot reach it
  bool shm_ = false;     // large results go through shared memory
  ShmReader shm_reader_;
  ShmWriter shm_writer_;
  std::vector<char> out_;
  bool spares_ = false;  // some argument storage may be kept (a task ran since the last release)
  // SharedMemory blocks a result refers to (`shared_`, filled by the
  // encoder): announced (shm_share) before the result, which is sent once
  // the parent has mapped them all (it sets each one's `mapped`): this
  // process may die or exit right after it. Those the parent has not mapped
  // within share_wait are held (`lent_`) until it has, or this process goes.
  SharedStates shared_, lent_;
  std::uint64_t announced_ = 0;  // SharedMemory blocks shared so far (ClaimArea::handled_shares counts them back)
  std::uint64_t done_ = 0;
};

inline int worker_main(int task_fd, int result_fd, bool relayed = false, int claims_fd = -1) {
  WorkerLoop loop(task_fd, result_fd, relayed, claims_fd);
  if (int code = loop.start(); code != WorkerLoop::go_on) return code;
  return loop.run();
}

/// Runs the worker loop, then leaves without running the parent's atexit
/// handlers or static destructors (a fork shares them, and must not run them).
[[noreturn]] inline void run_worker_and_exit(int task_fd, int result_fd, bool relayed = false,
                                             int claims_fd = -1) noexcept {
  // Placed at fixed numbers by dup2 (posix_spawn, the fork server), which
  // clears close-on-exec: a program a task runs must not inherit the pool's
  // pipes (a grandchild holding the result pipe would hide the worker's end).
  for (int fd : {task_fd, result_fd, claims_fd}) {
    if (fd >= 0) ::fcntl(fd, F_SETFD, ::fcntl(fd, F_GETFD) | FD_CLOEXEC);
  }
  running_tasks() = true;
  // A task that calls exit() ends the worker as _exit() would, once stdout
  // and stderr are flushed: the destructors of the program's globals, and
  // the atexit handlers registered before now, are not the worker's to run
  // (under fork they would act on the parent's behalf, a global's destructor
  // removing its files). Exit handlers run last registered first: those a
  // task registers later still run before this one. A stream another thread
  // holds locked is left unflushed rather than waited for.
  ::on_exit(
      [](int status, void*) {
        for (std::FILE* stream : {stdout, stderr}) {
          if (::ftrylockfile(stream) != 0) continue;
          ::fflush_unlocked(stream);
          ::funlockfile(stream);
        }
        ::_exit(status);
      },
      nullptr);
  int code = exit_protocol_error;
  try {
    code = worker_main(task_fd, result_fd, relayed, claims_fd);
  } catch (...) {
  }
  flush_worker_output();
  std::fflush(nullptr);
  ::_exit(code);
}

}  // namespace procpool::detail
