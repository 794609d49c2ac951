// Two source files each define a function `transform` in an anonymous
// namespace: the same mangled name for different code. procpool must refuse
// to run either rather than silently run the wrong one.
#include <procpool/procpool.hpp>

#include <cstdio>
#include <vector>

namespace {
long transform(long x) { return x + 1; }
}  // namespace

long run_b(procpool::Pool& pool);

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool({.processes = 1});
  int refused = 0;
  try {
    pool.map<transform>(std::vector<long>{1, 2, 3});
  } catch (const std::logic_error& e) {
    std::printf("%s\n", e.what());
    ++refused;
  }
  try {
    run_b(pool);
  } catch (const std::logic_error&) {
    ++refused;
  }
  std::printf("refused %d\n", refused);
  return refused == 2 ? 0 : 1;
}
