# Checks that clang++ compiles, header-only, the README's first example, the
# primes example and tests/clang/*.cpp. The examples and the suite are built
# with clang++ in scripts/test.sh's asan stage.
#   cmake -DCLANGXX=<clang++> -DSOURCE_DIR=<procpool checkout> -DWORK_DIR=<dir> -P clang-syntax.cmake
foreach(var CLANGXX SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "clang-syntax.cmake: -D${var}=... is required")
  endif()
endforeach()

file(READ "${SOURCE_DIR}/README.md" readme)
string(FIND "${readme}" "```cpp\n" start)
if(start EQUAL -1)
  message(FATAL_ERROR "clang-syntax.cmake: README.md has no ```cpp block")
endif()
math(EXPR start "${start} + 7")
string(SUBSTRING "${readme}" ${start} -1 rest)
string(FIND "${rest}" "```" end)
string(SUBSTRING "${rest}" 0 ${end} example)
file(MAKE_DIRECTORY "${WORK_DIR}")
file(WRITE "${WORK_DIR}/readme_example.cpp" "${example}")

set(sources "${WORK_DIR}/readme_example.cpp" "${SOURCE_DIR}/examples/primes.cpp")
file(GLOB extra "${SOURCE_DIR}/tests/clang/*.cpp")
list(APPEND sources ${extra})
set(failed "")
foreach(source IN LISTS sources)
  execute_process(COMMAND "${CLANGXX}" -std=c++20 -fsyntax-only -Wall -Wextra "-I${SOURCE_DIR}/include" "${source}"
                  RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT result EQUAL 0)
    message("${out}")
    list(APPEND failed "${source}")
  else()
    message(STATUS "clang-syntax.cmake: ${source}: ok")
  endif()
endforeach()
if(failed)
  message(FATAL_ERROR "clang-syntax.cmake: ${CLANGXX} could not compile: ${failed}")
endif()
