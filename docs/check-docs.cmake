# Builds the procpool_docs target and fails if doxygen warned about anything
# (an undocumented public name, a broken @param, ...), printing the warnings.
# Run by the ctest docs.build:
#   cmake -DBUILD_DIR=<build tree> -DWARN_LOG=<doxygen's WARN_LOGFILE> -P check-docs.cmake
foreach(var BUILD_DIR WARN_LOG)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "check-docs.cmake: -D${var}=... is required")
  endif()
endforeach()

# A log left by an earlier run must not pass for this one's.
file(REMOVE "${WARN_LOG}")
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target procpool_docs RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "check-docs.cmake: building procpool_docs failed (${result})")
endif()
if(NOT EXISTS "${WARN_LOG}")
  message(FATAL_ERROR "check-docs.cmake: doxygen wrote no warning log at ${WARN_LOG}")
endif()
file(READ "${WARN_LOG}" warnings)
if(NOT warnings STREQUAL "")
  # The build printed the warnings above; this names where they are kept.
  message(FATAL_ERROR "check-docs.cmake: doxygen warned (listed above, kept in ${WARN_LOG}); fix the doc comments")
endif()
message(STATUS "check-docs.cmake: API docs built without warnings")
