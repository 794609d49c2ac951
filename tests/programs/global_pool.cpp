// A Pool at namespace scope, made before main() runs (Python's module-level
// pool), under the start method PROCPOOL_TEST_METHOD names. Its workers
// re-run this binary (posix_spawn, forkserver) and make this Pool again
// before their main() reaches procpool::init. Its initializer must run in
// every worker, and under fork its workers are forked in procpool::init.
//
// usage: PROCPOOL_TEST_METHOD=<method> procpool_global_pool
//        prints "squares: 0 1 4 9", "task: refused" and "joined"
#include <procpool/procpool.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

procpool::StartMethod method_from_environment() {
  const char* name = std::getenv("PROCPOOL_TEST_METHOD");
  const std::string method = name != nullptr ? name : "";
  if (method == "fork") return procpool::StartMethod::fork;
  if (method == "posix_spawn") return procpool::StartMethod::posix_spawn;
  return procpool::StartMethod::forkserver;
}

long g_factor = 0;  // 1 in a worker whose initializer ran

void set_factor() { g_factor = 1; }

// Its initializer is named during static initialization too.
procpool::Pool pool({.processes = 2,
                     .start_method = method_from_environment(),
                     .initializer = procpool::initializer<set_factor>(),
                     .error_on_threaded_fork = true});

long square(long x) { return x * x * g_factor; }

// A task using the program's pool: a dormant copy (re-run worker) or a copy
// made by fork (fork worker), which must refuse, not wait for ever.
std::string use_pool(long x) {
  try {
    pool.apply<square>(x);
    return "ran";
  } catch (const procpool::PoolNotRunning& e) {
    return std::string(e.what()).find("a task cannot use the pool of the program") != std::string::npos ? "refused"
                                                                                                        : e.what();
  }
}

}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  // A fork pool made before init has forked its workers in init: this
  // thread is in none of those forks (error_on_threaded_fork would throw).
  std::thread side([] { std::this_thread::sleep_for(std::chrono::milliseconds(50)); });
  try {
    std::printf("squares:");
    for (long v : pool.map<square>(std::vector<long>{0, 1, 2, 3}, 1)) std::printf(" %ld", v);
    std::printf("\n");
    std::printf("task: %s\n", pool.apply<use_pool>(2L).c_str());
    pool.close();
    pool.join();
    std::printf("joined\n");
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    side.join();
    return 1;
  }
  side.join();
  return 0;
}
