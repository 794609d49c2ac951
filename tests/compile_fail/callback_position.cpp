// Python's map_async(f, xs, callback=cb) written as map_async<f>(xs, cb):
// the callbacks come after the chunksize. It must fail with procpool's
// message saying so, not a page of overload candidates.
#include <procpool/procpool.hpp>

#include <vector>

long square(long x) { return x * x; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  auto squares = pool.map_async<square>(std::vector<long>{1, 2}, [](const std::vector<long>&) {});
  return static_cast<int>(squares.get().size());
}
