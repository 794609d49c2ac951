/// @file
/// Where a pool's workers run: procpool::Backend.
#pragma once

#include <memory>
#include <utility>

namespace procpool {

struct Options;

namespace detail {
class Transport;

/// What a Backend other than the local one does: make the transport a new
/// pool reaches its workers through (link.hpp). procpool/mpi.hpp has one.
class BackendImpl {
 public:
  virtual ~BackendImpl() = default;
  /// Called once by each new Pool, on the thread constructing it.
  virtual std::unique_ptr<Transport> make_transport(const Options& options) const = 0;
};
}  // namespace detail

/**
 * Where a pool's workers run: `Options::backend`. The default is worker
 * processes on this machine. `procpool::mpi::world()` and
 * `procpool::mpi::spawn(n)` (`<procpool/mpi.hpp>`) run them on MPI ranks.
 *
 * A small value: copies share what they describe.
 */
class Backend {
 public:
  /// Worker processes on this machine.
  Backend() = default;
  /// A backend that makes its pools' transports with `impl`; made by
  /// `procpool::mpi::world()` and `procpool::mpi::spawn(n)`.
  explicit Backend(std::shared_ptr<const detail::BackendImpl> impl) noexcept : impl_(std::move(impl)) {}

  /// Whether this is the default: processes on this machine.
  bool local() const noexcept { return impl_ == nullptr; }
  /// What makes the transport; null for the local backend.
  const detail::BackendImpl* impl() const noexcept { return impl_.get(); }

 private:
  std::shared_ptr<const detail::BackendImpl> impl_;
};

}  // namespace procpool
