// The second source file's part of the consumer (cube.cpp).
#pragma once

#include <procpool/procpool.hpp>

#include <vector>

/// Each of `xs` cubed, by `pool`'s workers.
std::vector<int> cubes(procpool::Pool& pool, const std::vector<int>& xs);
