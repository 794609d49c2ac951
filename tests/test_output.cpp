// Worker output (Options::worker_output, Options::on_worker_output): whole
// lines, on the right stream, from the right worker, even from a worker that
// crashes or is terminated mid-line; and nothing leaks or hangs.
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common.hpp"

namespace {

/// Length of line `line` of task `task`: from 1 to about 12 KiB, mostly over PIPE_BUF
/// (the same as in tests/programs/helper.cpp).
std::size_t line_length(long task, int line) {
  return 1 + static_cast<std::size_t>((task * 997 + line * 1319) % 12000);
}

/// Prints 20 lines to stdout and 20 to stderr, "<out|err> <task> <line> <pid> <letters> end",
/// each in write()s of at most 700 bytes, so that unrelayed lines of two workers would mix.
long print_lines_in_pieces(long task) {
  for (int line = 0; line < 20; ++line) {
    for (int fd : {1, 2}) {
      std::string text = fmt::format("{} {} {} {} {} end\n", fd == 1 ? "out" : "err", task, line, ::getpid(),
                                     std::string(line_length(task, line), static_cast<char>('a' + (task + line) % 26)));
      for (std::size_t at = 0; at < text.size(); at += 700) {
        std::size_t n = std::min<std::size_t>(700, text.size() - at);
        if (::write(fd, text.data() + at, n) != static_cast<ssize_t>(n)) return -1;
      }
    }
  }
  return task;
}

/// Why `line` is not a whole line of print_lines_in_pieces for `stream` ("out"/"err"); empty if it is.
/// Sets `pid` to the pid the line names.
std::string malformed(const std::string& line, const std::string& stream, long& pid) {
  std::istringstream in(line);
  std::string tag, letters, end;
  long task = -1;
  int number = -1;
  if (!(in >> tag >> task >> number >> pid >> letters >> end) || tag != stream || end != "end" || task < 0 ||
      number < 0 || !in.eof()) {
    return "not of the form '" + stream + " <task> <line> <pid> <letters> end'";
  }
  if (letters != std::string(line_length(task, number), static_cast<char>('a' + (task + number) % 26))) {
    return fmt::format("line {} of task {} has {} wrong letters", number, task, letters.size());
  }
  return {};
}

/// Collects what on_worker_output receives; `wait_for` blocks until a line matches.
struct Collector {
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<procpool::WorkerLine> lines;

  std::function<void(const procpool::WorkerLine&)> callback() {
    return [this](const procpool::WorkerLine& line) {
      {
        std::lock_guard lock(mutex);
        lines.push_back(line);
      }
      changed.notify_all();
    };
  }
  std::vector<procpool::WorkerLine> snapshot() {
    std::lock_guard lock(mutex);
    return lines;
  }
  bool wait_for(const std::string& text, std::chrono::seconds timeout = std::chrono::seconds(30)) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, timeout, [&] {
      return std::any_of(lines.begin(), lines.end(), [&](const auto& l) { return l.text == text; });
    });
  }
  std::vector<std::string> texts(procpool::WorkerStream stream) {
    std::vector<std::string> out;
    for (const auto& l : snapshot()) {
      if (l.stream == stream) out.push_back(l.text);
    }
    return out;
  }
};

std::string fd_target(int fd) {
  char target[PATH_MAX] = {};
  std::string link = "/proc/self/fd/" + std::to_string(fd);
  if (::readlink(link.c_str(), target, sizeof(target) - 1) < 0) return "?";
  return target;
}

/// What the worker's fds 1 and 2 are.
std::vector<std::string> stdio_targets(int) { return {fd_target(1), fd_target(2)}; }

int print_and_crash(int) {
  std::printf("last words of %d\n", static_cast<int>(::getpid()));  // line-buffered when relayed
  std::fputs("and a half line on stderr", stderr);
  ::raise(SIGKILL);  // no handler runs (a fork of the test runner has Catch's) and nothing is flushed
  return 0;
}

int print_half_line(int part) {
  if (part == 0) std::printf("the first half, ");  // no newline: it waits for the second half
  if (part == 1)
    std::cout << "the second half\n"
              << "and no newline at the end";
  return part;
}

int print_long_line(int bytes) {
  std::string line(static_cast<std::size_t>(bytes), 'z');
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fputs("\nshort\n", stdout);
  return bytes;
}

