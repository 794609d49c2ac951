// Compiled by the ctest compile.clang: procpool::zip, imap and an owned input under clang++.
#include <procpool/procpool.hpp>
long add(long x, long y) { return x + y; }
int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool({.processes = 2});
  std::vector<long> xs{1, 2, 3}, ys{4, 5, 6};
  auto s = pool.map<add>(procpool::zip(xs, ys));
  for (long v : pool.imap<add>(procpool::zip(xs, std::vector<long>{7, 8}))) s.push_back(v);
  return static_cast<int>(s.size());
}
