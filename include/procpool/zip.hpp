/// @file
/// Several inputs at once, as Python's `executor.map(fn, xs, ys)`:
/// procpool::zip.
#pragma once

#include <algorithm>
#include <cstddef>
#include <iterator>
#include <ranges>
#include <tuple>
#include <type_traits>
#include <utility>

#include "detail/ranges.hpp"

namespace procpool {

/**
 * One item of procpool::zip: an element of each input. A call of the map
 * family passes its values to the function as separate arguments.
 * Serializable when each of them is.
 */
template <class... Ts>
struct Zipped {
  /// Marks it as arguments to unpack, whatever the call.
  using procpool_unpacked = void;
  /// The elements, one of each input.
  std::tuple<Ts...> values;

  /// For cereal: the elements in order.
  template <class Archive>
  void serialize(Archive& ar) {
    std::apply([&ar](auto&... v) { ar(v...); }, values);
  }
  /// Element-wise.
  friend bool operator==(const Zipped&, const Zipped&) = default;
};

/**
 * The inputs of procpool::zip, read together: an element of each at a time,
 * as long as every one has one (the shortest wins, as in Python's `zip`).
 * Lazy: an element is read only when the item is. Sized when every input is.
 */
template <std::ranges::input_range... Rs>
class ZipView : public std::ranges::view_base {
 public:
  /// Where each input ends.
  struct sentinel {
    /// Each input's end.
    std::tuple<std::ranges::sentinel_t<Rs>...> ends;
  };

  /// Reads an element of each input.
  class iterator {
   public:
    /// One element of each input, as values.
    using value_type = Zipped<std::remove_cvref_t<std::ranges::range_value_t<Rs>>...>;
    /// Required of an iterator; never used.
    using difference_type = std::ptrdiff_t;
    /// A single-pass input iterator.
    using iterator_concept = std::input_iterator_tag;

    /// A singular iterator, only to be assigned to.
    iterator() = default;
    /// Each input at its start.
    explicit iterator(std::tuple<std::ranges::iterator_t<Rs>...> its) : its_(std::move(its)) {}
    /// The current element of each input, copied.
    value_type operator*() const {
      return std::apply([](const auto&... it) { return value_type{{*it...}}; }, its_);
    }
    /// Every input moves on by one. @return `*this`.
    iterator& operator++() {
      std::apply([](auto&... it) { (++it, ...); }, its_);
      return *this;
    }
    /// As the prefix form.
    void operator++(int) { ++*this; }
    /// Whether any input is at its end.
    friend bool operator==(const iterator& it, const sentinel& end) {
      return [&]<std::size_t... I>(std::index_sequence<I...>) {
        return ((std::get<I>(it.its_) == std::get<I>(end.ends)) || ...);
      }
      (std::index_sequence_for<Rs...>{});
    }

   private:
    std::tuple<std::ranges::iterator_t<Rs>...> its_;
  };

  ZipView() = default;
  /// The inputs (views).
  explicit ZipView(Rs... ranges) : ranges_(std::move(ranges)...) {}

  /// An iterator at the first element of each input.
  iterator begin() {
    return iterator(std::apply([](auto&... r) { return std::tuple(std::ranges::begin(r)...); }, ranges_));
  }
  /// The end: where the shortest input ends.
  sentinel end() {
    return sentinel{std::apply([](auto&... r) { return std::tuple(std::ranges::end(r)...); }, ranges_)};
  }
  /// The length of the shortest input, when each input has a size.
  auto size() requires(std::ranges::sized_range<Rs>&&...) {
    return std::apply([](auto&... r) { return std::min({static_cast<std::size_t>(std::ranges::size(r))...}); },
                      ranges_);
  }

 private:
  std::tuple<Rs...> ranges_;
};

/**
 * Several inputs read together, for a function of as many arguments:
 * `pool.map<add>(procpool::zip(xs, ys))` calls `add(xs[i], ys[i])`, as
 * Python's `executor.map(add, xs, ys)` does. The shortest input wins. Works
 * with every call of the map family; lazily with `imap`/`imap_unordered`.
 * An lvalue input is referred to, an rvalue one moved in.
 *
 * @code
 * for (long sum : pool.imap<add>(procpool::zip(std::views::iota(0L), ys))) use(sum);
 * @endcode
 *
 * @param ranges the inputs; their elements must be serializable.
 * @return a view whose items are `Zipped` elements, one of each input.
 */
template <std::ranges::viewable_range... Rs>
requires(sizeof...(Rs) >= 1 && (std::ranges::input_range<Rs> && ...)) auto zip(Rs&&... ranges) {
  return ZipView<detail::held_t<Rs>...>(detail::hold(std::forward<Rs>(ranges))...);
}

}  // namespace procpool
