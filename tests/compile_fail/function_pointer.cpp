// Python's pool.map(f, xs): a function passed by address, which no worker
// can use. Must fail with procpool's message.
#include <procpool/procpool.hpp>

#include <vector>

long square(long x) { return x * x; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  auto squares = pool.map(square, std::vector<long>{1, 2});
  return static_cast<int>(squares.size());
}
