// A program that initializes MPI before procpool: procpool::mpi::init must
// refuse with an Error naming the fix, on every rank, and not start
// workers that would re-run main() into MPI_Init.
#include <procpool/mpi.hpp>

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int status = 1;
  try {
    procpool::mpi::init(argc, argv);
    std::fprintf(stderr, "init_order: procpool::mpi::init accepted MPI initialized before it\n");
  } catch (const procpool::Error& e) {
    const std::string what = e.what();
    std::printf("init_order: %s\n", what.c_str());
    if (what.find("call procpool::init(argc, argv) before MPI_Init") != std::string::npos) status = 0;
  }
  MPI_Finalize();
  return status;
}
