// The smallest real use of a procpool pulled in with FetchContent: map a
// function over a few numbers in worker processes and check the answer.
#include <procpool/procpool.hpp>

#include <cstdio>
#include <vector>

namespace {
int square(int x) { return x * x; }
}  // namespace

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool({.processes = 2});
  const std::vector<int> squares = pool.map<square>(std::vector<int>{1, 2, 3, 4});
  if (squares != std::vector<int>{1, 4, 9, 16}) {
    std::fprintf(stderr, "consumer: pool.map<square> returned the wrong results\n");
    return 1;
  }
  std::printf("consumer: pool.map<square>({1, 2, 3, 4}) == {1, 4, 9, 16} on %zu worker processes\n", pool.processes());
  return 0;
}
