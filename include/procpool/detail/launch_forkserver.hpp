// procpool - StartMethod::forkserver: one small single-threaded server per
// pool, started like a posix_spawn worker, forks the workers on request and
// hands their pipes to the parent over a Unix socket (SCM_RIGHTS).
//
//   parent -> server : 'L', flags + fds[claims?, out?, err?]  start a worker with this claim
//                      area (flag 1) and these as its stdout and stderr (flag 2)
//                      'Q'                           exit (as when the socket closes)
//   server -> parent : 'W', pid + fds[task, result]  a worker started
//                      'F', call, errno              fork() (call 0), pipe2() (call 1) failed, or
//                                                    the fds of the request did not arrive (call 2)
//                      'E', pid, wait status         a worker exited
//
// The server dies with the parent (PR_SET_PDEATHSIG), on 'Q', or when the
// socket closes (which a process the program fork()ed may put off), and its
// workers die with it (their own PR_SET_PDEATHSIG). Before it exits, it
// reaps every worker it started: none is left for a PID 1 or subreaper
// parent to inherit as a zombie. A server that dies is started again at the
// next worker start.
#pragma once

#include <fcntl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <system_error>

#include <fmt/format.h>

#include "../errors.hpp"
#include "launch_spawn.hpp"
#include "launcher.hpp"
#include "process_title.hpp"
#include "system.hpp"
#include "worker.hpp"

namespace procpool::detail {

struct ForkserverMessage {
  char kind = 0;
  std::int32_t pid = 0;    // the worker's; for 'F', which call failed (failed_fork, failed_pipe)
  std::int32_t value = 0;  // errno for 'F', wait status for 'E'
};
inline constexpr std::int32_t failed_fork = 0;
inline constexpr std::int32_t failed_pipe = 1;
inline constexpr std::int32_t failed_receive = 2;
/// Flags of an 'L' request: which fds come with it, in this order.
inline constexpr std::int32_t with_claims = 1;
inline constexpr std::int32_t with_stdio = 2;

/// Sends a message, with up to three fds attached.
inline bool send_message(int sock, const ForkserverMessage& msg, const int* fds = nullptr, int nfds = 0) {
  iovec iov{const_cast<ForkserverMessage*>(&msg), sizeof(msg)};
  msghdr header{};
  header.msg_iov = &iov;
  header.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(3 * sizeof(int))];
  if (nfds > 0) {
    header.msg_control = control;
    header.msg_controllen = CMSG_SPACE(static_cast<std::size_t>(nfds) * sizeof(int));
    cmsghdr* cmsg = CMSG_FIRSTHDR(&header);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(static_cast<std::size_t>(nfds) * sizeof(int));
    std::memcpy(CMSG_DATA(cmsg), fds, static_cast<std::size_t>(nfds) * sizeof(int));
  }
  return retry_eintr([&] { return ::sendmsg(sock, &header, MSG_NOSIGNAL); }) == static_cast<ssize_t>(sizeof(msg));
}

