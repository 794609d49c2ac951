// A program that serves MPI pools but is not the program of rank 0: the
// handshake must refuse it (test_mpi.cpp, "[.mismatch]").
#include <procpool/mpi.hpp>

int main(int argc, char** argv) { procpool::mpi::init(argc, argv); }
