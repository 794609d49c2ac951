// procpool - StartMethod::posix_spawn: each worker is a fresh run of this
// program's own binary, which procpool::init turns into a worker.
#pragma once

#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <spawn.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "launcher.hpp"
#include "process_title.hpp"
#include "system.hpp"

extern char** environ;

namespace procpool::detail {

/// argv[1] of a re-executed binary: what procpool::init should turn it into.
inline constexpr const char* worker_flag = "--procpool-worker";
inline constexpr const char* forkserver_flag = "--procpool-forkserver";
/// Set in the environment of every re-executed process and cleared by init:
/// a Pool created while it is still set means main() forgot procpool::init.
inline constexpr const char* worker_env = "PROCPOOL_WORKER";
/// Exit code of a re-executed process whose main() never called init.
inline constexpr int exit_missing_init = 5;

/// A process procpool re-executed (a worker or the fork server) in which
/// init has not run yet: a Pool made now is a global's, made before main().
/// It stays dormant, as main() will call init and never return.
inline bool in_worker_before_init() { return std::getenv(worker_env) != nullptr && !init_called(); }

inline std::string missing_init_hint(std::string_view method) {
  return "Under StartMethod::" + std::string(method) +
         " procpool re-runs this program's binary to start its processes, and main() must hand them "
         "over: add `procpool::init(argc, argv);` as the first line of main(), before any other work";
}

/// The dynamic loader the program names (its PT_INTERP), or nullptr if it
/// is linked statically.
inline const char* program_interpreter() noexcept {
  const char* interpreter = nullptr;
  ::dl_iterate_phdr(
      [](dl_phdr_info* info, std::size_t, void* data) {
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          if (info->dlpi_phdr[i].p_type == PT_INTERP) {
            *static_cast<const char**>(data) =
                reinterpret_cast<const char*>(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
          }
        }
        return 1;  // the program only
      },
      &interpreter);
  return interpreter;
}

/// How this program runs itself again. /proc/self/exe is its binary, unless
/// the program was started through the dynamic loader
/// (`/lib64/ld-linux-x86-64.so.2 [options] ./prog args`, as bundles do): then
/// it is the loader, which must be given its options and the program again.
/// Learnt in init, from /proc/self/cmdline (whose strings hold the loader's
/// part before the program's argc), before a worker renames itself or the
/// program changes directory.
class SelfCommand {
 public:
  static SelfCommand& instance() {
    static SelfCommand command;
    return command;
  }
  void learn(int argc) noexcept {
    if (argc < 1 || !run_by_loader()) return;
    std::string text;
    const int fd = ::open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    char buffer[4096];
    for (long n; (n = ::read(fd, buffer, sizeof buffer)) > 0;) text.append(buffer, static_cast<std::size_t>(n));
    ::close(fd);
    std::vector<std::string> words;
    for (std::size_t at = 0; at < text.size();) {
      const std::size_t end = std::min(text.find('\0', at), text.size());
      words.emplace_back(text, at, end - at);
      at = end + 1;
    }
    if (words.size() <= static_cast<std::size_t>(argc)) return;  // run directly
    const std::size_t program_at = words.size() - static_cast<std::size_t>(argc);
    char resolved[PATH_MAX];
    if (::realpath(words[program_at].c_str(), resolved) == nullptr) return;
    loader_.assign(words.begin(), words.begin() + static_cast<std::ptrdiff_t>(program_at));
    loader_.emplace_back(resolved);
  }
  /// The loader's argv up to the program's path, included; empty if the
  /// program runs directly.
  const std::vector<std::string>& loader() const { return loader_; }

 private:
  /// Whether /proc/self/exe is the program's own interpreter.
  static bool run_by_loader() noexcept {
    const char* interpreter = program_interpreter();
    char exe[PATH_MAX], loader[PATH_MAX];
    return interpreter != nullptr && ::realpath("/proc/self/exe", exe) != nullptr &&
           ::realpath(interpreter, loader) != nullptr && std::strcmp(exe, loader) == 0;
  }

