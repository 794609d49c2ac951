// procpool - the handler registry: how a worker finds the code for a task.
//
// Code is named by compile-time identity, never by address: every handler
// type registers itself during static initialisation under a hash of its
// mangled type name. A re-executed copy of the same binary (posix_spawn,
// forkserver) runs the same static initialisers and so builds the same
// table, whatever ASLR did to the addresses.
#pragma once

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <typeinfo>
#include <unordered_map>

#include "config.hpp"
#include "serialize.hpp"

namespace procpool::detail {

/// Runs `count` items read from `in` and writes one outcome per item to `out`.
using HandlerFn = void (*)(Decoder& in, std::uint32_t count, Encoder& out);

inline std::uint64_t fnv1a(std::string_view text) {
  std::uint64_t hash = 0xcbf29ce484222325ULL;
  for (char c : text) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

class HandlerRegistry {
 public:
  struct Entry {
    std::string name;
    HandlerFn fn = nullptr;
    bool ambiguous = false;  // two different handlers share a name (internal linkage in two TUs)
  };

  static HandlerRegistry& instance() {
    static HandlerRegistry registry;
    return registry;
  }

  std::uint64_t add(const char* mangled_name, HandlerFn fn);

  /// Throws if two different handlers registered under this id: functions
  /// with internal linkage (an anonymous namespace, `static`) and the same
  /// name in two source files have the same mangled name, and a worker
  /// could not tell which to run.
  void require_unambiguous(std::uint64_t id) const;

  /// Held across fork() by the fork launcher: a worker looks its handlers up
  /// here, and a copy of this lock taken while another thread held it would
  /// stay locked in the child for ever.
  std::mutex& mutex() const { return mutex_; }

  /// nullptr if unknown.
  const Entry* find(std::uint64_t id) const {
    std::lock_guard lock(mutex_);
    auto it = entries_.find(id);
    return it == entries_.end() ? nullptr : &it->second;
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<std::uint64_t, Entry> entries_;
};

/// A handler's id, registered on first use. get() also odr-uses `id`, whose
/// initialization registers the handler in every process before main(): a
/// re-run worker knows every handler the program can send. get() is right
/// even during static initialization (a global Pool's initializer), when
/// `id` itself may not be set yet.
template <class Handler>
struct Registered {
  static std::uint64_t get() {
    (void)&id;
    static const std::uint64_t registered = HandlerRegistry::instance().add(typeid(Handler).name(), &Handler::run);
    return registered;
  }
  static inline const std::uint64_t id = get();
};

}  // namespace procpool::detail

#if PROCPOOL_DEFINE_ENGINE
namespace procpool::detail {

PROCPOOL_ENGINE_INLINE std::uint64_t HandlerRegistry::add(const char* mangled_name, HandlerFn fn) {
  std::uint64_t id = fnv1a(mangled_name);
  std::lock_guard lock(mutex_);
  auto [it, inserted] = entries_.try_emplace(id, Entry{mangled_name, fn, false});
  if (!inserted && it->second.fn != fn) it->second.ambiguous = true;
  return id;
}

PROCPOOL_ENGINE_INLINE void HandlerRegistry::require_unambiguous(std::uint64_t id) const {
  std::lock_guard lock(mutex_);
  auto it = entries_.find(id);
  if (it != entries_.end() && it->second.ambiguous) {
    throw std::logic_error("procpool: two different functions share the name " + demangle(it->second.name.c_str()) +
                           " (internal linkage in two source files, e.g. anonymous namespaces); a worker could not "
                           "tell them apart. Give one of them a distinct name or a named namespace");
  }
}

}  // namespace procpool::detail
#endif
