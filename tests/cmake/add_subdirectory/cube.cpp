// The consumer's second source file: a call into the same pool from another
// translation unit, with a function of its own.
#include "cube.hpp"

namespace {
int cube(int x) { return x * x * x; }
}  // namespace

std::vector<int> cubes(procpool::Pool& pool, const std::vector<int>& xs) { return pool.map<cube>(xs); }
