// Helper program for tests that need a whole process of their own: a
// program that is signalled, crashes, or must be watched from outside.
//
// usage: procpool_helper <mode> [args...]
//   threaded-fork         create two fork pools while another thread runs; print "ok"
//   orphan <method>       print "pids <worker pids...>" then SIGKILL itself mid-map
//   interrupt <method>    own process group; print "pids ..." then run a long map
//                         (the test sends SIGINT to the group, as Ctrl-C does)
//   output <method> <lines|prefixed|inherit> <file>
//                         stderr to <file>; 4 workers print long lines to stdout
//                         and stderr, each in many small write()s; then "done"
//   closed-stdio <method> <lines|prefixed|inherit|callback> <file> [late]
//                         run with some of fds 0, 1, 2 closed (with "late":
//                         closes all three itself once the pool runs, and its
//                         workers are replaced after each task): 200 echoes of
//                         1 MiB whose tasks print to stdout and stderr; writes
//                         "exact" or what went wrong to <file>
//   nproc <method>        as a user of its own if root, under RLIMIT_NPROC: Pool()
//                         with no thread to be had, then a map with no process
//                         to be had, then the same pool once the limit is raised;
//                         prints "pool: <error>", "map: <error>", "recovered: ..."
//   fewfds <method> <limit>
//                         under a soft RLIMIT_NOFILE of <limit>: a pool of 2
//                         whose workers are replaced every 5 tasks maps 60
//                         squares and returns 4 MiB; prints "squares ok" and
//                         "big ok", or the error
//   successor <method>    a pool of 1 whose worker is replaced after each task,
//                         under a soft RLIMIT_NOFILE that leaves a successor
//                         no fds while its predecessor lives: maps 4 tasks of
//                         200 ms; prints "slow ok", or the error
//   unflushed <method> <file>
//                         stdout to <file>; a pool of 2 maps 4 tasks that
//                         printf "task N" without fflush, and is destroyed
//   reaper <method> <cycles> [subreaper]
//                         <cycles> times: a pool of 2, a map, close(), join();
//                         counts this process's children (zombies or not)
//                         after each join() and each destruction; prints
//                         "children after join N, after destruction M"
//   crashrelay <method>   at the lowest fd limit a pool of 2 with relayed
//                         output runs at, maps 200 items, every 40th of which
//                         crashes its worker; prints "crashed 5, lost 0" when
//                         the others ran, or what was lost
//   killserver            a subreaper: a forkserver pool of 2 runs 2 long
//                         tasks, and its fork server is killed; prints "lost:
//                         <error>" for each, then "after: 64"
//   noproc <method>       in a mount namespace of its own with a tmpfs over
//                         /proc (a user namespace too if not root): a pool of 1
//                         maps 3 squares; prints "results 1 4 9" or "error: ..."
#include <procpool/procpool.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace {

long square(long x) { return x * x; }

procpool::StartMethod method_named(const std::string& name) {
  if (name == "fork") return procpool::StartMethod::fork;
  if (name == "posix_spawn") return procpool::StartMethod::posix_spawn;
  return procpool::StartMethod::forkserver;
}

int report_pid(int) {
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // so both workers take one
  return static_cast<int>(::getpid());
}

long sleep_long(long x) {
  std::this_thread::sleep_for(std::chrono::seconds(60));
  return x;
}

/// Starts a pool, prints its workers' pids, then leaves them busy.
int start_busy_pool(const std::string& method, bool kill_self) {
  procpool::Pool pool({.processes = 2, .start_method = method_named(method)});
  std::printf("pids");
  for (int pid : pool.map<report_pid>(std::vector<int>(4, 0), 1)) std::printf(" %d", pid);
  std::printf("\n");
  std::fflush(stdout);
  auto busy = pool.map_async<sleep_long>(std::vector<long>(8, 1), 1);
  if (kill_self) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ::raise(SIGKILL);  // no destructor, no cleanup: the workers must notice on their own
  }
  busy.wait();  // SIGINT ends the program here
  return 1;
}