/// Prints "started", then a half line that grows for ever (until the pool stops it).
int print_for_ever(int) {
  // One write(): the half line is there by the time "started" is.
  if (::write(1, "started\nx", 9) != 9) return -1;
  for (;;) {
    std::printf("x");
    std::fflush(stdout);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

/// Starts a grandchild that keeps the worker's stdout open for 60 s; returns its pid.
int leave_grandchild(int) {
  std::printf("before the grandchild\n");
  std::fflush(stdout);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close_range(3, ~0U, 0);  // only stdout and stderr: the pool's own pipes must not be what hangs
    ::sleep(60);
    ::_exit(0);
  }
  return static_cast<int>(pid);
}

/// Appends "destroyed in <pid>" to the file PROCPOOL_TEST_DTOR_WITNESS names,
/// if it names one, when the process runs its static destructors.
struct DestructorWitness {
  DestructorWitness() = default;
  DestructorWitness(const DestructorWitness&) = delete;
  DestructorWitness& operator=(const DestructorWitness&) = delete;
  ~DestructorWitness() {
    const char* path = std::getenv("PROCPOOL_TEST_DTOR_WITNESS");
    if (path == nullptr) return;
    if (std::FILE* f = std::fopen(path, "a")) {
      std::fprintf(f, "destroyed in %d\n", static_cast<int>(::getpid()));
      std::fclose(f);
    }
  }
} destructor_witness;

/// Prints half a line (left in stdout's buffer), then calls exit().
int print_and_exit(int code) {
  std::printf("exit(%d) from a task", code);
  std::exit(code);
}

int twice(int x) { return 2 * x; }

}  // namespace

POOL_TEST("relayed worker lines reach the parent's stdout and stderr whole", "[output]") {
  test::TempDir dir;
  const std::string method(procpool::to_string(TestType::method));
  for (std::string mode : {"lines", "prefixed"}) {
    INFO("worker_output = " << mode);
    auto run = test::run_program({PROCPOOL_HELPER, "output", method, mode, dir / "stderr"});
    REQUIRE(WIFEXITED(run.status));
    REQUIRE(WEXITSTATUS(run.status) == 0);
    std::map<std::string, std::vector<std::string>> streams;
    std::istringstream out(run.output);
    for (std::string line; std::getline(out, line);) streams["out"].push_back(line);
    streams["err"] = test::read_lines(dir / "stderr");
    REQUIRE(!streams["out"].empty());
    CHECK(streams["out"].back() == "done");
    streams["out"].pop_back();
    for (auto& [stream, lines] : streams) {
      INFO("stream " << stream);
      CHECK(lines.size() == 24 * 20);  // 24 tasks, 20 lines each
      std::size_t bad = 0;
      for (std::string line : lines) {
        std::string prefix_problem;
        long prefix_pid = -1;
        if (mode == "prefixed") {
          std::size_t slot = 99;
          int used = 0;
          if (std::sscanf(line.c_str(), "[worker %zu pid %ld] %n", &slot, &prefix_pid, &used) != 2 || used == 0 ||
              slot >= 4) {
            prefix_problem = "no prefix '[worker <0-3> pid <pid>] '";
          }
          line.erase(0, static_cast<std::size_t>(used));
        }
        long pid = -2;
        std::string problem = malformed(line, stream, pid);
        if (problem.empty()) problem = prefix_problem;
        if (problem.empty() && mode == "prefixed" && prefix_pid != pid) problem = "the prefix names another pid";
        if (!problem.empty() && ++bad <= 3) {
          UNSCOPED_INFO(problem << ": " << line.substr(0, 120) << (line.size() > 120 ? "..." : ""));
        }
      }
      CHECK(bad == 0);
    }
  }
}

POOL_TEST("what tasks printed to a file without fflush is written when the pool is destroyed", "[output]") {
  // Inherited stdout, a file: stdio buffers it in the worker. An idle
  // worker used to be sent SIGTERM with its EOF, and the buffer was lost.
  test::TempDir dir;
  const std::string file = dir / "out";
  auto run =
      test::run_program({PROCPOOL_HELPER, "unflushed", std::string(procpool::to_string(TestType::method)), file});
  INFO(run.output);
  REQUIRE(WIFEXITED(run.status));
  REQUIRE(WEXITSTATUS(run.status) == 0);
  auto lines = test::read_lines(file);
  std::sort(lines.begin(), lines.end());
  CHECK(lines == std::vector<std::string>{"task 1", "task 2", "task 3", "task 4"});
}

