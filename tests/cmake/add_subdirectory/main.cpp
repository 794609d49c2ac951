// A program of two source files using a procpool added with add_subdirectory,
// its engine compiled once (procpool::compiled): each file maps a function of
// its own, under each start method, and the answers are checked.
#include <procpool/procpool.hpp>

#include <cstdio>
#include <vector>

#include "cube.hpp"

namespace {
int square(int x) { return x * x; }
}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  for (auto method :
       {procpool::StartMethod::fork, procpool::StartMethod::posix_spawn, procpool::StartMethod::forkserver}) {
    procpool::Pool pool({.processes = 2, .start_method = method});
    const std::vector<int> squares = pool.map<square>(std::vector<int>{1, 2, 3, 4});
    const std::vector<int> cubed = cubes(pool, {1, 2, 3, 4});
    if (squares != std::vector<int>{1, 4, 9, 16} || cubed != std::vector<int>{1, 8, 27, 64}) {
      std::fprintf(stderr, "consumer: wrong results under start method %d\n", static_cast<int>(method));
      return 1;
    }
  }
  std::printf("consumer: squares and cubes from two source files under all three start methods\n");
  return 0;
}
