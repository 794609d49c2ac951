/// @file
/// The umbrella header of procpool, a process pool for C++20 (the analogue of
/// Python's multiprocessing.Pool): include this one.
#pragma once

#include "async_result.hpp"
#include "call_options.hpp"
#include "cpu_count.hpp"
#include "errors.hpp"
#include "futures.hpp"
#include "imap.hpp"
#include "init.hpp"
#include "initializer.hpp"
#include "options.hpp"
#include "pool.hpp"
#include "progress.hpp"
#include "result.hpp"
#include "shared_memory.hpp"
#include "start_method.hpp"
#include "version.hpp"
#include "worker_output.hpp"
#include "zip.hpp"

/**
 * @namespace procpool
 * procpool's public API: `Pool` and its `Options`, the per-call
 * `CallOptions`, the results `AsyncResult` and `IMap`, the exceptions
 * derived from `Error`, `init()`, `cpu_count()` and `ProgressBar`.
 * `procpool::detail` is internal and may change at any time.
 */
