/// @file
/// The engine's definitions, for a program built with
/// `PROCPOOL_SEPARATE_COMPILATION`: include this in exactly one .cpp file,
/// before any other procpool header. The CMake target `procpool::compiled`
/// does this for you.
#pragma once

#ifndef PROCPOOL_SEPARATE_COMPILATION
#error "procpool/src.hpp is only for programs built with PROCPOOL_SEPARATE_COMPILATION defined everywhere"
#endif
#ifdef PROCPOOL_CONFIG_INCLUDED
#error "include procpool/src.hpp before any other procpool header"
#endif

#define PROCPOOL_COMPILING_ENGINE
#include "procpool.hpp"
