// A program started with its stdin, stdout or stderr closed (a daemon, a
// service started with `prog <&- >&-`): procpool's own fds never take the
// numbers 0, 1 and 2, so what a task prints never lands in a pipe or a
// shared buffer of the pool's, and every result is exact.
#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common.hpp"

POOL_TEST("results are exact when the program starts with stdin, stdout or stderr closed", "[stdio]") {
  const std::string method(procpool::to_string(TestType::method));
  const std::vector<std::vector<int>> closed_sets = {{0}, {1}, {2}, {0, 1}, {0, 1, 2}};
  // Under the sanitizers each run takes seconds (every process starts
  // slowly): two modes, one relaying output and one not.
#if defined(PROCPOOL_SANITIZED)
  const std::vector<std::string> modes = {"inherit", "prefixed"};
#else
  const std::vector<std::string> modes = {"inherit", "lines", "prefixed", "callback"};
#endif
  for (const auto& closed : closed_sets) {
    for (const std::string& mode : modes) {
      test::TempDir dir;
      auto run = test::run_program({PROCPOOL_HELPER, "closed-stdio", method, mode, dir / "verdict"}, 60000, closed);
      std::ifstream in(dir / "verdict");
      std::stringstream verdict;
      verdict << in.rdbuf();
      INFO(fmt::format("fds {} closed, worker_output {}: wait status {}\n{}", fmt::join(closed, ","), mode, run.status,
                       run.output));
      CHECK(verdict.str() == "exact");
      CHECK(WIFEXITED(run.status));
      CHECK(WEXITSTATUS(run.status) == 0);
    }
  }
}

POOL_TEST("results are exact when the program closes its stdio while the pool runs", "[stdio]") {
  // Workers replaced after each task: their new pipes are made while 0, 1 and 2 are free.
  const std::string method(procpool::to_string(TestType::method));
  for (const std::string mode : {"inherit", "lines", "callback"}) {
    test::TempDir dir;
    auto run = test::run_program({PROCPOOL_HELPER, "closed-stdio", method, mode, dir / "verdict", "late"}, 60000);
    std::ifstream in(dir / "verdict");
    std::stringstream verdict;
    verdict << in.rdbuf();
    INFO(fmt::format("worker_output {}: wait status {}\n{}", mode, run.status, run.output));
    CHECK(verdict.str() == "exact");
    CHECK(WIFEXITED(run.status));
    CHECK(WEXITSTATUS(run.status) == 0);
  }
}

namespace stdio_test {

/// An open file's identity: the same in every process that holds it.
struct Identity {
  std::uint64_t dev = 0, ino = 0;
  bool operator==(const Identity&) const = default;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(dev, ino);
  }
};

/// One fd above 2 that a program this process exec'd would inherit.
struct Inheritable {
  int fd = -1;
  Identity file;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(fd, file);
  }
};

std::vector<Inheritable> inheritable_fds(int) {
  std::vector<Inheritable> fds;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return {{-1, {}}};
  while (dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    const int fd = std::atoi(entry->d_name);
    if (fd <= 2 || fd == ::dirfd(dir)) continue;
    const int flags = ::fcntl(fd, F_GETFD);
    struct stat st {};
    if (flags >= 0 && (flags & FD_CLOEXEC) == 0 && ::fstat(fd, &st) == 0) {
      fds.push_back({fd, {static_cast<std::uint64_t>(st.st_dev), static_cast<std::uint64_t>(st.st_ino)}});
    }
  }
  ::closedir(dir);
  return fds;
}

}  // namespace stdio_test

POOL_TEST("a program a task runs inherits none of the pool's fds", "[stdio][fds]") {
  // Files the program itself would pass on (from its own parent) a worker
  // passes on too: told apart by identity, not number, as the pool puts its
  // own pipes at numbers such a file may have too.
  const std::vector<stdio_test::Inheritable> own = stdio_test::inheritable_fds(0);
  for (const auto output : {procpool::WorkerOutput::inherit, procpool::WorkerOutput::lines}) {
    procpool::Pool pool(test::options<TestType>({.worker_output = output}));
    for (auto fds : pool.map<stdio_test::inheritable_fds>(std::vector<int>(4, 0), 1)) {
      std::erase_if(fds, [&](const stdio_test::Inheritable& f) {
        return std::ranges::any_of(own, [&](const auto& o) { return o.file == f.file; });
      });
      std::vector<int> numbers;
      for (const auto& f : fds) numbers.push_back(f.fd);
      INFO("fds of the pool's a task's exec would inherit: " << fmt::format("{}", fmt::join(numbers, ", ")));
      CHECK(numbers.empty());
    }
  }
}

TEST_CASE("procpool puts /dev/null on closed stdio before it makes any fd", "[stdio][fds]") {
  // A program that closes fd 1 while a pool runs: the next fd procpool makes
  // must not be fd 1 even for a moment, or the output relay's next write to
  // fd 1 lands in it. In a child, whose fds this may close.
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(0);
    ::close(1);
    int failures = 0;
    {
      auto pipe = procpool::detail::make_pipe();  // would have been fds 0 and 1
      struct stat out {
      }, null{};
      if (pipe.read.get() <= 2 || pipe.write.get() <= 2) failures |= 1;
      if (::fstat(1, &out) != 0 || ::stat("/dev/null", &null) != 0 || out.st_ino != null.st_ino) failures |= 2;
    }
    ::close(1);
    {
      auto memory = procpool::detail::create_shm_buffer("procpool-test", 4096);  // memfd_create: make_tracked
      if (memory->fd.get() <= 2 || ::fcntl(1, F_GETFD) == -1) failures |= 4;
    }
    ::_exit(failures);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