/// Receives a message and any fds (close-on-exec). false on EOF.
/// `truncated`: set if some fds sent could not be received (EMFILE).
///
/// The fds are registered in FdRegistry under the same hold of its lock in
/// which recvmsg creates them: a fork() by another pool's I/O thread in
/// between would otherwise copy them into its worker without knowing to close
/// them, and that worker would keep, say, our worker's task pipe open, so our
/// worker would never see EOF. MSG_CMSG_CLOEXEC covers the exec-based start
/// methods, which never look at the registry. MSG_DONTWAIT keeps the lock from
/// being held across a wait: if nothing is there after all, we wait unlocked.
inline bool receive_message(int sock, ForkserverMessage& msg, std::vector<Fd>& fds, bool* truncated = nullptr) {
  iovec iov{&msg, sizeof(msg)};
  msghdr header{};
  header.msg_iov = &iov;
  header.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(3 * sizeof(int))];
  ssize_t n;
  for (;;) {
    header.msg_control = control;
    header.msg_controllen = sizeof(control);
    std::unique_lock lock(FdRegistry::instance().mutex());
    occupy_closed_stdio();
    n = retry_eintr([&] { return ::recvmsg(sock, &header, MSG_CMSG_CLOEXEC | MSG_DONTWAIT); });
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      lock.unlock();
      pollfd p{sock, POLLIN, 0};
      retry_eintr([&] { return ::poll(&p, 1, -1); });
      continue;
    }
    if (n > 0) {
      if (truncated != nullptr) *truncated = (header.msg_flags & MSG_CTRUNC) != 0;
      for (cmsghdr* cmsg = CMSG_FIRSTHDR(&header); cmsg != nullptr; cmsg = CMSG_NXTHDR(&header, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
        std::size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
          fd = keep_above_stdio(fd);
          if (fd < 0) {
            if (truncated != nullptr) *truncated = true;
            continue;
          }
          FdRegistry::instance().add_locked(fd);
          fds.emplace_back(fd, Fd::Registered{});
        }
      }
    }
    break;
  }
  return n == static_cast<ssize_t>(sizeof(msg));
}

/// In a child the server just forked: keeps only its own two pipe ends, as
/// fds 3 and 4, its claim area as fd 5 (-1: none), and the relay's pipes as
/// its 1 and 2 (-1: the server's own), then runs the worker. `unneeded` (the
/// server's socket and signalfd, the parent's pipe ends) are closed first:
/// that frees the one spare fd the placement below needs, so a server that
/// could create the pipes never starts a worker that cannot place them.
[[noreturn]] inline void become_worker(int task, int result, int claims, int out, int err,
                                       std::initializer_list<int> unneeded, const sigset_t& chld,
                                       pid_t server) noexcept {
  for (int fd : unneeded) ::close(fd);
  int at[5] = {task, result, claims, out, err};
  const int targets[5] = {worker_task_fd, worker_result_fd, worker_claims_fd, 1, 2};
  for (int i = 0; i < 5; ++i) {
    if (at[i] < 0) continue;
    // A source not yet placed that sits where this one goes moves aside first.
    for (int j = i + 1; j < 5; ++j) {
      if (at[j] == targets[i] && (at[j] = ::fcntl(at[j], F_DUPFD, 3)) < 0) ::_exit(exit_no_fds);
    }
    if (at[i] != targets[i] && ::dup2(at[i], targets[i]) < 0) ::_exit(exit_no_fds);
  }
  // Without a claim area, fd 5 is one of the server's: it goes too.
  ::close_range(claims >= 0 ? 6 : worker_claims_fd, ~0U, 0);
  ::sigprocmask(SIG_UNBLOCK, &chld, nullptr);
  prepare_worker_process(server);
  const bool relayed = out >= 0;
  if (relayed) use_relayed_output();
  run_worker_and_exit(worker_task_fd, worker_result_fd, relayed, claims >= 0 ? worker_claims_fd : -1);
}

