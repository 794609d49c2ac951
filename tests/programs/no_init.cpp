// A program that never calls procpool::init, with fork pools (the one start
// method that works without it): one made before main(), one made in main()
// and owned by a namespace-scope unique_ptr, and one never used. Each forks
// its workers at its first call, and a warning says so, once. All three are
// destroyed after main() returns, the second after procpool's own statics
// would be (the sanitizer builds catch a use of freed memory there).
//
// usage: procpool_no_init     prints "squares: 0 1 4 9", "cubes: 0 1 8 27"
#include <procpool/procpool.hpp>

#include <cstdio>
#include <memory>
#include <vector>

namespace {

std::unique_ptr<procpool::Pool> held;  // made before the pool it will own
procpool::Pool early({.processes = 2, .start_method = procpool::StartMethod::fork});
procpool::Pool unused({.processes = 1, .start_method = procpool::StartMethod::fork});

long square(long x) { return x * x; }
long cube(long x) { return x * x * x; }

}  // namespace

int main() {
  held =
      std::make_unique<procpool::Pool>(procpool::Options{.processes = 2, .start_method = procpool::StartMethod::fork});
  std::printf("squares:");
  for (long v : early.map<square>(std::vector<long>{0, 1, 2, 3}, 1)) std::printf(" %ld", v);
  std::printf("\ncubes:");
  for (long v : held->map<cube>(std::vector<long>{0, 1, 2, 3}, 1)) std::printf(" %ld", v);
  std::printf("\n");
  std::fflush(stdout);
  return 0;
}