int threaded_fork() {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::thread side([&] {
    std::unique_lock lock(m);
    cv.wait(lock, [&] { return done; });
  });
  long total = 0;
  for (int i = 0; i < 2; ++i) {
    procpool::Pool pool({.processes = 2, .start_method = procpool::StartMethod::fork});
    for (long v : pool.map<square>(std::vector<long>{1, 2, 3})) total += v;
  }
  {
    std::lock_guard lock(m);
    done = true;
  }
  cv.notify_all();
  side.join();
  std::printf(total == 28 ? "ok\n" : "wrong total\n");
  return total == 28 ? 0 : 1;
}

/// Length of line `line` of task `task`: from 1 to about 12 KiB, mostly over PIPE_BUF.
std::size_t output_line_length(long task, int line) {
  return 1 + static_cast<std::size_t>((task * 997 + line * 1319) % 12000);
}

/// Prints 20 lines to stdout and 20 to stderr, "<out|err> <task> <line> <pid> <letters> end",
/// each in write()s of at most 700 bytes: unrelayed, workers' lines would mix.
long print_lines_in_pieces(long task) {
  for (int line = 0; line < 20; ++line) {
    for (int fd : {1, 2}) {
      std::string text = std::string(fd == 1 ? "out " : "err ") + std::to_string(task) + " " + std::to_string(line) +
                         " " + std::to_string(::getpid()) + " " +
                         std::string(output_line_length(task, line), static_cast<char>('a' + (task + line) % 26)) +
                         " end\n";
      for (std::size_t at = 0; at < text.size(); at += 700) {
        std::size_t n = std::min<std::size_t>(700, text.size() - at);
        if (::write(fd, text.data() + at, n) != static_cast<ssize_t>(n)) return -1;
      }
    }
  }
  return task;
}

int relay_output(const std::string& method, const std::string& mode, const std::string& err_file) {
  int err = ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (err < 0 || ::dup2(err, 2) != 2) return 3;
  ::close(err);
  {
    procpool::Pool pool({.processes = 4,
                         .start_method = method_named(method),
                         .worker_output = mode == "prefixed" ? procpool::WorkerOutput::prefixed
                                          : mode == "lines"  ? procpool::WorkerOutput::lines
                                                             : procpool::WorkerOutput::inherit});
    std::vector<long> tasks(24);
    for (std::size_t i = 0; i < tasks.size(); ++i) tasks[i] = static_cast<long>(i);
    if (pool.map<print_lines_in_pieces>(tasks, 1) != tasks) return 4;
    pool.close();
    pool.join();
  }
  std::printf("done\n");
  return 0;
}

/// Echoes its argument after printing a line to stdout, 2 bytes without a
/// newline, and a line to stderr: output that must never reach a result.
std::vector<char> echo_printing(std::vector<char> data) {
  std::printf("%s\n", std::string(99, 'x').c_str());
  std::printf("hi");
  std::fprintf(stderr, "err %zu\n", data.size());
  return data;
}

int closed_stdio(const std::string& method, const std::string& mode, const std::string& file, bool late) {
  auto report = [&](const std::string& what) {
    // Opened now: with fd 1 closed, this file could itself become fd 1.
    if (FILE* f = std::fopen(file.c_str(), "we")) {
      std::fputs(what.c_str(), f);
      std::fclose(f);
    }
  };
  try {
    procpool::Options options{.processes = 2, .start_method = method_named(method)};
    if (mode == "lines") options.worker_output = procpool::WorkerOutput::lines;
    if (mode == "prefixed") options.worker_output = procpool::WorkerOutput::prefixed;
    if (mode == "callback") options.on_worker_output = [](const procpool::WorkerLine&) {};
    if (late) options.maxtasksperchild = 1;
    procpool::Pool pool(options);
    if (late) {
      // Each replacement worker's pipes are made after this: the lowest free fds are 0, 1 and 2.
      pool.apply<square>(1);
      for (int fd = 0; fd <= 2; ++fd) ::close(fd);
    }
    // Fewer under the sanitizers, whose copies of 1 MiB and whose process
    // starts are many times slower, and "late", where each task starts a
    // worker (maxtasksperchild = 1): 30 workers start with 0, 1 and 2 free.
#if defined(PROCPOOL_SANITIZED)
    const bool few = true;
#else
    const bool few = late;
#endif
    const std::size_t large = few ? 20 : 200, small_count = few ? 10 : 50;
    std::vector<std::vector<char>> inputs(large);
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      inputs[i].assign(std::size_t{1} << 20, static_cast<char>('a' + i % 26));
      inputs[i][i] = '!';
    }
    auto outputs = pool.map<echo_printing>(inputs, 1);
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < inputs.size(); ++i) wrong += outputs[i] != inputs[i];
    // Small results through the pipe as well.
    auto small = pool.map<echo_printing>(std::vector<std::vector<char>>(small_count, std::vector<char>(10, 'z')), 1);
    for (const auto& s : small) wrong += s != std::vector<char>(10, 'z');
    pool.close();
    pool.join();
    report(wrong == 0 ? "exact" : std::to_string(wrong) + " wrong results");
    return wrong == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    report(std::string("exception: ") + e.what());
    return 1;
  }
}