POOL_TEST("on_worker_output receives each line with its worker's slot, pid and stream", "[output]") {
  Collector got;
  std::vector<long> tasks(12);
  for (std::size_t i = 0; i < tasks.size(); ++i) tasks[i] = static_cast<long>(i);
  {
    procpool::Pool pool(test::options<TestType>({.processes = 3, .on_worker_output = got.callback()}));
    CHECK(pool.map<print_lines_in_pieces>(tasks, 1) == tasks);
    pool.close();
    pool.join();  // every line is delivered by the time join() returns
  }
  auto lines = got.snapshot();
  CHECK(lines.size() == 12 * 20 * 2);
  std::map<pid_t, std::size_t> slot_of;
  std::size_t bad = 0;
  for (const auto& line : lines) {
    long pid = -1;
    std::string problem = malformed(line.text, line.stream == procpool::WorkerStream::out ? "out" : "err", pid);
    if (problem.empty() && pid != line.pid) problem = fmt::format("WorkerLine::pid is {}", line.pid);
    if (problem.empty() && line.worker >= 3) problem = fmt::format("WorkerLine::worker is {}", line.worker);
    if (problem.empty() && slot_of.emplace(line.pid, line.worker).first->second != line.worker) {
      problem = "one pid in two slots";
    }
    if (!problem.empty() && ++bad <= 3) UNSCOPED_INFO(problem << ": " << line.text.substr(0, 120));
  }
  CHECK(bad == 0);
  CHECK(slot_of.size() >= 1);
}

POOL_TEST("what a worker prints just before it crashes is delivered", "[output]") {
  Collector got;
  procpool::Pool pool(test::options<TestType>({.processes = 1, .on_worker_output = got.callback()}));
  auto lost = test::thrown<procpool::WorkerLost>([&] { pool.apply<print_and_crash>(0); });
  pool.close();
  pool.join();
  CHECK(got.texts(procpool::WorkerStream::out) ==
        std::vector<std::string>{fmt::format("last words of {}", lost.pid())});
  CHECK(got.texts(procpool::WorkerStream::err) == std::vector<std::string>{"and a half line on stderr"});
  for (const auto& line : got.snapshot()) CHECK(line.pid == lost.pid());
}

