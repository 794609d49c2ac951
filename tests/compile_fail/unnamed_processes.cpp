// Python's Pool(4): the number of processes is a named setting here.
#include <procpool/procpool.hpp>

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool(4);
  return static_cast<int>(pool.processes());
}
