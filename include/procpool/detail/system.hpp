// procpool - system-call layer: EINTR retry, errno to std::system_error,
// owned file descriptors and the process-wide registry of procpool's fds.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "config.hpp"

namespace procpool::detail {

/// Whether procpool::init has run in this process (procpool::mpi::init
/// checks that it ran before MPI did).
inline std::atomic<bool>& init_called() {
  static std::atomic<bool> called{false};
  return called;
}

/// Fork pools made before procpool::init (a global, made before main())
/// start their workers at init, or at their first call if that comes first:
/// a fork before then would copy a program whose static initialization is
/// not complete. init() runs each live one's `start`, which returns once
/// that pool's first workers are forked.
class DeferredStarts {
 public:
  using Start = void (*)(const std::shared_ptr<void>&);
  /// Never destroyed: pools destroyed at exit may still look at it.
  static DeferredStarts& instance() {
    static auto* starts = new DeferredStarts;
    return *starts;
  }
  /// false if init has run already: then the caller starts the pool itself.
  bool add(std::weak_ptr<void> pool, Start start) {
    std::lock_guard lock(mutex_);
    if (ran_) return false;
    starts_.push_back({std::move(pool), start});
    return true;
  }
  void run_all() {
    std::vector<Entry> starts;
    {
      std::lock_guard lock(mutex_);
      ran_ = true;
      starts.swap(starts_);
    }
    // Without the lock: a pool may start, or go, meanwhile.
    for (const Entry& e : starts) {
      if (auto pool = e.pool.lock()) e.start(pool);
    }
  }

 private:
  struct Entry {
    std::weak_ptr<void> pool;
    Start start;
  };
  std::mutex mutex_;
  bool ran_ = false;
  std::vector<Entry> starts_;
};

/// Threads procpool itself runs (one I/O thread per pool): they are not the
/// program's, and never hold a lock a forked worker could need.
inline std::atomic<int>& io_thread_count() {
  static std::atomic<int> count{0};
  return count;
}

/// This process's pid once known (current_pid); 0 in a new child of fork().
inline std::atomic<pid_t>& known_pid() noexcept {
  static std::atomic<pid_t> pid{0};
  return pid;
}

/// A child made by fork() has none of procpool's threads, and a pid of its
/// own. Registered as the program starts, before any pool forks.
inline const bool forgotten_in_child = [] {
  ::pthread_atfork(nullptr, nullptr, [] {
    known_pid().store(0, std::memory_order_relaxed);
    io_thread_count().store(0, std::memory_order_relaxed);
  });
  return true;
}();

/// This process's pid: a pool and its results belong to the process that
/// made them, not to a child made by fork(). Kept, as a system call costs a
/// microsecond on some machines and imap asks for every result; so children
/// made without atfork handlers (_Fork(), a raw clone) are not told apart.
inline pid_t current_pid() noexcept {
  pid_t pid = known_pid().load(std::memory_order_relaxed);
  if (pid == 0) {
    pid = ::getpid();
    known_pid().store(pid, std::memory_order_relaxed);
  }
  return pid;
}

/// Whether this process is a procpool worker (it runs the worker loop).
inline bool& running_tasks() noexcept {
  static bool worker = false;
  return worker;
}

/// What a pool's copy in a child made by fork() says when it is used.
PROCPOOL_ENGINE_INLINE std::string forked_copy_message(pid_t owner);

/// The process an object belongs to: a pool, its results and its shared
/// buffers are used only by the process that made them. A child made by
/// fork() has copies of them, but no workers, threads or results.
class OwnerProcess {
 public:
  /// Whether this is that process.
  bool here() const noexcept { return current_pid() == pid_; }
  /// Throws PoolNotRunning, with forked_copy_message, elsewhere.
  void require() const {
    if (!here()) throw PoolNotRunning(forked_copy_message(pid_));
  }