POOL_TEST("a task that calls exit() ends its worker: its output arrives, no static destructor runs", "[output]") {
  // Under fork a worker's globals are copies of the parent's: their
  // destructors must not run there on the parent's behalf (removing its
  // files); under the other start methods they are the worker's, and workers
  // never run them either.
  const std::string witness = fmt::format("/tmp/procpool_test_dtor_{}", ::getpid());
  std::remove(witness.c_str());
  ::setenv("PROCPOOL_TEST_DTOR_WITNESS", witness.c_str(), 1);
  Collector got;
  {
    procpool::Pool pool(test::options<TestType>({.processes = 1, .on_worker_output = got.callback()}));
    auto lost = test::thrown<procpool::WorkerLost>([&] { pool.apply<print_and_exit>(3); });
    CHECK(lost.exit_code() == 3);
    CHECK(pool.apply<twice>(21) == 42);  // on the worker that replaced it
    pool.close();
    pool.join();
  }
  ::unsetenv("PROCPOOL_TEST_DTOR_WITNESS");
  CHECK(got.texts(procpool::WorkerStream::out) == std::vector<std::string>{"exit(3) from a task"});
  std::ifstream in(witness);
  const std::string destroyed((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(destroyed.empty());
  std::remove(witness.c_str());
}

POOL_TEST("half lines are joined across tasks, and a last one arrives when the worker exits", "[output]") {
  Collector got;
  procpool::Pool pool(test::options<TestType>({.processes = 1, .on_worker_output = got.callback()}));
  CHECK(pool.apply<print_half_line>(0) == 0);
  CHECK(pool.apply<print_half_line>(1) == 1);
  REQUIRE(got.wait_for("the first half, the second half"));
  pool.close();
  pool.join();
  CHECK(got.texts(procpool::WorkerStream::out) ==
        std::vector<std::string>{"the first half, the second half", "and no newline at the end"});
}

POOL_TEST("a line over 64 KiB arrives in pieces of 64 KiB", "[output]") {
  Collector got;
  procpool::Pool pool(test::options<TestType>({.processes = 1, .on_worker_output = got.callback()}));
  CHECK(pool.apply<print_long_line>(200'000) == 200'000);
  pool.close();
  pool.join();
  auto texts = got.texts(procpool::WorkerStream::out);
  REQUIRE(texts.size() == 5);
  CHECK(texts[0] == std::string(65536, 'z'));
  CHECK(texts[1] == std::string(65536, 'z'));
  CHECK(texts[2] == std::string(65536, 'z'));
  CHECK(texts[3] == std::string(200'000 - 3 * 65536, 'z'));
  CHECK(texts[4] == "short");
}

POOL_TEST("worker_output inherit leaves the workers the parent's stdout and stderr", "[output]") {
  const std::vector<std::string> parents{fd_target(1), fd_target(2)};
  {
    procpool::Pool pool(test::options<TestType>());
    CHECK(pool.apply<stdio_targets>(0) == parents);
  }
  {
    procpool::Pool pool(test::options<TestType>({.worker_output = procpool::WorkerOutput::lines}));
    auto relayed = pool.apply<stdio_targets>(0);
    REQUIRE(relayed.size() == 2);
    CHECK(relayed[0].rfind("pipe:", 0) == 0);
    CHECK(relayed[1].rfind("pipe:", 0) == 0);
    CHECK(relayed[0] != relayed[1]);
    CHECK(relayed[0] != parents[0]);
  }
}

POOL_TEST("relaying output leaks no fd, whether the pool is joined or terminated", "[output]") {
  const std::size_t before = test::open_fd_count();
  std::vector<long> tasks{0, 1, 2, 3, 4, 5};
  {
    Collector got;
    procpool::Pool pool(test::options<TestType>({.maxtasksperchild = 2, .on_worker_output = got.callback()}));
    CHECK(pool.map<print_lines_in_pieces>(tasks, 1) == tasks);  // and workers are replaced on the way
    pool.close();
    pool.join();
  }
  CHECK(test::open_fd_count() == before);
  {
    procpool::Pool pool(test::options<TestType>({.worker_output = procpool::WorkerOutput::prefixed}));
    CHECK(pool.apply<stdio_targets>(0).size() == 2);
    pool.terminate();
  }
  CHECK(test::open_fd_count() == before);
}

POOL_TEST("terminate stops a worker in the middle of a line and delivers the half line", "[output]") {
  const std::size_t before = test::open_fd_count();
  Collector got;
  {
    procpool::Pool pool(test::options<TestType>({.processes = 1, .on_worker_output = got.callback()}));
    auto busy = pool.apply_async<print_for_ever>(0);
    REQUIRE(got.wait_for("started"));
    pool.terminate();
    CHECK_THROWS_AS(busy.get(), procpool::PoolNotRunning);
  }
  auto texts = got.texts(procpool::WorkerStream::out);
  REQUIRE(texts.size() >= 2);
  CHECK(texts.front() == "started");
  CHECK(texts.back().find_first_not_of('x') == std::string::npos);
  CHECK(test::open_fd_count() == before);
}

POOL_TEST("a grandchild holding a worker's stdout open hangs neither join nor terminate", "[output]") {
  for (bool terminate : {false, true}) {
    INFO((terminate ? "terminate" : "close and join"));
    Collector got;
    int grandchild = -1;
    {
      procpool::Pool pool(test::options<TestType>({.processes = 1, .on_worker_output = got.callback()}));
      grandchild = pool.apply<leave_grandchild>(0);
      if (terminate) {
        pool.terminate();
      } else {
        pool.close();
        pool.join();
      }
    }
    CHECK(test::running(grandchild));  // it did hold the pipe all along
    ::kill(grandchild, SIGKILL);
    if (!terminate) CHECK(got.texts(procpool::WorkerStream::out) == std::vector<std::string>{"before the grandchild"});
  }
}

POOL_TEST("an on_worker_output that throws is reported and the pool goes on", "[output]") {
  std::atomic<int> calls{0};
  procpool::Pool pool(test::options<TestType>({.processes = 1, .on_worker_output = [&](const procpool::WorkerLine&) {
                                                 ++calls;
                                                 throw std::runtime_error("the logger is full");
                                               }}));
  CHECK(pool.apply<print_half_line>(1) == 1);
  CHECK(pool.apply<print_half_line>(1) == 1);
  pool.close();
  pool.join();
  CHECK(calls == 3);  // "the second half", then the rest joined with the second call's first line, then the last
}

namespace {
/// Prints 4 MiB of short lines on stdout.
long flood_stdout(long) {
  std::string line(99, 'f');
  line.push_back('\n');
  for (int i = 0; i < 40000; ++i) {
    if (::write(1, line.data(), line.size()) != static_cast<ssize_t>(line.size())) return -1;
  }
  return 0;
}
}  // namespace

POOL_TEST("a parent stdout that nobody reads does not hang terminate", "[output]") {
  // The parent's stdout becomes a pipe that is never read: the relay soon
  // cannot write, and terminate() must still return. (No CHECK while fd 1 is
  // the pipe: Catch2 reports on stdout.)
  int saved = ::dup(1);
  REQUIRE(saved >= 0);
  int unread[2];
  REQUIRE(::pipe2(unread, O_CLOEXEC) == 0);
  ::fflush(stdout);
  ::dup2(unread[1], 1);
  auto start = std::chrono::steady_clock::now();
  {
    procpool::Pool pool(test::options<TestType>({.worker_output = procpool::WorkerOutput::lines}));
    auto flood = pool.apply_async<flood_stdout>(0L);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // let the pipe fill up
    pool.terminate();
  }
  auto took = std::chrono::steady_clock::now() - start;
  ::dup2(saved, 1);
  ::close(saved);
  ::close(unread[0]);
  ::close(unread[1]);
  CHECK(took < std::chrono::seconds(20));  // a hang would be forever; terminate waits 200 ms
}
