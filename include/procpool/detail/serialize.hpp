// procpool - cereal glue: archives over reusable byte buffers, the
// compile-time "can this type travel?" check, and exception-type names.
#pragma once

#include <cxxabi.h>

#include <algorithm>
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
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "exception_types.hpp"
#include "shm.hpp"

namespace procpool::detail {

// ---- can a type travel? ----------------------------------------------------
// cereal's own traits say yes for std::vector<T> whatever T is, and the error
// then surfaces deep inside cereal. Recurse into the std types so the one
// static_assert below names the innermost offending type.

class OutputArchive;
class InputArchive;

template <class T>
struct travels {
  static constexpr bool value = cereal::traits::is_output_serializable<T, OutputArchive>::value &&
                                cereal::traits::is_input_serializable<T, InputArchive>::value;
};
template <class T>
inline constexpr bool travels_v = travels<std::remove_cvref_t<T>>::value;
template <class T>
struct travels<T*> : std::false_type {};

/// Whether T is a raw pointer, or holds one as a tuple, pair, array, vector
/// or optional does: the message for it says so.
template <class T>
struct holds_raw_pointer : std::is_pointer<T> {};
template <class... T>
struct holds_raw_pointer<std::tuple<T...>> : std::disjunction<holds_raw_pointer<std::remove_cvref_t<T>>...> {};
template <class A, class B>
struct holds_raw_pointer<std::pair<A, B>>
    : std::disjunction<holds_raw_pointer<std::remove_cvref_t<A>>, holds_raw_pointer<std::remove_cvref_t<B>>> {};
template <class T, std::size_t N>
struct holds_raw_pointer<std::array<T, N>> : holds_raw_pointer<T> {};
template <class T, class A>
struct holds_raw_pointer<std::vector<T, A>> : holds_raw_pointer<T> {};
template <class T>
struct holds_raw_pointer<std::optional<T>> : holds_raw_pointer<T> {};

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

/// A worker decodes each argument, and the parent each result, into a
/// default-constructed value.
template <class T>
concept value_initializable = requires {
  T{};
};

template <class T>
struct require_default_constructible {
  static_assert(
      value_initializable<T>,
      "procpool: this argument or result type has no default constructor. procpool "
      "builds the value, then loads it from the message: add a public constructor taking "
      "no arguments. The offending type is the T in 'require_default_constructible<T>' in this message's instantiation "
      "context.");
  static constexpr bool value = true;
};

/// Instantiated for every argument and result type. When it fails, the
/// compiler's "required from" line names the type that cannot travel.
template <class T>
struct require_serializable {
  static constexpr bool pointer = holds_raw_pointer<std::remove_cvref_t<T>>::value;
  static_assert(!pointer,
                "procpool: a raw pointer cannot be sent to a worker process: its address means nothing "
                "there. Pass the value itself, a std::vector, or a std::unique_ptr. The offending type is "
                "the T in 'require_serializable<T>' in this message's instantiation context.");
  static_assert(pointer || travels_v<T>,
                "procpool: this argument or result type cannot be sent to a worker process: "
                "cereal has no serialize()/save()/load() for it that procpool's archives can call. Add a member "
                "`template <class Archive> void serialize(Archive& ar) { ar(field1, field2); }` "
                "(or a free serialize function), or pass a type that has one. Write them as templates on the "
                "archive: procpool uses archives of its own, not cereal::BinaryOutputArchive. The offending type is "
                "the T in 'require_serializable<T>' in this message's instantiation context.");
  static constexpr bool value = true;
};

/// require_serializable, for the elements of a tuple or pair each on its own
/// (apply's and starmap's arguments travel as one): the compiler's message
/// then names the type that cannot travel, not the tuple holding it.
template <class T>
struct require_each_serializable : require_serializable<T> {};
template <class... T>
struct require_each_serializable<std::tuple<T...>> {
  static constexpr bool value = (require_each_serializable<std::remove_cvref_t<T>>::value && ...);
};
template <class A, class B>
struct require_each_serializable<std::pair<A, B>> {
  static constexpr bool value = require_each_serializable<std::remove_cvref_t<A>>::value &&
                                require_each_serializable<std::remove_cvref_t<B>>::value;
};

// ---- archives over byte buffers ---------------------------------------------
// cereal's BinaryOutputArchive/BinaryInputArchive work through std::ostream
// and std::istream, and building one of those (locale and all) cost about a
// quarter of a microsecond, four times per task. These archives write the
// same bytes straight into a std::vector<char> and read them straight from a
// byte range. Reading is bounded: a length prefix that claims more elements
// than there are bytes left is refused before anything is allocated, so a
// corrupt or hostile message cannot make the parent allocate what it claims.

/// Serializes onto the end of a byte buffer (a std::vector<char>, or a task
/// frame, whose storage may be the pool's shared memory); the only copy
/// between a value and its frame.
class OutputArchive : public cereal::OutputArchive<OutputArchive, cereal::AllowEmptyClassElision> {
 public:
  /// `shares`: where the procpool::SharedMemory blocks written are listed,
  /// to be kept alive with the message; none may be written without it.
  explicit OutputArchive(std::vector<char>& out, SharedStates* shares = nullptr)
      : cereal::OutputArchive<OutputArchive, cereal::AllowEmptyClassElision>(this), out_(&out), shares_(shares) {}
  explicit OutputArchive(TaskBytes& out, SharedStates* shares = nullptr)
      : cereal::OutputArchive<OutputArchive, cereal::AllowEmptyClassElision>(this), task_(&out), shares_(shares) {}
  /// Lists a SharedMemory block the message refers to; throws
  /// std::logic_error where this message cannot keep one alive.
  void share(const std::shared_ptr<SharedState>& state) {
    if (shares_ == nullptr) {
      throw std::logic_error(
          "procpool::SharedMemory can travel only as an argument or result of a pool's task or an initializer");
    }
    shares_->push_back(state);
  }
  void save_binary(const void* data, std::size_t size) {
    const char* bytes = static_cast<const char*>(data);
    if (out_ != nullptr) {
      out_->insert(out_->end(), bytes, bytes + size);
    } else {
      // insert() would copy byte by byte through the allocator: grow (as
      // insert would) without touching the new bytes, then copy them at once.
      const std::size_t old = task_->size();
      if (old + size > task_->capacity()) task_->reserve(std::max(old + size, 2 * task_->capacity()));
      task_->resize(old + size);
      if (size != 0) std::memcpy(task_->data() + old, bytes, size);
    }
  }
  /// Bytes in the buffer.
  std::size_t size() const { return out_ != nullptr ? out_->size() : task_->size(); }
  /// Drops what was written after the buffer held `size` bytes.
  void truncate(std::size_t size) {
    if (out_ != nullptr) {
      out_->resize(size);
    } else {
      task_->resize(size);
    }
  }

