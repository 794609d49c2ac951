// A function taking a non-const reference: a received value cannot bind to it.
#include <procpool/procpool.hpp>

#include <vector>

long increment(long& x) { return ++x; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  auto counts = pool.map<increment>(std::vector<long>{1, 2});
  return static_cast<int>(counts.size());
}
