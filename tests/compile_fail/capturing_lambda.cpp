// Must NOT compile: a lambda with captures cannot travel, and procpool says so (once).
#include <procpool/procpool.hpp>
int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  int k = 3;
  auto results = pool.map([k](int x) { return x + k; }, std::vector<int>{1, 2, 3});
  return static_cast<int>(results.size());
}
