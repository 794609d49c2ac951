// Shared helpers for the test suite: every semantic test runs under each start method.
#pragma once

#include <catch2/catch.hpp>
#include <procpool/procpool.hpp>

#include <dirent.h>

#include <string>
#include <vector>

namespace test {

struct Fork {
  static constexpr procpool::StartMethod method = procpool::StartMethod::fork;
};

/// A pool of `processes` workers with the test's start method.
template <class Method>
procpool::Options options(procpool::Options o = {}) {
  o.start_method = Method::method;
  if (o.processes == 0) o.processes = 2;
  return o;
}

/// Open file descriptors of this process.
inline std::size_t open_fd_count() {
  std::size_t count = 0;
  if (DIR* dir = ::opendir("/proc/self/fd")) {
    while (::readdir(dir) != nullptr) ++count;
    ::closedir(dir);
  }
  return count - 3;  // ".", ".." and the directory's own fd
}

/// Live (or zombie) children of this process, whichever of its threads started them.
inline std::vector<int> child_pids() {
  std::vector<int> pids;
  if (DIR* tasks = ::opendir("/proc/self/task")) {
    while (dirent* entry = ::readdir(tasks)) {
      if (entry->d_name[0] == '.') continue;
      std::string path = std::string("/proc/self/task/") + entry->d_name + "/children";
      if (FILE* f = std::fopen(path.c_str(), "r")) {
        int pid;
        while (std::fscanf(f, "%d", &pid) == 1) pids.push_back(pid);
        std::fclose(f);
      }
    }
    ::closedir(tasks);
  }
  return pids;
}

}  // namespace test

/// A test case run once per start method ("name - test::Fork", ...).
#define POOL_TEST(name, tags) TEMPLATE_TEST_CASE(name, tags, test::Fork)
