// The range adaptors the tests pass to procpool: `tv::iota`, `tv::transform`
// and `tv::filter`. With g++ (and any library clang compiles) they are
// std::views. clang++ before 16 cannot compile libstdc++ 12's views at all,
// so there they are the small ranges below, which behave the same for what
// the tests do with them: lazy, read once, sized when bounded.
#pragma once

#include <cstddef>
#include <functional>
#include <iterator>
#include <ranges>
#include <type_traits>
#include <utility>

#if defined(__clang__) && __clang_major__ < 16 && defined(__GLIBCXX__)

namespace test::views {

/// first, first + 1, ... up to `last` (excluded) if bounded, else without end.
template <class T, bool Bounded>
class iota_range {
 public:
  class iterator {
   public:
    using value_type = T;
    using difference_type = std::ptrdiff_t;
    using iterator_concept = std::forward_iterator_tag;
    iterator() = default;
    explicit iterator(T value) : value_(value) {}
    T operator*() const { return value_; }
    iterator& operator++() {
      ++value_;
      return *this;
    }
    iterator operator++(int) {
      iterator old = *this;
      ++value_;
      return old;
    }
    bool operator==(const iterator&) const = default;

   private:
    T value_{};
  };

  explicit iota_range(T first, T last = T{}) : first_(first), last_(last) {}
  iterator begin() const { return iterator(first_); }
  auto end() const {
    if constexpr (Bounded) {
      return iterator(last_);
    } else {
      return std::unreachable_sentinel;
    }
  }
  std::size_t size() const requires Bounded { return static_cast<std::size_t>(last_ - first_); }

 private:
  T first_;
  T last_;
};

template <class T>
iota_range<T, false> iota(T first) {
  return iota_range<T, false>(first);
}
template <class T>
iota_range<T, true> iota(T first, T last) {
  return iota_range<T, true>(first, last);
}

/// fn(x) for each x of `base`, computed as it is read.
template <class R, class F>
class transform_range {
  using base_iterator = std::ranges::iterator_t<const R>;
  using base_sentinel = std::ranges::sentinel_t<const R>;

 public:
  struct sentinel {
    base_sentinel end;
  };
  class iterator {
   public:
    using value_type = std::remove_cvref_t<std::invoke_result_t<F&, std::iter_reference_t<base_iterator>>>;
    using difference_type = std::ptrdiff_t;
    using iterator_concept = std::input_iterator_tag;
    iterator() = default;
    iterator(const transform_range* parent, base_iterator it) : parent_(parent), it_(it) {}
    value_type operator*() const { return std::invoke(parent_->fn_, *it_); }
    iterator& operator++() {
      ++it_;
      return *this;
    }
    void operator++(int) { ++it_; }
    friend bool operator==(const iterator& it, const sentinel& end) { return it.it_ == end.end; }

   private:
    const transform_range* parent_ = nullptr;
    base_iterator it_{};
  };

  transform_range(R base, F fn) : base_(std::move(base)), fn_(std::move(fn)) {}
  iterator begin() const { return iterator(this, std::ranges::begin(base_)); }
  sentinel end() const { return {std::ranges::end(base_)}; }
  std::size_t size() const requires std::ranges::sized_range<const R> { return std::ranges::size(base_); }

 private:
  R base_;
  mutable F fn_;
};

/// The items of `base` for which pred(x) holds, found as it is read.
template <class R, class Pred>
class filter_range {
  using base_iterator = std::ranges::iterator_t<const R>;
  using base_sentinel = std::ranges::sentinel_t<const R>;

 public:
  struct sentinel {
    base_sentinel end;
  };
  class iterator {
   public:
    using value_type = std::ranges::range_value_t<const R>;
    using difference_type = std::ptrdiff_t;
    using iterator_concept = std::input_iterator_tag;
    iterator() = default;
    iterator(const filter_range* parent, base_iterator it) : parent_(parent), it_(it) { skip(); }
    value_type operator*() const { return *it_; }
    iterator& operator++() {
      ++it_;
      skip();
      return *this;
    }
    void operator++(int) { ++*this; }
    friend bool operator==(const iterator& it, const sentinel& end) { return it.it_ == end.end; }

   private:
    void skip() {
      while (!(it_ == std::ranges::end(parent_->base_)) && !std::invoke(parent_->pred_, *it_)) ++it_;
    }
    const filter_range* parent_ = nullptr;
    base_iterator it_{};
  };

  filter_range(R base, Pred pred) : base_(std::move(base)), pred_(std::move(pred)) {}
  iterator begin() const { return iterator(this, std::ranges::begin(base_)); }
  sentinel end() const { return {std::ranges::end(base_)}; }

 private:
  R base_;
  mutable Pred pred_;
};

template <class F>
struct transform_closure {
  F fn;
};
template <class Pred>
struct filter_closure {
  Pred pred;
};

template <class F>
transform_closure<F> transform(F fn) {
  return {std::move(fn)};
}
template <class Pred>
filter_closure<Pred> filter(Pred pred) {
  return {std::move(pred)};
}

template <class R, class F>
auto operator|(R&& base, transform_closure<F> closure) {
  return transform_range<std::remove_cvref_t<R>, F>(std::forward<R>(base), std::move(closure.fn));
}
template <class R, class Pred>
auto operator|(R&& base, filter_closure<Pred> closure) {
  return filter_range<std::remove_cvref_t<R>, Pred>(std::forward<R>(base), std::move(closure.pred));
}

}  // namespace test::views

namespace tv = test::views;

#else

namespace tv = std::views;

#endif