void set_nproc(rlim_t soft) {
  rlimit limit{soft, 4096};
  ::setrlimit(RLIMIT_NPROC, &limit);
}

int nproc(const std::string& method) {
  if (::getuid() == 0) {
    // RLIMIT_NPROC does not bind root: become a user of no other process,
    // one per start method, as the three may run at once (and count apart).
    const uid_t uid = method == "fork" ? 61001 : method == "posix_spawn" ? 61002 : 61003;
    if (::setgroups(0, nullptr) != 0 || ::setgid(uid) != 0 || ::setuid(uid) != 0) {
      std::printf("could not become user %u\n", static_cast<unsigned>(uid));
      return 3;
    }
  }
  const procpool::Options options{.processes = 2, .start_method = method_named(method)};
  set_nproc(1);  // this thread alone: no I/O thread
  try {
    procpool::Pool pool(options);
    std::printf("pool: made with no thread to spare\n");
    return 4;
  } catch (const std::system_error& e) {
    std::printf("pool: %s\n", e.what());
  }
  set_nproc(2);  // this thread and the I/O thread: no worker, no fork server
  procpool::Pool pool(options);
  try {
    pool.map<square>(std::vector<long>{0, 1, 2, 3}, 1);
    std::printf("map: ran with no process to spare\n");
    return 5;
  } catch (const procpool::Error& e) {
    std::printf("map: %s\n", e.what());
  }
  set_nproc(64);
  auto squares = pool.map<square>(std::vector<long>{0, 1, 2, 3}, 1);
  std::printf("recovered:");
  for (long v : squares) std::printf(" %ld", v);
  std::printf("\n");
  return 0;
}

/// This process's children, zombies included.
std::vector<int> child_pids() {
  std::vector<int> pids;
  if (DIR* tasks = ::opendir("/proc/self/task")) {
    while (dirent* entry = ::readdir(tasks)) {
      if (entry->d_name[0] == '.') continue;
      std::string path = std::string("/proc/self/task/") + entry->d_name + "/children";
      if (FILE* f = std::fopen(path.c_str(), "re")) {
        int pid;
        while (std::fscanf(f, "%d", &pid) == 1) pids.push_back(pid);
        std::fclose(f);
      }
    }
    ::closedir(tasks);
  }
  return pids;
}

std::size_t child_count() { return child_pids().size(); }

long nap_long(long ms) {
  std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  return ms;
}

