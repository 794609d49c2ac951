// Built only when the installed procpool has procpool::mpi: the MPI
// variant of main.cpp, run under mpirun as `mpirun -np 3 consumer_mpi`.
#include <procpool/mpi.hpp>

#include <cstdio>
#include <vector>

namespace {
int square(int x) { return x * x; }
}  // namespace

int main(int argc, char** argv) {
  procpool::mpi::init(argc, argv);
  procpool::Pool pool({.processes = 0, .backend = procpool::mpi::world()});
  const std::vector<int> squares = pool.map<square>(std::vector<int>{1, 2, 3, 4});
  if (squares != std::vector<int>{1, 4, 9, 16}) {
    std::fprintf(stderr, "consumer_mpi: pool.map<square> returned the wrong results\n");
    return 1;
  }
  return 0;
}
