// Element conversions of the NVLink kernels' floating payloads to and from float32 (the
// accumulation type), rounding to nearest even as PyTorch's .to(dtype) does, so sums made in a
// kernel match the collective backend's bitwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ep_ops::cuda {

template <typename T>
struct Convert;
template <>
struct Convert<__nv_bfloat16> {
  static __device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Convert<__half> {
  static __device__ float to_float(__half v) { return __half2float(v); }
  static __device__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<float> {
  static __device__ float to_float(float v) { return v; }
  static __device__ float from_float(float v) { return v; }
};

}  // namespace ep_ops::cuda
