// procpool's engine, compiled once for this program (docs/guide.md, "Compile time").
#include <procpool/src.hpp>