/// A subreaper (as PID 1 is) inherits the workers of a fork server that
/// dies: their ends must still be told as the fork server's.
int kill_server() {
  ::prctl(PR_SET_CHILD_SUBREAPER, 1);
  procpool::Pool pool({.processes = 2, .start_method = procpool::StartMethod::forkserver});
  if (pool.map<square>(std::vector<long>{1, 2, 3}, 1) != std::vector<long>{1, 4, 9}) return 3;
  const std::vector<int> servers = child_pids();  // the fork server, the pool's only child
  if (servers.size() != 1) return 4;
  auto first = pool.apply_async<nap_long>(30'000L);
  auto second = pool.apply_async<nap_long>(30'000L);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ::kill(servers[0], SIGKILL);
  for (auto* r : {&first, &second}) {
    try {
      r->get();
      std::printf("no error\n");
    } catch (const std::exception& e) {
      std::printf("lost: %s\n", e.what());
    }
  }
  std::printf("after: %ld\n", pool.apply<square>(8L));
  return 0;
}

int reaper(const std::string& method, int cycles, bool subreaper) {
  if (subreaper) ::prctl(PR_SET_CHILD_SUBREAPER, 1);
  std::size_t after_join = 0, after_destruction = 0;
  for (int cycle = 0; cycle < cycles; ++cycle) {
    {
      procpool::Pool pool({.processes = 2, .start_method = method_named(method)});
      if (pool.map<square>(std::vector<long>{1, 2, 3}, 1) != std::vector<long>{1, 4, 9}) return 3;
      pool.close();
      pool.join();
      after_join += child_count();
    }
    after_destruction += child_count();
  }
  std::printf("children after join %zu, after destruction %zu\n", after_join, after_destruction);
  return 0;
}

}  // namespace

std::vector<char> megabytes(int n) { return std::vector<char>(static_cast<std::size_t>(n) << 20, 'm'); }

long print_unflushed(long x) {
  std::printf("task %ld\n", x);  // stdout is a file: fully buffered
  return x;
}

int unflushed(const std::string& method, const char* file) {
  if (std::freopen(file, "w", stdout) == nullptr) return 3;
  {
    procpool::Pool pool({.processes = 2, .start_method = method_named(method)});
    pool.map<print_unflushed>(std::vector<long>{1, 2, 3, 4}, 1);
  }  // destroyed at once: the workers are idle
  return 0;
}

int few_fds(const std::string& method, int limit) {
  ::close_range(3, ~0U, 0);  // fds the test runner left open would count against the limit
  rlimit low{};
  ::getrlimit(RLIMIT_NOFILE, &low);
  low.rlim_cur = static_cast<rlim_t>(limit);
  if (::setrlimit(RLIMIT_NOFILE, &low) != 0) return 3;
  try {
    procpool::Pool pool({.processes = 2, .start_method = method_named(method), .maxtasksperchild = 5});
    std::vector<long> xs(60);
    for (std::size_t i = 0; i < xs.size(); ++i) xs[i] = static_cast<long>(i);
    const auto squares = pool.map<square>(xs, 1);
    bool right = squares.size() == xs.size();
    for (std::size_t i = 0; right && i < xs.size(); ++i) right = squares[i] == xs[i] * xs[i];
    std::printf("squares %s\n", right ? "ok" : "wrong");
    const auto big = pool.apply<megabytes>(4);
    std::printf("big %s\n", big.size() == (std::size_t{4} << 20) && big.back() == 'm' ? "ok" : "wrong");
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
  }
  return 0;
}

long slow_square(long x) {
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  return x * x;
}

int open_fds() {
  int n = 0;
  if (DIR* dir = ::opendir("/proc/self/fd")) {
    while (::readdir(dir) != nullptr) ++n;
    ::closedir(dir);
    n -= 3;  // ".", ".." and the directory's own fd
  }
  return n;
}

int successor(const std::string& method) {
  ::close_range(3, ~0U, 0);
  try {
    procpool::Pool pool({.processes = 1, .start_method = method_named(method), .maxtasksperchild = 1});
    (void)pool.apply<square>(2L);
    // The first worker has exited and its successor is ready: the fds open
    // now are those of a pool with one worker.
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    // Two more: the next successor, started early as this worker runs its
    // last task, cannot have both its pipes until that worker exits.
    const int limit = open_fds() + 2;
    rlimit low{};
    ::getrlimit(RLIMIT_NOFILE, &low);
    low.rlim_cur = static_cast<rlim_t>(limit);
    if (::setrlimit(RLIMIT_NOFILE, &low) != 0) return 3;
    const auto squares = pool.map<slow_square>(std::vector<long>{1, 2, 3, 4}, 1);
    std::printf("slow %s\n", squares == std::vector<long>{1, 4, 9, 16} ? "ok" : "wrong");
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
  }
  return 0;
}

long crash_on_seven(long x) {
  if (x % 40 == 7) ::raise(SIGSEGV);
  return x * x;
}

/// At the fewest fds a pool of 2 with relayed output runs with (one worker,
/// the other's starts failing), its worker crashes: the successor can start
/// only once the output relay has closed the dead worker's pipes.
int crash_relay(const std::string& method) {
  ::close_range(3, ~0U, 0);
  procpool::Options options{.processes = 2, .start_method = method_named(method)};
  options.worker_output = procpool::WorkerOutput::lines;
  rlimit limit{};
  ::getrlimit(RLIMIT_NOFILE, &limit);
  for (rlim_t soft = 8; soft < 64; ++soft) {
    limit.rlim_cur = soft;
    if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) return 3;
    try {
      procpool::Pool probe(options);
      if (probe.apply<square>(2L) != 4) return 4;
    } catch (const std::exception&) {
      continue;  // too few
    }
    procpool::Pool pool(options);
    (void)pool.apply<square>(2L);
    // The other slot's starts keep failing, further and further apart: its
    // backoff is near its 5 s cap when the first crash comes.
    std::this_thread::sleep_for(std::chrono::seconds(4));
    std::vector<long> inputs(200);
    for (std::size_t i = 0; i < inputs.size(); ++i) inputs[i] = static_cast<long>(i);
    int crashed = 0, lost = 0;
    std::string first;
    for (const auto& r : pool.imap<crash_on_seven>(inputs).results()) {
      if (r) continue;
      if (r.error_message().find("SIGSEGV") != std::string::npos) {
        ++crashed;
      } else if (lost++ == 0) {
        first = ": " + r.error_message();
      }
    }
    std::printf("crashed %d, lost %d%s\n", crashed, lost, first.c_str());
    return 0;
  }
  std::printf("no fd limit up to 64 let a pool start\n");
  return 0;
}