/// Starts the worker one request asks for, with the fds `given` with it,
/// and answers with its pipe ends ('W') or why it failed ('F').
inline void serve_request(int sock, int sigfd, const ForkserverMessage& request, std::vector<Fd>& given, bool truncated,
                          const sigset_t& chld, std::set<pid_t>& workers) {
  const bool with_area = (request.value & with_claims) != 0;
  const bool relayed = (request.value & with_stdio) != 0;
  if (truncated || given.size() != (with_area ? 1U : 0U) + (relayed ? 2U : 0U)) {
    send_message(sock, {'F', failed_receive, EMFILE});
    return;
  }
  const int claims = with_area ? given[0].get() : -1;
  const std::size_t stdio_at = with_area ? 1 : 0;
  int task[2], result[2];
  if (pipe_above_stdio(task) == -1) {
    send_message(sock, {'F', failed_pipe, errno});
    return;
  }
  if (pipe_above_stdio(result) == -1) {
    send_message(sock, {'F', failed_pipe, errno});
    ::close(task[0]);
    ::close(task[1]);
    return;
  }
  const pid_t server = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) {
    become_worker(task[0], result[1], claims, relayed ? given[stdio_at].get() : -1,
                  relayed ? given[stdio_at + 1].get() : -1, {sock, sigfd, task[1], result[0]}, chld, server);
  }
  int err = errno;
  ::close(task[0]);
  ::close(result[1]);
  if (pid < 0) {
    send_message(sock, {'F', failed_fork, err});
  } else {
    workers.insert(pid);
    int theirs[2] = {task[1], result[0]};
    send_message(sock, {'W', pid, 0}, theirs, 2);
  }
  ::close(task[1]);
  ::close(result[0]);
}

/// The server's loop, entered from procpool::init. Single-threaded by
/// construction: it runs before main() has done anything.
[[noreturn]] inline void run_forkserver(int sock, pid_t parent) noexcept {
  prepare_worker_process(parent);
  try {
    ProcessTitle::instance().set("procpool fork server", "server");
  } catch (...) {  // a name is not worth failing for
  }
  ::fcntl(sock, F_SETFD, FD_CLOEXEC);  // placed by dup2: see run_worker_and_exit
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  ::sigprocmask(SIG_BLOCK, &chld, nullptr);
  int sigfd = keep_above_stdio(::signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK));
  pollfd fds[2] = {{sock, POLLIN, 0}, {sigfd, POLLIN, 0}};
  std::set<pid_t> workers;  // started and not yet reaped
  for (;;) {
    if (retry_eintr([&] { return ::poll(fds, 2, -1); }) < 0) break;
    if (fds[1].revents != 0) {
      signalfd_siginfo info;
      while (::read(sigfd, &info, sizeof(info)) > 0) {
      }
      int status = 0;
      pid_t pid;
      while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
        workers.erase(pid);
        send_message(sock, {'E', pid, status});
      }
    }
    if (fds[0].revents == 0) continue;
    ForkserverMessage request;
    std::vector<Fd> given;  // its claim area, and the relay's pipe ends, as the flags say
    bool truncated = false;
    if (!receive_message(sock, request, given, &truncated)) break;  // the pool is gone: its workers go with us
    if (request.kind == 'Q') break;
    serve_request(sock, sigfd, request, given, truncated, chld, workers);
  }
  // The pool is gone or done: its workers are gone or going. Reap them all
  // before exiting, or a PID 1 or subreaper parent would inherit them.
  for (pid_t pid : workers) ::kill(pid, SIGKILL);
  int status;
  while (retry_eintr([&] { return ::waitpid(-1, &status, 0); }) > 0) {
  }
  ::_exit(0);
}

class ForkserverLauncher final : public Launcher {
 public:
  ~ForkserverLauncher() override { shutdown(); }

