// An error_callback that takes one kind of error: it is called with any
// procpool::Error, so it must fail with procpool's message saying what to
// take, not pages of std::function errors.
#include <procpool/procpool.hpp>

#include <cstdio>
#include <vector>

long square(long x) { return x * x; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  auto squares = pool.map_async<square>(std::vector<long>{1, 2}, 0, nullptr,
                                        [](const procpool::RemoteError& e) { std::puts(e.what()); });
  return static_cast<int>(squares.get().size());
}
