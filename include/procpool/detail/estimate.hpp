// procpool - the one estimate of how long tasks run, smoothed over the last
// few: the dispatcher sizes its workers' queues by it, adaptive chunking its
// chunks.
#pragma once

#include <optional>

namespace procpool::detail {

class RunTimeEstimate {
 public:
  /// Takes one more measurement (ns, per task or per item).
  void add(double ns) noexcept { value_ = value_ ? (1 - weight) * *value_ + weight * ns : ns; }
  /// The estimate, once there was a measurement.
  std::optional<double> get() const noexcept { return value_; }

 private:
  static constexpr double weight = 0.25;  // of the newest measurement
  std::optional<double> value_;
};

}  // namespace procpool::detail
