#include <procpool/procpool.hpp>

#include <vector>

namespace {
long transform(long x) { return x * 100; }
}  // namespace

long run_b(procpool::Pool& pool) { return pool.map<transform>(std::vector<long>{1, 2, 3}).at(0); }
