// procpool - version macros.
#pragma once

#define PROCPOOL_VERSION_MAJOR 0
#define PROCPOOL_VERSION_MINOR 1
#define PROCPOOL_VERSION_PATCH 0
/// procpool's version as one number: major * 10000 + minor * 100 + patch.
#define PROCPOOL_VERSION (PROCPOOL_VERSION_MAJOR * 10000 + PROCPOOL_VERSION_MINOR * 100 + PROCPOOL_VERSION_PATCH)
