// procpool - large frames and SharedMemory blocks through shared memory:
// shm_map.hpp (primitives and the design), shm_cache.hpp (buffers kept for
// reuse), task_memory.hpp (task frames), shared_state.hpp (SharedMemory).
#pragma once

#include "shared_state.hpp"
#include "shm_cache.hpp"
#include "shm_map.hpp"
#include "task_memory.hpp"
