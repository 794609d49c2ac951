// procpool - how the engine is compiled: in every translation unit that uses
// it (the default, header-only), or once (PROCPOOL_SEPARATE_COMPILATION).
//
// Header-only, every definition is inline. With PROCPOOL_SEPARATE_COMPILATION
// defined in every translation unit, the engine's entry points are only
// declared, and the one translation unit that includes <procpool/src.hpp>
// defines them: the rest of the program compiles without the engine's code.
// An entry point is declared in its class and defined out of line, inside
// `#if PROCPOOL_DEFINE_ENGINE`, as `PROCPOOL_ENGINE_INLINE`. Code only entry
// points call can stay in its class: no other translation unit uses it.
#pragma once

#define PROCPOOL_CONFIG_INCLUDED

#if defined(PROCPOOL_SEPARATE_COMPILATION) && !defined(PROCPOOL_COMPILING_ENGINE)
#define PROCPOOL_DEFINE_ENGINE 0
#else
#define PROCPOOL_DEFINE_ENGINE 1
#endif

#if defined(PROCPOOL_SEPARATE_COMPILATION)
#define PROCPOOL_ENGINE_INLINE
#else
#define PROCPOOL_ENGINE_INLINE inline
#endif
