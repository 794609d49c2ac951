// procpool - cereal glue: archives over reusable byte buffers, the
// compile-time "can this type travel?" check, and exception-type names.
#pragma once

#include <cxxabi.h>

#include <cereal/archives/binary.hpp>
#include <cereal/types/array.hpp>
#include <cereal/types/bitset.hpp>
#include <cereal/types/chrono.hpp>
#include <cereal/types/complex.hpp>
#include <cereal/types/deque.hpp>
#include <cereal/types/list.hpp>
#include <cereal/types/map.hpp>
#include <cereal/types/memory.hpp>
#include <cereal/types/optional.hpp>
#include <cereal/types/set.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/tuple.hpp>
#include <cereal/types/unordered_map.hpp>
#include <cereal/types/unordered_set.hpp>
#include <cereal/types/utility.hpp>
#include <cereal/types/variant.hpp>
#include <cereal/types/vector.hpp>
#include <cstdlib>
#include <cstring>
#include <istream>
#include <memory>
#include <ostream>
#include <streambuf>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <vector>

namespace procpool::detail {

// ---- can a type travel? ----------------------------------------------------
// cereal's own traits say yes for std::vector<T> whatever T is, and the error
// then surfaces deep inside cereal. Recurse into the std types so the one
// static_assert below names the innermost offending type.

template <class T>
struct travels {
  static constexpr bool value = cereal::traits::is_output_serializable<T, cereal::BinaryOutputArchive>::value &&
                                cereal::traits::is_input_serializable<T, cereal::BinaryInputArchive>::value;
};
template <class T>
inline constexpr bool travels_v = travels<std::remove_cvref_t<T>>::value;

template <class T, class A>
struct travels<std::vector<T, A>> : travels<T> {};
template <class T, std::size_t N>
struct travels<std::array<T, N>> : travels<T> {};
template <class T, class A>
struct travels<std::deque<T, A>> : travels<T> {};
template <class T, class A>
struct travels<std::list<T, A>> : travels<T> {};
template <class T>
struct travels<std::optional<T>> : travels<T> {};
template <class T, class D>
struct travels<std::unique_ptr<T, D>> : travels<T> {};
template <class T>
struct travels<std::shared_ptr<T>> : travels<T> {};
template <class K, class C, class A>
struct travels<std::set<K, C, A>> : travels<K> {};
template <class K, class H, class E, class A>
struct travels<std::unordered_set<K, H, E, A>> : travels<K> {};
template <class K, class V, class C, class A>
struct travels<std::map<K, V, C, A>> {
  static constexpr bool value = travels<K>::value && travels<V>::value;
};
template <class K, class V, class H, class E, class A>
struct travels<std::unordered_map<K, V, H, E, A>> {
  static constexpr bool value = travels<K>::value && travels<V>::value;
};
template <class A, class B>
struct travels<std::pair<A, B>> {
  static constexpr bool value = travels<A>::value && travels<B>::value;
};
template <class... T>
struct travels<std::tuple<T...>> {
  static constexpr bool value = (travels<std::remove_cvref_t<T>>::value && ...);
};
template <class... T>
struct travels<std::variant<T...>> {
  static constexpr bool value = (travels<T>::value && ...);
};

/// Instantiated for every argument and result type. When it fails, the
/// compiler's "required from" line names the type that cannot travel.
template <class T>
struct require_serializable {
  static_assert(travels_v<T>,
                "procpool: this argument or result type cannot be sent to a worker process: "
                "cereal has no serialize()/save()/load() for it. Add a member "
                "`template <class Archive> void serialize(Archive& ar) { ar(field1, field2); }` "
                "(or a free serialize function), or pass a type that has one. The offending type is "
                "the T in 'require_serializable<T>' in this message's instantiation context.");
  static constexpr bool value = true;
};

// ---- archives over byte buffers ---------------------------------------------

/// Appends to a std::vector<char>; cereal's binary archive writes through
/// rdbuf()->sputn, so this is the only copy between a value and the frame.
class VectorSink final : public std::streambuf {
 public:
  explicit VectorSink(std::vector<char>& out) : out_(&out) {}

 protected:
  int_type overflow(int_type ch) override {
    if (!traits_type::eq_int_type(ch, traits_type::eof())) out_->push_back(static_cast<char>(ch));
    return traits_type::not_eof(ch);
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    out_->insert(out_->end(), s, s + n);
    return n;
  }

 private:
  std::vector<char>* out_;
};

/// Reads from a byte range without copying it.
class SpanSource final : public std::streambuf {
 public:
  SpanSource(const char* data, std::size_t size) {
    char* p = const_cast<char*>(data);  // get area is never written through
    setg(p, p, p + size);
  }
  std::size_t consumed() const { return static_cast<std::size_t>(gptr() - eback()); }
  std::size_t remaining() const { return static_cast<std::size_t>(egptr() - gptr()); }
};

/// Serializes values onto the end of a byte buffer.
class Encoder {
 public:
  explicit Encoder(std::vector<char>& out) : out_(out), sink_(out), stream_(&sink_), archive_(stream_) {}
  template <class... T>
  void operator()(const T&... values) {
    archive_(values...);
  }
  std::vector<char>& buffer() { return out_; }

 private:
  std::vector<char>& out_;
  VectorSink sink_;
  std::ostream stream_;
  cereal::BinaryOutputArchive archive_;
};

/// Deserializes values from a byte range; a truncated range throws cereal::Exception.
class Decoder {
 public:
  Decoder(const char* data, std::size_t size) : source_(data, size), stream_(&source_), archive_(stream_) {}
  template <class... T>
  void operator()(T&... values) {
    archive_(values...);
  }
  std::size_t remaining() const { return source_.remaining(); }

 private:
  SpanSource source_;
  std::istream stream_;
  cereal::BinaryInputArchive archive_;
};

// ---- names ------------------------------------------------------------------

inline std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> out(abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  return status == 0 && out ? std::string(out.get()) : std::string(mangled);
}

/// Demangled dynamic type of the exception being handled ("int" for `throw 1`).
inline std::string current_exception_type_name() {
  const std::type_info* type = abi::__cxa_current_exception_type();
  return type != nullptr ? demangle(type->name()) : std::string("unknown exception");
}

}  // namespace procpool::detail
