// Must NOT compile: a raw pointer cannot travel to a worker process.
#include <procpool/procpool.hpp>

long first(const long* values) { return values[0]; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  const long value = 4;
  return static_cast<int>(pool.apply<first>(&value));  // the message names the argument, not a tuple of it
}
