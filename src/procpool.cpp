// procpool's engine, compiled once: the source of the CMake target
// procpool::compiled. A program built with PROCPOOL_SEPARATE_COMPILATION
// needs this translation unit exactly once (see docs/guide.md, "Compile time").
#include <procpool/src.hpp>