 private:
  pid_t pid_ = current_pid();
};

[[noreturn]] inline void throw_errno(const char* call, int err = errno) {
  throw std::system_error(err, std::generic_category(), call);
}

/// Runs a system call until it stops failing with EINTR (fmt's FMT_RETRY).
template <class Call>
auto retry_eintr(Call&& call) {
  for (;;) {
    auto result = call();
    if (result == -1 && errno == EINTR) continue;
    return result;
  }
}

/// Every fd procpool creates is recorded here, so a forked child can close
/// the pipe ends of its siblings (and of other pools' workers): a child that
/// keeps a sibling's task pipe open stops that sibling from ever seeing EOF,
/// and close()/join() would then wait forever.
class FdRegistry {
 public:
  static FdRegistry& instance() {
    // Never destroyed: an Fd may be closed during static destruction (a
    // SharedMemory at namespace scope holds one).
    static auto* registry = new FdRegistry;
    return *registry;
  }
  void add(int fd) {
    std::lock_guard lock(mutex_);
    fds_.insert(fd);
  }
  /// Caller holds mutex().
  void add_locked(int fd) { fds_.insert(fd); }
  void remove(int fd) {
    std::lock_guard lock(mutex_);
    fds_.erase(fd);
  }
  /// Held across fork() by the fork launcher so the snapshot is exact.
  std::mutex& mutex() { return mutex_; }
  /// Caller holds mutex().
  std::vector<int> snapshot_locked() const { return {fds_.begin(), fds_.end()}; }
  /// In a forked child that closed them all: none of them are ours any more.
  void clear_locked() { fds_.clear(); }

 private:
  std::mutex mutex_;
  std::set<int> fds_;
};

/// Threads of this process, from /proc/self/status (1 if unknown). The file
/// is open only under the registry's lock, which fork() also holds, so no
/// worker of another pool can inherit it.
inline int thread_count() {
  std::lock_guard lock(FdRegistry::instance().mutex());
  int threads = 1;
  if (FILE* f = std::fopen("/proc/self/status", "re")) {
    char line[256];
    while (std::fgets(line, sizeof(line), f) != nullptr) {
      if (std::sscanf(line, "Threads: %d", &threads) == 1) break;
    }
    std::fclose(f);
  }
  return threads;
}

/// An owned file descriptor, closed on destruction and tracked in FdRegistry.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {
    if (fd_ >= 0) FdRegistry::instance().add(fd_);
  }
  struct Registered {};
  /// Adopts an fd already in FdRegistry.
  Fd(int fd, Registered) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }

  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  void reset() noexcept {
    if (fd_ >= 0) {
      FdRegistry::instance().remove(fd_);
      ::close(fd_);  // never retried: Linux releases the fd even on EINTR
      fd_ = -1;
    }
  }
  int release() noexcept {
    if (fd_ >= 0) FdRegistry::instance().remove(fd_);
    return std::exchange(fd_, -1);
  }

 private:
  int fd_ = -1;
};

struct Pipe {
  Fd read;
  Fd write;
};

/**
 * Opens /dev/null on whichever of fds 0, 1 and 2 is closed. In a program
 * started with its stdio closed (a daemon, `prog >&-`), the next fd made
 * would otherwise take that number: a pipe or a shared buffer of procpool's
 * would then be the program's (or a worker's) stdout, and what a task prints
 * would land in it. Not close-on-exec: children need their stdio too.
 *
 * Called again before procpool makes any fd (make_tracked, pipes, the fork
 * server's socket and received fds): a program may close its stdio while a
 * pool runs, and a new fd would then be 0, 1 or 2 for a moment, before
 * keep_above_stdio() moves it, long enough for the output relay's write to
 * fd 1 to land in it (in a new worker's task pipe, say).
 */
inline void occupy_closed_stdio() noexcept {
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    int null = ::open("/dev/null", O_RDWR | O_NOCTTY);
    if (null < 0) return;  // no /dev/null: keep_above_stdio() still keeps our fds off 0..2
    if (null != fd) {
      ::dup2(null, fd);
      ::close(null);
    }
  }
}

/// `fd` itself if it is above 2; otherwise a close-on-exec copy above 2 (and
/// `fd` closed). procpool's fds are never 0, 1 or 2, whatever the program
/// closed. -1 (errno set) if the copy fails.
inline int keep_above_stdio(int fd) noexcept {
  if (fd < 0 || fd > 2) return fd;
  int high = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
  const int err = errno;
  ::close(fd);
  errno = err;
  return high;
}

/// Runs `create` (returning an fd, or -1 with errno) under the registry's
/// lock and registers the result, so a fork() by another pool's I/O thread
/// never sees the fd without also knowing to close it.
template <class Create>
Fd make_tracked(const char* call, Create create) {
  std::lock_guard lock(FdRegistry::instance().mutex());
  occupy_closed_stdio();
  int fd = keep_above_stdio(create());
  if (fd < 0) throw_errno(call);
  FdRegistry::instance().add_locked(fd);
  return Fd(fd, Fd::Registered{});
}

