// procpool - the exception types procpool can raise again in the caller as
// themselves (RemoteError::rethrow, Options::raise_original_exceptions): a
// worker reports an exception by its demangled type name and message, and
// here a name finds a function that throws that type.
#pragma once

#include <cxxabi.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <typeindex>
#include <typeinfo>
#include <unordered_map>

#include "config.hpp"

namespace procpool::detail {

PROCPOOL_ENGINE_INLINE std::string demangle(const char* mangled);

/// Throws an exception of one type made from a message, with the exception
/// being handled nested in it (std::throw_with_nested).
using ExceptionMaker = void (*)(const std::string& message);

template <class E>
[[noreturn]] void throw_nested_as(const std::string& message) {
  if constexpr (std::is_constructible_v<E, const std::string&>) {
    std::throw_with_nested(E(message));
  } else {
    std::throw_with_nested(E());
  }
}

class ExceptionTypes {
 public:
  static ExceptionTypes& instance();
  /// Registers `type` under `name`. Another type of the same name makes the
  /// name ambiguous: find() then knows it no more.
  void add(const std::string& name, std::type_index type, ExceptionMaker maker) {
    std::lock_guard lock(mutex_);
    auto [it, added] = makers_.try_emplace(name, Known{type, maker});
    if (!added && it->second.type != type) it->second.maker = nullptr;
  }
  /// nullptr if the type is not known (or its name is ambiguous).
  ExceptionMaker find(const std::string& name) const;

 private:
  ExceptionTypes();
  template <class E>
  void add_type() {
    makers_.try_emplace(demangle(typeid(E).name()), Known{typeid(E), &throw_nested_as<E>});
  }

  struct Known {
    std::type_index type;
    ExceptionMaker maker;
  };
  mutable std::mutex mutex_;
  std::unordered_map<std::string, Known> makers_;
};

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> out(abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  return status == 0 && out ? std::string(out.get()) : std::string(mangled);
}

PROCPOOL_ENGINE_INLINE ExceptionTypes& ExceptionTypes::instance() {
  static ExceptionTypes types;
  return types;
}

PROCPOOL_ENGINE_INLINE ExceptionMaker ExceptionTypes::find(const std::string& name) const {
  std::lock_guard lock(mutex_);
  auto it = makers_.find(name);
  return it == makers_.end() ? nullptr : it->second.maker;
}

PROCPOOL_ENGINE_INLINE ExceptionTypes::ExceptionTypes() {
  // <stdexcept>, and std::bad_alloc (whose message is its own).
  add_type<std::logic_error>();
  add_type<std::domain_error>();
  add_type<std::invalid_argument>();
  add_type<std::length_error>();
  add_type<std::out_of_range>();
  add_type<std::runtime_error>();
  add_type<std::range_error>();
  add_type<std::overflow_error>();
  add_type<std::underflow_error>();
  add_type<std::bad_alloc>();
}

}  // namespace procpool::detail
#endif
