// A function of two arguments mapped over single values: must fail with
// procpool's message, not pages of std::invoke errors.
#include <procpool/procpool.hpp>

#include <vector>

long add(long a, long b) { return a + b; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  auto sums = pool.map<add>(std::vector<long>{1, 2});
  return static_cast<int>(sums.size());
}
