// Helper program for tests that need a whole process of their own: a
// program that is signalled, crashes, or must be watched from outside.
//
// usage: procpool_helper <mode> [args...]
//   threaded-fork   create two fork pools while another thread runs; print "ok"
#include <procpool/procpool.hpp>

#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

long square(long x) { return x * x; }

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

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "threaded-fork") return threaded_fork();
  std::fprintf(stderr, "procpool_helper: unknown mode '%s'\n", mode.c_str());
  return 2;
}
