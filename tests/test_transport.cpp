// The transport's promises: one pipe pair per worker and nothing else of
// the parent's, close-on-exec everywhere, bounded messages.
#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <string>
#include <vector>

#include "common.hpp"

namespace {

/// What the worker has open beyond stdin/stdout/stderr: "pipe:[...]", "socket:[...]", paths.
std::vector<std::string> open_fds_beyond_stdio(int) {
  std::vector<std::string> targets;
  if (DIR* dir = ::opendir("/proc/self/fd")) {
    int own = ::dirfd(dir);
    while (dirent* entry = ::readdir(dir)) {
      if (entry->d_name[0] == '.') continue;
      int fd = std::stoi(entry->d_name);
      if (fd <= 2 || fd == own) continue;
      char target[PATH_MAX] = {};
      std::string link = std::string("/proc/self/fd/") + entry->d_name;
      if (::readlink(link.c_str(), target, sizeof(target) - 1) > 0) targets.push_back(target);
    }
    ::closedir(dir);
  }
  return targets;
}

std::size_t count_pipes(const std::vector<std::string>& targets) {
  std::size_t pipes = 0;
  for (const auto& t : targets) pipes += t.rfind("pipe:", 0) == 0;
  return pipes;
}

std::string echo(std::string s) { return s; }

}  // namespace

POOL_TEST("a worker holds its own two pipe ends and none of its siblings'", "[transport]") {
  // What the program had open before: a fork worker inherits that, as it should.
  auto inherited = open_fds_beyond_stdio(0);
  // Two pools, so a worker of the second could inherit the first pool's pipes too.
  procpool::Pool first(test::options<TestType>({.processes = 3}));
  procpool::Pool second(test::options<TestType>({.processes = 3}));
  CHECK(first.apply<echo>(std::string("warm")) == "warm");
  for (procpool::Pool* pool : {&first, &second}) {
    for (auto fds : pool->map<open_fds_beyond_stdio>(std::vector<int>(12, 0), 1)) {
      std::erase_if(fds, [&](const std::string& t) { return std::count(inherited.begin(), inherited.end(), t) > 0; });
      INFO(fmt::format("{}", fmt::join(fds, ", ")));
      CHECK(fds.size() == 2);
      CHECK(count_pipes(fds) == 2);
    }
  }
}

POOL_TEST("every fd the pool opens in the parent is close-on-exec", "[transport]") {
  std::vector<int> before;
  for (int fd = 3; fd < 1024; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1) before.push_back(fd);
  }
  procpool::Pool pool(test::options<TestType>());
  CHECK(pool.apply<echo>(std::string("x")) == "x");
  for (int fd = 3; fd < 1024; ++fd) {
    int flags = ::fcntl(fd, F_GETFD);
    if (flags == -1 || std::find(before.begin(), before.end(), fd) != before.end()) continue;
    INFO("fd " << fd);
    CHECK((flags & FD_CLOEXEC) != 0);
  }
}

POOL_TEST("a message over max_message_bytes fails its task, not the pool", "[transport]") {
  procpool::Pool pool(test::options<TestType>({.max_message_bytes = 4096}));
  // Too large to send: fails before it leaves the parent.
  auto big_argument = test::thrown<procpool::ProtocolError>([&] { pool.apply<echo>(std::string(10000, 'a')); });
  CHECK_THAT(big_argument.what(), Catch::Contains("max_message_bytes"));
  // Too large a result: the worker reports it instead of sending it.
  auto big_result = test::thrown<procpool::ProtocolError>(
      [&] { pool.apply([](int n) { return std::string(static_cast<std::size_t>(n), 'b'); }, 10000); });
  CHECK_THAT(big_result.what(), Catch::Contains("max_message_bytes"));
  // And the pool goes on.
  CHECK(pool.apply<echo>(std::string("fine")) == "fine");
}

POOL_TEST("payloads of several megabytes travel intact both ways", "[transport]") {
  procpool::Pool pool(test::options<TestType>());
  std::vector<std::string> blobs;
  for (char c : {'a', 'b', 'c', 'd'}) blobs.push_back(std::string(3 << 20, c));
  auto back = pool.map<echo>(blobs, 1);
  CHECK(back == blobs);
}