 private:
  std::vector<char>* out_ = nullptr;
  TaskBytes* task_ = nullptr;
  SharedStates* shares_ = nullptr;
};

/// Deserializes from a byte range without copying it first.
class InputArchive : public cereal::InputArchive<InputArchive, cereal::AllowEmptyClassElision> {
 public:
  /// A length prefix may claim at most this many elements more than there are
  /// bytes left: elements of an empty type take no bytes at all.
  static constexpr std::uint64_t empty_element_allowance = std::uint64_t{1} << 16;

  InputArchive(const char* data, std::size_t size)
      : cereal::InputArchive<InputArchive, cereal::AllowEmptyClassElision>(this), next_(data), end_(data + size) {}
  void load_binary(void* data, std::size_t size) {
    const char* bytes = take(size);
    if (size != 0) std::memcpy(data, bytes, size);
  }
  /// The next `size` bytes, in place; they are consumed.
  const char* take(std::size_t size) {
    if (size > remaining()) {
      throw cereal::Exception("message truncated: " + std::to_string(size) + " bytes expected, " +
                              std::to_string(remaining()) + " left");
    }
    const char* bytes = next_;
    next_ += size;
    return bytes;
  }
  /// Refuses a length prefix that cannot be true, before the container is sized.
  void check_length(std::uint64_t elements) const {
    if (elements > remaining() + empty_element_allowance) {
      throw cereal::Exception("corrupt message: a length of " + std::to_string(elements) + " elements with only " +
                              std::to_string(remaining()) + " bytes left");
    }
  }
  std::size_t remaining() const { return static_cast<std::size_t>(end_ - next_); }

 private:
  const char* next_;
  const char* end_;
};

/// Serializes values onto the end of a byte buffer.
class Encoder {
 public:
  /// `shares`: see OutputArchive.
  explicit Encoder(std::vector<char>& out, SharedStates* shares = nullptr) : archive_(out, shares) {}
  explicit Encoder(TaskBytes& out, SharedStates* shares = nullptr) : archive_(out, shares) {}
  /// Writes the values. A type that cannot travel fails the build here, with
  /// procpool's message (require_serializable; once per type, however many
  /// places check it), and is not handed to cereal, whose own error would
  /// only repeat it.
  template <class... T>
  void operator()(const T&... values) {
    static_assert((require_each_serializable<std::remove_cvref_t<T>>::value && ...));
    if constexpr ((travels_v<T> && ...)) archive_(values...);
  }
  /// Bytes in the buffer (a mark for truncate()).
  std::size_t size() const { return archive_.size(); }
  /// Drops what was written after size() was `mark`.
  void truncate(std::size_t mark) { archive_.truncate(mark); }

