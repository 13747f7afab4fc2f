// Host helpers shared by the CUDA kernel files: error checks, pointer checks, device guard.
#pragma once

#include <cuda_runtime.h>

#include "../common/check.h"

namespace lowbit {
namespace cuda {

// Throws RuntimeError naming `fn` and `what` if `e` is an error (and clears a non-sticky one).
inline void check_cuda(cudaError_t e, const char* fn, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    LOWBIT_FAIL_RUNTIME(fn, ": ", what, " failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  }
}

// Device of a pointer that must be device or managed memory (ValueError otherwise).
inline int pointer_device(const void* p, const char* fn, const char* name) {
  cudaPointerAttributes attr{};
  check_cuda(cudaPointerGetAttributes(&attr, p), fn, "cudaPointerGetAttributes");
  LOWBIT_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged, fn, ": ", name,
               " is not CUDA device memory (is the tensor on the CPU?)");
  return attr.device;
}

// Makes `device` current for the launch and restores the previous device afterwards.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* fn) {
    check_cuda(cudaGetDevice(&previous_), fn, "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), fn, "cudaSetDevice");
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace cuda
}  // namespace lowbit
