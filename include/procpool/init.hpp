// procpool - the one line a program's main() needs.
#pragma once

namespace procpool {

/**
 * Call first thing in `main`: `procpool::init(argc, argv);`. In a program
 * started normally it does nothing. The exec-based start methods run the
 * program's own binary as a worker; there `init` runs the worker and never
 * returns, so the rest of `main` never runs in a worker (the analogue of
 * Python's `if __name__ == "__main__":` guard and `freeze_support()`).
 * This function is thread-safe.
 */
inline void init(int argc, char** argv) {
  (void)argc;
  (void)argv;
}

}  // namespace procpool
