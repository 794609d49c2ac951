// procpool - StartMethod::forkserver: one small single-threaded server per
// pool, started like a posix_spawn worker, forks the workers on request and
// hands their pipes to the parent over a Unix socket (SCM_RIGHTS).
//
//   parent -> server : 'L' [+ fds[out, err]]         start a worker [with these as its stdout, stderr]
//   server -> parent : 'W', pid + fds[task, result]  a worker started
//                      'F', errno                    fork() failed
//                      'E', pid, wait status         a worker exited
//
// The server dies with the parent (PR_SET_PDEATHSIG) or when the socket
// closes, and its workers die with it (their own PR_SET_PDEATHSIG).
#pragma once

#include <sys/signalfd.h>
#include <sys/socket.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <set>

#include "../errors.hpp"
#include "launch_spawn.hpp"
#include "launcher.hpp"
#include "system.hpp"
#include "worker.hpp"

namespace procpool::detail {

struct ForkserverMessage {
  char kind = 0;
  std::int32_t pid = 0;
  std::int32_t value = 0;  // errno for 'F', wait status for 'E'
};

/// Sends a message, with up to two fds attached.
inline bool send_message(int sock, const ForkserverMessage& msg, const int* fds = nullptr, int nfds = 0) {
  iovec iov{const_cast<ForkserverMessage*>(&msg), sizeof(msg)};
  msghdr header{};
  header.msg_iov = &iov;
  header.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(2 * sizeof(int))];
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
///
/// The fds are registered in FdRegistry under the same hold of its lock in
/// which recvmsg creates them: a fork() by another pool's I/O thread in
/// between would otherwise copy them into its worker without knowing to close
/// them, and that worker would keep, say, our worker's task pipe open, so our
/// worker would never see EOF. MSG_CMSG_CLOEXEC covers the exec-based start
/// methods, which never look at the registry. MSG_DONTWAIT keeps the lock from
/// being held across a wait: if nothing is there after all, we wait unlocked.
inline bool receive_message(int sock, ForkserverMessage& msg, std::vector<Fd>& fds) {
  iovec iov{&msg, sizeof(msg)};
  msghdr header{};
  header.msg_iov = &iov;
  header.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(2 * sizeof(int))];
  ssize_t n;
  for (;;) {
    header.msg_control = control;
    header.msg_controllen = sizeof(control);
    std::unique_lock lock(FdRegistry::instance().mutex());
    n = retry_eintr([&] { return ::recvmsg(sock, &header, MSG_CMSG_CLOEXEC | MSG_DONTWAIT); });
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      lock.unlock();
      pollfd p{sock, POLLIN, 0};
      retry_eintr([&] { return ::poll(&p, 1, -1); });
      continue;
    }
    if (n > 0) {
      for (cmsghdr* cmsg = CMSG_FIRSTHDR(&header); cmsg != nullptr; cmsg = CMSG_NXTHDR(&header, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
        std::size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
          fd = keep_above_stdio(fd);
          if (fd < 0) continue;  // fds.size() then tells the caller something is missing
          FdRegistry::instance().add_locked(fd);
          fds.emplace_back(fd, Fd::Registered{});
        }
      }
    }
    break;
  }
  return n == static_cast<ssize_t>(sizeof(msg));
}

/// The server's loop, entered from procpool::init. Single-threaded by
/// construction: it runs before main() has done anything.
[[noreturn]] inline void run_forkserver(int sock, pid_t parent) noexcept {
  prepare_worker_process(parent);
  sigset_t chld;
  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  ::sigprocmask(SIG_BLOCK, &chld, nullptr);
  int sigfd = keep_above_stdio(::signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK));
  pollfd fds[2] = {{sock, POLLIN, 0}, {sigfd, POLLIN, 0}};
  for (;;) {
    if (retry_eintr([&] { return ::poll(fds, 2, -1); }) < 0) break;
    if (fds[1].revents != 0) {
      signalfd_siginfo info;
      while (::read(sigfd, &info, sizeof(info)) > 0) {
      }
      int status = 0;
      pid_t pid;
      while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) send_message(sock, {'E', pid, status});
    }
    if (fds[0].revents == 0) continue;
    ForkserverMessage request;
    std::vector<Fd> stdio;                              // the relay's pipe ends, if the pool relays output
    if (!receive_message(sock, request, stdio)) break;  // the pool is gone: exiting takes the workers along
    const bool relayed = stdio.size() == 2;
    int task[2], result[2];
    if (pipe_above_stdio(task) == -1) {
      send_message(sock, {'F', 0, errno});
      continue;
    }
    if (pipe_above_stdio(result) == -1) {
      send_message(sock, {'F', 0, errno});
      ::close(task[0]);
      ::close(task[1]);
      continue;
    }
    const pid_t server = ::getpid();
    pid_t pid = ::fork();
    if (pid == 0) {
      // The worker keeps only its own two pipe ends, as fds 3 and 4, and
      // the relay's pipes as its 1 and 2. Every source is first copied above
      // 4, so no dup2 below can overwrite another's source.
      const int sources[4] = {task[0], result[1], relayed ? stdio[0].get() : -1, relayed ? stdio[1].get() : -1};
      const int targets[4] = {3, 4, 1, 2};
      int high[4] = {-1, -1, -1, -1};
      for (int i = 0; i < 4; ++i) {
        if (sources[i] >= 0 && (high[i] = ::fcntl(sources[i], F_DUPFD, 5)) < 0) ::_exit(exit_protocol_error);
      }
      for (int i = 0; i < 4; ++i) {
        if (high[i] >= 0 && ::dup2(high[i], targets[i]) < 0) ::_exit(exit_protocol_error);
      }
      ::close_range(5, ~0U, 0);
      ::sigprocmask(SIG_UNBLOCK, &chld, nullptr);
      prepare_worker_process(server);
      if (relayed) use_relayed_output();
      run_worker_and_exit(3, 4, relayed);
    }
    int err = errno;
    ::close(task[0]);
    ::close(result[1]);
    if (pid < 0) {
      send_message(sock, {'F', 0, err});
    } else {
      int theirs[2] = {task[1], result[0]};
      send_message(sock, {'W', pid, 0}, theirs, 2);
    }
    ::close(task[1]);
    ::close(result[0]);
  }
  ::_exit(0);
}

