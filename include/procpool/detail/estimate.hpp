// procpool - the one estimate of how long tasks run, smoothed over the last
// few: the dispatcher sizes its workers' queues by it, adaptive chunking its
// chunks.
#pragma once

#include <optional>

namespace procpool::detail {

class RunTimeEstimate {
 public:
  /// `weight`: of each new measurement against what came before.
  explicit RunTimeEstimate(double weight) : weight_(weight) {}
  /// Takes one more measurement (ns, per task or per item).
  void add(double ns) noexcept { value_ = value_ ? (1 - weight_) * *value_ + weight_ * ns : ns; }
  /// The estimate, once there was a measurement.
  std::optional<double> get() const noexcept { return value_; }

 private:
  double weight_;
  std::optional<double> value_;
};

}  // namespace procpool::detail
