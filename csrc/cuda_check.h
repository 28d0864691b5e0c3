// Error and argument checking for dermfast's CUDA sources.
//
// Every failure becomes a C++ exception that pybind11 translates into a Python one, so a bad call or a
// failed CUDA call surfaces in Python with file:line instead of a crash or a silent wrong result:
//
//   DF_CUDA_CHECK(expr)           expr returns cudaError_t; != cudaSuccess -> std::runtime_error  (RuntimeError)
//   DF_CUDA_CHECK_LAUNCH()        cudaGetLastError() right after a <<<...>>> launch   -> std::runtime_error
//   DF_CHECK(cond, msg)           argument validation: !cond -> std::invalid_argument          (ValueError)
//   DF_CHECK_INDEX(cond, msg)     index/ordinal validation: !cond -> std::out_of_range         (IndexError)
//
// `msg` is anything that can be streamed into a std::ostream, e.g. DF_CHECK(n >= 0, "n must be >= 0, got " << n).
//
// Host-only: include from .cu/.cpp files compiled with the CUDA toolkit headers on the include path
// (bindings.cpp deliberately does not include it, so it compiles without CUDA headers).
#pragma once

#include <cuda_runtime_api.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace dermfast {
namespace detail {

// Keep only the file name: full build paths are long and differ between isolated build environments.
inline const char* df_basename(const char* path) {
    const char* base = path;
    for (const char* p = path; *p != '\0'; ++p) {
        if (*p == '/' || *p == '\\') base = p + 1;
    }
    return base;
}

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
    std::ostringstream os;
    os << "CUDA error at " << df_basename(file) << ":" << line << ": " << expr << " failed with "
       << cudaGetErrorName(err) << " (" << static_cast<int>(err) << "): " << cudaGetErrorString(err);
    throw std::runtime_error(os.str());
}

}  // namespace detail
}  // namespace dermfast

#define DF_CUDA_CHECK(expr)                                                               \
    do {                                                                                  \
        const cudaError_t df_err_ = (expr);                                               \
        if (df_err_ != cudaSuccess) {                                                     \
            ::dermfast::detail::throw_cuda_error(df_err_, #expr, __FILE__, __LINE__);     \
        }                                                                                 \
    } while (0)

// After a kernel launch: catches bad launch configurations and sticky errors from earlier async work.
// cudaGetLastError() also resets the (non-sticky) error state, so a caught error does not leak into
// the next, unrelated call.
#define DF_CUDA_CHECK_LAUNCH() DF_CUDA_CHECK(cudaGetLastError())

#define DF_CHECK_IMPL_(cond, msg, exc_type)                                               \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            std::ostringstream df_os_;                                                    \
            df_os_ << msg << " [check `" #cond "` failed at "                              \
                   << ::dermfast::detail::df_basename(__FILE__) << ":" << __LINE__ << "]"; \
            throw exc_type(df_os_.str());                                                 \
        }                                                                                 \
    } while (0)

#define DF_CHECK(cond, msg) DF_CHECK_IMPL_(cond, msg, std::invalid_argument)
#define DF_CHECK_INDEX(cond, msg) DF_CHECK_IMPL_(cond, msg, std::out_of_range)

namespace dermfast {

// Makes `device` current for the guard's lifetime and restores the previous device after (launches go to the
// pointer's own GPU, whatever the caller's current device is). Shared by every op's launcher.
class DeviceGuard {
  public:
    explicit DeviceGuard(int device) {
        DF_CUDA_CHECK(cudaGetDevice(&prev_));
        if (prev_ != device) {
            DF_CUDA_CHECK(cudaSetDevice(device));
            switched_ = true;
        }
    }
    ~DeviceGuard() {
        if (switched_) (void)cudaSetDevice(prev_);  // never throw from a destructor
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

  private:
    int prev_ = 0;
    bool switched_ = false;
};

}  // namespace dermfast
