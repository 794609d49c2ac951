// Must NOT compile: a raw pointer cannot travel to a worker process.
#include <procpool/procpool.hpp>

long first(const long* values) { return values[0]; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  long value = 4;
  std::vector<const long*> items{&value};
  return static_cast<int>(pool.map<first>(items).size());
}
