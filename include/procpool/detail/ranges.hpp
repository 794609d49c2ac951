// procpool - holding a caller's input range for a lazy call (imap, zip):
// an lvalue is referred to, a view copied, any other rvalue moved in. What
// std::views::all does, without std::ranges::ref_view and owning_view, which
// clang++ 14 cannot compile with libstdc++ 12 (nor any view built on
// std::ranges::view_interface).
#pragma once

#include <ranges>
#include <type_traits>
#include <utility>

namespace procpool::detail {

/// An rvalue range moved in, iterated in place.
template <class R>
class Owned {
 public:
  explicit Owned(R&& range) : range_(std::move(range)) {}
  Owned(Owned&&) = default;
  Owned& operator=(Owned&&) = default;
  std::ranges::iterator_t<R> begin() { return std::ranges::begin(range_); }
  std::ranges::sentinel_t<R> end() { return std::ranges::end(range_); }
  // Deduced: range_size_t<R> in the declaration would be an error for an
  // input without a size, requires-clause or not.
  auto size() requires std::ranges::sized_range<R> { return std::ranges::size(range_); }

 private:
  R range_;
};

/// An lvalue range, referred to.
template <class R>
class Ref {
 public:
  explicit Ref(R& range) : range_(&range) {}
  std::ranges::iterator_t<R> begin() const { return std::ranges::begin(*range_); }
  std::ranges::sentinel_t<R> end() const { return std::ranges::end(*range_); }
  auto size() const requires std::ranges::sized_range<R> { return std::ranges::size(*range_); }  // see Owned

 private:
  R* range_;
};

/// How a range passed as `R&&` is held.
template <class R>
using held_t = std::conditional_t<
    std::ranges::view<std::remove_cvref_t<R>>, std::remove_cvref_t<R>,
    std::conditional_t<std::is_lvalue_reference_v<R>, Ref<std::remove_reference_t<R>>, Owned<std::remove_cvref_t<R>>>>;

/// `range`, held as held_t says.
template <class R>
held_t<R> hold(R&& range) {
  if constexpr (std::ranges::view<std::remove_cvref_t<R>>) {
    return std::forward<R>(range);
  } else if constexpr (std::is_lvalue_reference_v<R>) {
    return Ref<std::remove_reference_t<R>>(range);
  } else {
    return Owned<std::remove_cvref_t<R>>(std::move(range));
  }
}

}  // namespace procpool::detail