  LaunchedWorker launch(const ChildStdio& stdio, int claims_fd) override {
    // A server that died (killed, or out of memory) is replaced: its
    // workers died with it, and the pool starts new ones here.
    if (!server_alive_) restart_server();
    // The server keeps its copies of these fds only until it has forked.
    int given[3];
    int nfds = 0;
    std::int32_t flags = 0;
    if (claims_fd >= 0) {
      given[nfds++] = claims_fd;
      flags |= with_claims;
    }
    if (stdio.relayed()) {
      given[nfds++] = stdio.out;
      given[nfds++] = stdio.err;
      flags |= with_stdio;
    }
    const ForkserverMessage request{'L', 0, flags};
    if (!send_message(socket_.get(), request, given, nfds)) {
      restart_server();
      if (!send_message(socket_.get(), request, given, nfds)) throw server_lost("is gone");
    }
    for (;;) {
      ForkserverMessage msg;
      std::vector<Fd> fds;
      bool truncated = false;
      if (!wait_readable(10'000) || !receive_message(socket_.get(), msg, fds, &truncated)) {
        server_alive_ = false;
        throw server_lost("did not answer");
      }
      if (msg.kind == 'E') {
        if (unwanted_.erase(msg.pid) == 0) exited_[msg.pid] = msg.value;
      } else if (msg.kind == 'F') {
        throw_errno(msg.pid == failed_pipe      ? "pipe2 (in the fork server)"
                    : msg.pid == failed_receive ? "recvmsg (the fork server receiving a new worker's fds)"
                                                : "fork (in the fork server)",
                    msg.value);
      } else if (msg.kind == 'W' && !truncated && fds.size() == 2) {
        LaunchedWorker worker{msg.pid, std::move(fds[0]), std::move(fds[1]), open_pidfd(msg.pid), generation_};
        return worker;
      } else if (msg.kind == 'W') {
        // Its pipes did not reach us (this process is out of fds): the
        // worker is of no use. The server reaps it and reports that.
        ::kill(msg.pid, SIGKILL);
        unwanted_.insert(msg.pid);
        throw std::system_error(EMFILE, std::generic_category(),
                                "receiving a new worker's pipes from the fork server (recvmsg)");
      } else {
        throw Error(fmt::format("the fork server sent a message of unknown kind {}", static_cast<int>(msg.kind)));
      }
    }
  }

  int reap(const LaunchedWorker& worker) override {
    // The server reaps its children and reports them; wait for the report,
    // but not forever: a dead server reports nothing.
    for (int waited = 0; waited < 5000; waited += 10) {
      if (auto status = try_reap(worker)) return *status;
      wait_readable(10);
    }
    return server_gone_status;
  }

  void release(const LaunchedWorker& worker) override {
    if (worker.generation != generation_) {
      (void)try_reap(worker);
      return;
    }
    drain();
    if (exited_.erase(worker.pid) == 0) unwanted_.insert(worker.pid);
  }

  std::optional<int> try_reap(const LaunchedWorker& worker) override {
    if (worker.generation != generation_ || !server_alive_) {
      // Its server is dead and reports nothing more; the worker died with it.
      // If this process is a subreaper (or PID 1) it inherited the worker:
      // reap it here, once it is gone. Its SIGKILL was its server's death
      // (a worker has PR_SET_PDEATHSIG), and is told as that.
      int status = 0;
      const pid_t r = retry_eintr([&] { return ::waitpid(worker.pid, &status, WNOHANG); });
      if (r == 0) return std::nullopt;
      const bool killed = r == worker.pid && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
      return r == worker.pid && !killed ? status : server_gone_status;
    }
    drain();
    auto it = exited_.find(worker.pid);
    if (it == exited_.end()) return std::nullopt;
    int status = it->second;
    exited_.erase(it);
    return status;
  }

  std::string start_hint() const override { return missing_init_hint("forkserver"); }

  /// Closes the socket, which ends the server once it has reaped its
  /// workers; then reaps the server (SIGKILL after a second).
  void shutdown() noexcept override {
    if (socket_ && server_alive_) send_message(socket_.get(), {'Q', 0, 0});
    socket_.reset();
    server_alive_ = false;
    if (server_pid_ <= 0) return;
    if (Fd pidfd = open_pidfd(server_pid_)) {
      pollfd p{pidfd.get(), POLLIN, 0};
      if (::poll(&p, 1, 1000) <= 0) ::kill(server_pid_, SIGKILL);
    } else {
      ::kill(server_pid_, SIGKILL);
    }
    int status;
    retry_eintr([&] { return ::waitpid(server_pid_, &status, 0); });
    server_pid_ = -1;
  }

 private:
  /// The error for a server that died or stopped answering: with the hint
  /// about procpool::init only when that is the cause (the re-run binary
  /// reached a Pool without init).
  Error server_lost(const char* what) {
    const std::optional<int> status = reap_server(std::chrono::milliseconds(1000));
    std::string text = fmt::format("the fork server {} ({})", what,
                                   status ? "it " + describe_wait_status(*status) : std::string("it is still running"));
    if (status && WIFEXITED(*status) && WEXITSTATUS(*status) == exit_missing_init) {
      throw StartRefused(text + ". " + missing_init_hint("forkserver"));
    }
    return Error(text);
  }

  /// Waits up to `limit` for the server to end, and reaps it.
  std::optional<int> reap_server(std::chrono::milliseconds limit) {
    if (server_pid_ <= 0) return std::nullopt;
    if (Fd pidfd = open_pidfd(server_pid_)) {
      pollfd p{pidfd.get(), POLLIN, 0};
      ::poll(&p, 1, static_cast<int>(limit.count()));
    }
    int status = 0;
    if (::waitpid(server_pid_, &status, WNOHANG) != server_pid_) return std::nullopt;
    server_pid_ = -1;
    server_alive_ = false;
    return status;
  }

  /// Lets go of a dead (or unreachable) server and starts a new one.
  void restart_server() {
    socket_.reset();
    if (server_pid_ > 0) {
      ::kill(server_pid_, SIGKILL);
      int status;
      retry_eintr([&] { return ::waitpid(server_pid_, &status, 0); });
      server_pid_ = -1;
    }
    // The old server's reports are not coming: its workers are asked of the kernel.
    exited_.clear();
    unwanted_.clear();
    ++generation_;
    start_server();
  }

  void start_server() {
    Fd ours, theirs;
    {
      // Registered under the lock fork() holds, as make_pipe does.
      std::lock_guard lock(FdRegistry::instance().mutex());
      int pair[2];
      occupy_closed_stdio();
      if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) == -1) throw_errno("socketpair");
      pair[0] = keep_above_stdio(pair[0]);
      pair[1] = keep_above_stdio(pair[1]);
      if (pair[0] < 0 || pair[1] < 0) {
        const int err = errno;
        if (pair[0] >= 0) ::close(pair[0]);
        if (pair[1] >= 0) ::close(pair[1]);
        throw_errno("fcntl(F_DUPFD_CLOEXEC)", err);
      }
      FdRegistry::instance().add_locked(pair[0]);
      FdRegistry::instance().add_locked(pair[1]);
      ours = Fd(pair[0], Fd::Registered{});
      theirs = Fd(pair[1], Fd::Registered{});
    }
    try {
      server_pid_ = spawn_self(forkserver_flag, {theirs.get()});
    } catch (const std::system_error& e) {
      throw std::system_error(e.code(), std::string("starting the fork server (") + e.what() + ")");
    }
    socket_ = std::move(ours);
    server_alive_ = true;
  }

  bool wait_readable(int timeout_ms) {
    pollfd p{socket_.get(), POLLIN, 0};
    return retry_eintr([&] { return ::poll(&p, 1, timeout_ms); }) > 0;
  }

  void drain() {
    while (server_alive_ && wait_readable(0)) {
      ForkserverMessage msg;
      std::vector<Fd> fds;
      if (!receive_message(socket_.get(), msg, fds)) {
        server_alive_ = false;
        break;
      }
      if (msg.kind == 'E' && unwanted_.erase(msg.pid) == 0) exited_[msg.pid] = msg.value;
    }
  }

  /// What a worker of a dead server is reported as: killed by its
  /// parent-death signal.
  static constexpr int server_gone_status = wait_status_server_lost;

  pid_t server_pid_ = -1;
  bool server_alive_ = false;
  std::uint64_t generation_ = 0;  // how many servers were started
  Fd socket_;
  std::map<pid_t, int> exited_;  // reports not yet asked for
  std::set<pid_t> unwanted_;     // released workers whose report is still to come
};

}  // namespace procpool::detail
