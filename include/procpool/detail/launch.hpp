// procpool - picks the Launcher for a start method.
#pragma once

#include <memory>

#include <fmt/format.h>

#include "../errors.hpp"
#include "../options.hpp"
#include "launch_fork.hpp"
#include "launcher.hpp"

namespace procpool::detail {

inline std::unique_ptr<Launcher> make_launcher(const Options& options) {
  switch (options.start_method) {
    case StartMethod::fork:
      return std::make_unique<ForkLauncher>();
    case StartMethod::posix_spawn:
    case StartMethod::forkserver:
      break;
  }
  throw Error(fmt::format("procpool: StartMethod::{} is not supported yet; use StartMethod::fork",
                          to_string(options.start_method)));
}

}  // namespace procpool::detail
