// Must NOT compile: a result type with no serialize() cannot travel.
#include <procpool/procpool.hpp>

struct NotSerializable {
  int value = 0;
};

NotSerializable make(int x) { return {x}; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  auto results = pool.map<make>(std::vector<int>{1, 2, 3});
  return static_cast<int>(results.size());
}
