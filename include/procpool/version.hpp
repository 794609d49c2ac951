/// @file
/// procpool's version macros.
#pragma once

/// The major part of procpool's version (0 in 0.1.0); matches the CMake project version.
#define PROCPOOL_VERSION_MAJOR 0
/// The minor part of procpool's version (1 in 0.1.0).
#define PROCPOOL_VERSION_MINOR 1
/// The patch part of procpool's version (0 in 0.1.0).
#define PROCPOOL_VERSION_PATCH 0
/// procpool's version as one number: major * 10000 + minor * 100 + patch,
/// e.g. `#if PROCPOOL_VERSION >= 100` for 0.1.0 or later.
#define PROCPOOL_VERSION (PROCPOOL_VERSION_MAJOR * 10000 + PROCPOOL_VERSION_MINOR * 100 + PROCPOOL_VERSION_PATCH)
