// Must NOT compile: an apply argument whose save/load are written for
// cereal's own archive, not as templates on the archive.
#include <cereal/archives/binary.hpp>
#include <procpool/procpool.hpp>

struct BinaryOnly {
  int value = 0;
  void save(cereal::BinaryOutputArchive& ar) const { ar(value); }
  void load(cereal::BinaryInputArchive& ar) { ar(value); }
};

long use(BinaryOnly b, int k) { return b.value + k; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  return static_cast<int>(pool.apply<use>(BinaryOnly{}, 3));  // the message names BinaryOnly, not a tuple of it
}