/// pipe2(O_CLOEXEC), both ends above 2 (keep_above_stdio); -1 with errno.
inline int pipe_above_stdio(int fds[2]) noexcept {
  occupy_closed_stdio();
  if (::pipe2(fds, O_CLOEXEC) == -1) return -1;
  fds[0] = keep_above_stdio(fds[0]);
  fds[1] = keep_above_stdio(fds[1]);
  if (fds[0] >= 0 && fds[1] >= 0) return 0;
  const int err = errno;
  if (fds[0] >= 0) ::close(fds[0]);
  if (fds[1] >= 0) ::close(fds[1]);
  errno = err;
  return -1;
}

inline Pipe make_pipe() {
  std::lock_guard lock(FdRegistry::instance().mutex());
  int fds[2];
  if (pipe_above_stdio(fds) == -1) throw_errno("pipe2");
  FdRegistry::instance().add_locked(fds[0]);
  FdRegistry::instance().add_locked(fds[1]);
  return {Fd(fds[0], Fd::Registered{}), Fd(fds[1], Fd::Registered{})};
}

inline void set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags == -1 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) == -1) throw_errno("fcntl(O_NONBLOCK)");
}

/// A pidfd lets poll() report a worker's death even when a grandchild still
/// holds its pipe. Returns an empty Fd where the kernel lacks pidfd_open.
inline Fd open_pidfd(pid_t pid) {
#ifdef SYS_pidfd_open
  try {
    return make_tracked("pidfd_open", [&] { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); });
  } catch (const std::system_error&) {
  }
#endif
  (void)pid;
  return Fd();
}

/// Writes all of [data, data+size) to a blocking fd. Returns false on EOF/EPIPE.
inline bool write_all(int fd, const char* data, std::size_t size) {
  while (size > 0) {
    ssize_t n = retry_eintr([&] { return ::write(fd, data, size); });
    if (n < 0) {
      if (errno == EPIPE) return false;
      throw_errno("write");
    }
    data += n;
    size -= static_cast<std::size_t>(n);
  }
  return true;
}

inline const char* signal_abbrev(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev != nullptr ? abbrev : "?";
}

/// Exit code of a forked worker that could not place its fds (out of them).
inline constexpr int exit_no_fds = 6;

/// The wait status of a child reaped before procpool could: by the system,
/// since this program ignores SIGCHLD, or by a waitpid() of the program's
/// own. How it ended is lost. (No real status looks like it.)
inline constexpr int wait_status_unknown = 0xffff;
/// The wait status of a worker on an MPI rank that was lost (mpi_hub.hpp).
inline constexpr int wait_status_lost = 0xfeff;
/// A forkserver worker whose fork server died: it died with it.
inline constexpr int wait_status_server_lost = 0xfdff;
/// A worker on an MPI rank that MPI_Finalize let go while it ran (mpi_hub.hpp).
inline constexpr int wait_status_let_go = 0xfcff;

/// Human-readable waitpid() status: "was killed by signal 9 (SIGKILL: Killed)".
PROCPOOL_ENGINE_INLINE std::string describe_wait_status(int status);

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE std::string forked_copy_message(pid_t owner) {
  const std::string me = std::to_string(::getpid());
  if (running_tasks()) {
    return "procpool: this pool belongs to process " + std::to_string(owner) + "; this worker (pid " + me +
           ") has a copy of it made by fork(), with no workers and no threads: a task cannot use the pool of the "
           "program (make a new Pool in the task)";
  }
  return "procpool: this pool belongs to process " + std::to_string(owner) + "; this process (" + me +
         ") is a copy of it made by fork(), where the pool has no workers and no threads: make a new Pool here";
}

PROCPOOL_ENGINE_INLINE std::string describe_wait_status(int status) {
  if (status == wait_status_unknown) {
    return "ended, how is unknown (its exit status was taken before procpool could read it: this program "
           "ignores SIGCHLD, or a SIGCHLD handler or another thread called waitpid() for it; "
           "procpool::StartMethod::forkserver keeps the status)";
  }
  if (status == wait_status_lost) return "was lost with its MPI rank";
  if (status == wait_status_let_go) return "was stopped with its MPI rank, which MPI_Finalize let go,";
  if (status == wait_status_server_lost) {
    return "was lost with its fork server, which died (killed, or out of memory; a new one starts the pool's "
           "workers)";
  }
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    std::string text = "was killed by signal " + std::to_string(sig) + " (SIG" + signal_abbrev(sig);
    if (const char* desc = ::sigdescr_np(sig)) text += std::string(": ") + desc;
    return text + ")";
  }
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  return "ended with wait status " + std::to_string(status);
}

}  // namespace procpool::detail
#endif
