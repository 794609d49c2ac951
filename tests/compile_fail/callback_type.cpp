// A callback that cannot take the call's result (apply_async's is a
// `const long&`): it must fail with procpool's message, not pages of
// std::function errors.
#include <procpool/procpool.hpp>

#include <string>

long square(long x) { return x * x; }

int main(int argc, char** argv) {
  procpool::init(argc, argv);
  procpool::Pool pool;
  auto result = pool.apply_async<square>(3, procpool::callbacks([](const std::string& text) { (void)text; }));
  return static_cast<int>(result.get());
}