class ForkserverLauncher final : public Launcher {
 public:
  ~ForkserverLauncher() override {
    if (server_pid_ <= 0) return;
    socket_.reset();  // the server exits on EOF
    Fd pidfd = open_pidfd(server_pid_);
    if (pidfd) {
      pollfd p{pidfd.get(), POLLIN, 0};
      if (::poll(&p, 1, 1000) <= 0) ::kill(server_pid_, SIGKILL);
    }
    int status;
    retry_eintr([&] { return ::waitpid(server_pid_, &status, 0); });
  }

  LaunchedWorker launch(const ChildStdio& stdio) override {
    if (server_pid_ <= 0) start_server();
    // The server keeps its copies of the stdio fds only until it has forked.
    const int stdio_fds[2] = {stdio.out, stdio.err};
    if (!send_message(socket_.get(), {'L', 0, 0}, stdio.relayed() ? stdio_fds : nullptr, stdio.relayed() ? 2 : 0)) {
      throw Error("the fork server is gone (" + server_status() + "). " + missing_init_hint("forkserver"));
    }
    for (;;) {
      ForkserverMessage msg;
      std::vector<Fd> fds;
      if (!wait_readable(10'000) || !receive_message(socket_.get(), msg, fds)) {
        throw Error("the fork server did not answer (" + server_status() + "). " + missing_init_hint("forkserver"));
      }
      if (msg.kind == 'E') {
        if (unwanted_.erase(msg.pid) == 0) exited_[msg.pid] = msg.value;
      } else if (msg.kind == 'F') {
        throw_errno("fork (in the fork server)", msg.value);
      } else if (msg.kind == 'W' && fds.size() == 2) {
        return {msg.pid, std::move(fds[0]), std::move(fds[1]), open_pidfd(msg.pid)};
      } else {
        throw Error("the fork server sent an unexpected message");
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
    drain();
    if (exited_.erase(worker.pid) == 0) unwanted_.insert(worker.pid);
  }

  std::optional<int> try_reap(const LaunchedWorker& worker) override {
    drain();
    auto it = exited_.find(worker.pid);
    if (it == exited_.end()) {
      // A dead server reports nothing more; its workers died with it.
      if (!server_alive_) return server_gone_status;
      return std::nullopt;
    }
    int status = it->second;
    exited_.erase(it);
    return status;
  }

  std::string start_hint() const override { return missing_init_hint("forkserver"); }

 private:
  void start_server() {
    Fd ours, theirs;
    {
      // Registered under the lock fork() holds, as make_pipe does.
      std::lock_guard lock(FdRegistry::instance().mutex());
      int pair[2];
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
    server_pid_ = spawn_self(forkserver_flag, {theirs.get()});
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

  std::string server_status() {
    int status = 0;
    if (server_pid_ <= 0) return "it has exited";
    // A server that closed its socket is exiting: give it a moment to finish.
    if (Fd pidfd = open_pidfd(server_pid_)) {
      pollfd p{pidfd.get(), POLLIN, 0};
      ::poll(&p, 1, 1000);
    }
    if (::waitpid(server_pid_, &status, WNOHANG) == server_pid_) {
      server_pid_ = -1;
      server_alive_ = false;
      return "it " + describe_wait_status(status);
    }
    return "it is still running";
  }

  /// What a worker of a dead server is reported as: killed by its
  /// parent-death signal.
  static constexpr int server_gone_status = SIGKILL;

  pid_t server_pid_ = -1;
  bool server_alive_ = false;
  Fd socket_;
  std::map<pid_t, int> exited_;  // reports not yet asked for
  std::set<pid_t> unwanted_;     // released workers whose report is still to come
};

}  // namespace procpool::detail