 private:
  OutputArchive archive_;
};

/// Deserializes values from a byte range; a truncated or corrupt range throws cereal::Exception.
class Decoder {
 public:
  Decoder(const char* data, std::size_t size) : archive_(data, size) {}
  /// Reads the values (a type that cannot travel: as Encoder).
  template <class... T>
  void operator()(T&... values) {
    static_assert((require_each_serializable<std::remove_cvref_t<T>>::value && ...));
    if constexpr ((travels_v<T> && ...)) archive_(values...);
  }
  std::size_t remaining() const { return archive_.remaining(); }

 private:
  InputArchive archive_;
};

// ---- names ------------------------------------------------------------------

/// Demangled dynamic type of the exception being handled ("int" for `throw 1`).
inline std::string current_exception_type_name() {
  const std::type_info* type = abi::__cxa_current_exception_type();
  if (type == nullptr) return "unknown exception";
  std::string name = demangle(type->name());
  // std::throw_with_nested(E{...}) throws libstdc++'s class deriving from E
  // and std::nested_exception: E is the type the task threw.
  constexpr std::string_view nested = "std::_Nested_exception<";
  if (name.starts_with(nested) && name.ends_with('>')) {
    name = name.substr(nested.size(), name.size() - nested.size() - 1);
    if (name.ends_with(' ')) name.pop_back();  // "Foo<Foo<int> > >"
  }
  return name;
}

}  // namespace procpool::detail

// How cereal's generic code meets the two archives: the same overloads
// cereal/archives/binary.hpp gives its binary archives.
namespace cereal {

template <class T>
inline std::enable_if_t<std::is_arithmetic_v<T>> CEREAL_SAVE_FUNCTION_NAME(procpool::detail::OutputArchive& ar,
                                                                           const T& value) {
  ar.save_binary(std::addressof(value), sizeof(value));
}
template <class T>
inline std::enable_if_t<std::is_arithmetic_v<T>> CEREAL_LOAD_FUNCTION_NAME(procpool::detail::InputArchive& ar,
                                                                           T& value) {
  ar.load_binary(std::addressof(value), sizeof(value));
}

template <class Archive, class T>
inline CEREAL_ARCHIVE_RESTRICT(procpool::detail::InputArchive, procpool::detail::OutputArchive)
    CEREAL_SERIALIZE_FUNCTION_NAME(Archive& ar, NameValuePair<T>& pair) {
  ar(pair.value);
}

template <class T>
inline void CEREAL_SAVE_FUNCTION_NAME(procpool::detail::OutputArchive& ar, const SizeTag<T>& tag) {
  ar(tag.size);
}
template <class T>
inline void CEREAL_LOAD_FUNCTION_NAME(procpool::detail::InputArchive& ar, SizeTag<T>& tag) {
  ar(tag.size);
  ar.check_length(static_cast<std::uint64_t>(tag.size));
}

// Vectors and strings of single-byte values are built straight from the
// message's bytes: cereal's own loads size them first (zero-filling every
// byte, a whole extra pass over a large payload) and then copy over it.
template <class T>
inline constexpr bool procpool_byte_sized = std::is_arithmetic_v<T> && sizeof(T) == 1 && !std::is_same_v<T, bool>;

template <class T, class A>
inline std::enable_if_t<procpool_byte_sized<T>> CEREAL_LOAD_FUNCTION_NAME(procpool::detail::InputArchive& ar,
                                                                          std::vector<T, A>& vector) {
  size_type size;
  ar(make_size_tag(size));
  const auto* bytes = reinterpret_cast<const T*>(ar.take(static_cast<std::size_t>(size)));
  vector.assign(bytes, bytes + size);
}
template <class CharT, class Traits, class Alloc>
inline std::enable_if_t<procpool_byte_sized<CharT>> CEREAL_LOAD_FUNCTION_NAME(
    procpool::detail::InputArchive& ar, std::basic_string<CharT, Traits, Alloc>& str) {
  size_type size;
  ar(make_size_tag(size));
  str.assign(reinterpret_cast<const CharT*>(ar.take(static_cast<std::size_t>(size))), static_cast<std::size_t>(size));
}

template <class T>
inline void CEREAL_SAVE_FUNCTION_NAME(procpool::detail::OutputArchive& ar, const BinaryData<T>& data) {
  ar.save_binary(data.data, static_cast<std::size_t>(data.size));
}
template <class T>
inline void CEREAL_LOAD_FUNCTION_NAME(procpool::detail::InputArchive& ar, BinaryData<T>& data) {
  ar.load_binary(data.data, static_cast<std::size_t>(data.size));
}

}  // namespace cereal

CEREAL_REGISTER_ARCHIVE(procpool::detail::OutputArchive)
CEREAL_REGISTER_ARCHIVE(procpool::detail::InputArchive)
CEREAL_SETUP_ARCHIVE_TRAITS(procpool::detail::InputArchive, procpool::detail::OutputArchive)