bool write_file(const char* path, const std::string& text) {
  FILE* f = std::fopen(path, "we");
  if (f == nullptr) return false;
  const bool written = std::fputs(text.c_str(), f) >= 0;
  return std::fclose(f) == 0 && written;
}

int no_proc(const std::string& method) {
  const bool root = ::geteuid() == 0;
  const auto uid = ::geteuid();
  const auto gid = ::getegid();
  if (::unshare(root ? CLONE_NEWNS : CLONE_NEWUSER | CLONE_NEWNS) != 0) {
    std::printf("cannot unshare: %s\n", std::strerror(errno));
    return 3;
  }
  if (!root &&
      !(write_file("/proc/self/setgroups", "deny") && write_file("/proc/self/uid_map", fmt::format("{0} {0} 1", uid)) &&
        write_file("/proc/self/gid_map", fmt::format("{0} {0} 1", gid)))) {
    std::printf("cannot map ids: %s\n", std::strerror(errno));
    return 3;
  }
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
      ::mount("none", "/proc", "tmpfs", 0, nullptr) != 0) {
    std::printf("cannot mount: %s\n", std::strerror(errno));
    return 3;
  }
  try {
    procpool::Pool pool({.processes = 1, .start_method = method_named(method)});
    auto r = pool.map<square>(std::vector<long>{1, 2, 3});
    std::printf("results %ld %ld %ld\n", r[0], r[1], r[2]);
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
  }
  // Not exit(): a sanitizer's exit checks read /proc.
  std::fflush(stdout);
  ::_exit(0);
}

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "threaded-fork") return threaded_fork();
  if (mode == "orphan" && argc > 2) return start_busy_pool(argv[2], true);
  if (mode == "output" && argc > 4) return relay_output(argv[2], argv[3], argv[4]);
  if (mode == "closed-stdio" && argc > 4) {
    return closed_stdio(argv[2], argv[3], argv[4], argc > 5 && std::string(argv[5]) == "late");
  }
  if (mode == "nproc" && argc > 2) return nproc(argv[2]);
  if (mode == "fewfds" && argc > 3) return few_fds(argv[2], std::atoi(argv[3]));
  if (mode == "successor" && argc > 2) return successor(argv[2]);
  if (mode == "noproc" && argc > 2) return no_proc(argv[2]);
  if (mode == "killserver") return kill_server();
  if (mode == "crashrelay" && argc > 2) return crash_relay(argv[2]);
  if (mode == "unflushed" && argc > 3) return unflushed(argv[2], argv[3]);
  if (mode == "reaper" && argc > 3) {
    return reaper(argv[2], std::atoi(argv[3]), argc > 4 && std::string(argv[4]) == "subreaper");
  }
  if (mode == "interrupt" && argc > 2) {
    ::setpgid(0, 0);
    return start_busy_pool(argv[2], false);
  }
  std::fprintf(stderr, "procpool_helper: unknown mode '%s'\n", mode.c_str());
  return 2;
}
