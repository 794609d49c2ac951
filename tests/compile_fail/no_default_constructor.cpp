// An argument type without a default constructor: the worker could not build it.
#include <procpool/procpool.hpp>

#include <vector>

struct Reading {
  explicit Reading(int v) : value(v) {}
  int value;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(value);
  }
};

int value_of(Reading r) { return r.value; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  auto values = pool.map<value_of>(std::vector<Reading>{Reading(1)});
  return static_cast<int>(values.size());
}