  std::vector<std::string> loader_;
};

/// The fds a re-executed worker finds its pipes and its claim area at.
inline constexpr int worker_task_fd = 3;
inline constexpr int worker_result_fd = 4;
inline constexpr int worker_claims_fd = 5;

/// argv[3] of a re-executed worker whose stdout and stderr go to the
/// parent's output relay.
inline constexpr const char* relayed_output_flag = "--procpool-relayed-output";

/// Starts this program's binary (/proc/self/exe) as `argv[0] <flag> <our pid>`
/// with `fds[i]` as fd 3 + i and no other fd but 0, 1 and 2; with `stdio`'s
/// fds as its 1 and 2 (and `relayed_output_flag` as argv[3]) if relayed.
inline pid_t spawn_self(const char* flag, std::initializer_list<int> fds, const ChildStdio& stdio = {}) {
  // An fd that sits where an earlier dup2 puts another is first copied above
  // the target range; the others are used where they are, which spares the
  // fds a copy would take (a program near its fd limit can still spawn).
  const int first_free = 3 + static_cast<int>(fds.size());
  std::vector<Fd> copies;
  std::vector<int> sources;
  for (int fd : fds) {
    const int target = 3 + static_cast<int>(sources.size());
    if (fd >= target) {
      sources.push_back(fd);
      continue;
    }
    copies.push_back(make_tracked("fcntl(F_DUPFD_CLOEXEC)", [&] { return ::fcntl(fd, F_DUPFD_CLOEXEC, first_free); }));
    sources.push_back(copies.back().get());
  }
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  ::posix_spawn_file_actions_init(&actions);
  ::posix_spawnattr_init(&attr);
  // The relay's fds are read before anything is placed over them.
  if (stdio.relayed()) {
    ::posix_spawn_file_actions_adddup2(&actions, stdio.out, 1);
    ::posix_spawn_file_actions_adddup2(&actions, stdio.err, 2);
  }
  // dup2 onto itself clears close-on-exec, as an fd already in place needs.
  for (std::size_t i = 0; i < sources.size(); ++i) {
    ::posix_spawn_file_actions_adddup2(&actions, sources[i], 3 + static_cast<int>(i));
  }
  // The new process inherits nothing the program left open without O_CLOEXEC.
  ::posix_spawn_file_actions_addclosefrom_np(&actions, first_free);
  // The I/O thread blocks every signal; the child starts with none blocked
  // and default dispositions.
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  ::posix_spawnattr_setsigmask(&attr, &none);
  ::posix_spawnattr_setsigdefault(&attr, &all);
  ::posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

  std::string parent = std::to_string(::getpid());
  // Not program_invocation_name: a re-executed worker's is its rewritten
  // title ("prog: procpool worker 1"), which would name a nested pool's processes.
  std::string argv0 = ProcessTitle::instance().argv0();
  std::vector<std::string> loader = SelfCommand::instance().loader();
  std::vector<char*> argv;
  for (std::string& word : loader) argv.push_back(word.data());
  if (loader.empty()) argv.push_back(argv0.data());
  argv.push_back(const_cast<char*>(flag));
  argv.push_back(parent.data());
  if (stdio.relayed()) argv.push_back(const_cast<char*>(relayed_output_flag));
  argv.push_back(nullptr);
  std::vector<char*> env;
  std::string marker = std::string(worker_env) + "=1";
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, worker_env, std::strlen(worker_env)) != 0) env.push_back(*e);
  }
  env.push_back(marker.data());
  env.push_back(nullptr);

  pid_t pid = -1;
  int err = ::posix_spawn(&pid, "/proc/self/exe", &actions, &attr, argv.data(), env.data());
  ::posix_spawn_file_actions_destroy(&actions);
  ::posix_spawnattr_destroy(&attr);
  if (err == ENOENT && ::access("/proc/self", F_OK) != 0) {
    throw std::system_error(
        err, std::generic_category(),
        "posix_spawn(/proc/self/exe): /proc is not mounted, and the posix_spawn and forkserver start "
        "methods start this program from there; mount /proc, or use StartMethod::fork");
  }
  if (err != 0) throw_errno("posix_spawn(/proc/self/exe)", err);
  return pid;
}

class SpawnLauncher final : public ChildLauncher {
 public:
  LaunchedWorker launch(const ChildStdio& stdio, int claims_fd) override {
    Pipe task = make_pipe();
    Pipe result = make_pipe();
    // Its claim area becomes its fd 5 (worker_claims_fd).
    pid_t pid = claims_fd >= 0 ? spawn_self(worker_flag, {task.read.get(), result.write.get(), claims_fd}, stdio)
                               : spawn_self(worker_flag, {task.read.get(), result.write.get()}, stdio);
    task.read.reset();
    result.write.reset();
    return {pid, std::move(task.write), std::move(result.read), open_pidfd(pid)};
  }
  std::string start_hint() const override { return missing_init_hint("posix_spawn"); }
};

}  // namespace procpool::detail
