// Argument checks for host code: LOWBIT_CHECK(cond, "name=", v, " must be ...") throws
// std::invalid_argument (pybind11 turns it into ValueError) with the pieces streamed
// together. LOWBIT_FAIL_RUNTIME throws std::runtime_error (RuntimeError) for failures
// that are not the caller's fault (a CUDA error, a missing driver).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace lowbit {
namespace detail {

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace detail
}  // namespace lowbit

#define LOWBIT_CHECK(cond, ...)                                            \
  do {                                                                     \
    if (!(cond)) {                                                         \
      throw std::invalid_argument(::lowbit::detail::concat(__VA_ARGS__));  \
    }                                                                      \
  } while (0)

#define LOWBIT_FAIL_RUNTIME(...) \
  throw std::runtime_error(::lowbit::detail::concat(__VA_ARGS__))
