// Warp-wide pieces of combine_permuted's send: a received row's value is the sum of its pairs'
// rows of the expert output h in the permuted layout (ep_ops.permute.unpermute, bitwise).
#pragma once

#include <cstdint>

#include "nvl_convert.cuh"

namespace ep_ops::cuda {

// dst (payload bytes, a multiple of 16) = sum over k < num_pairs of h's row slots[k] (a zero row
// where slots[k] < 0), in float32 in k order starting from slot 0's value (unpermute's order:
// out = row_0; out = out + row_k), rounded once to T. Lanes stride over 16-byte chunks.
template <typename T>
__device__ __forceinline__ void warp_sum_pairs(uint8_t* dst, const uint8_t* h, const int64_t* slots,
                                               int num_pairs, int64_t payload, int lane) {
  constexpr int kElems = 16 / sizeof(T);
  for (int64_t chunk = lane; chunk < payload / 16; chunk += 32) {
    float acc[kElems];
    for (int k = 0; k < num_pairs; ++k) {
      const int64_t slot = slots[k];
      float vals[kElems];
      if (slot >= 0) {
        const int4 raw = __ldg(reinterpret_cast<const int4*>(h + slot * payload) + chunk);
        const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < kElems; ++e) vals[e] = Convert<T>::to_float(elems[e]);
      } else {
#pragma unroll
        for (int e = 0; e < kElems; ++e) vals[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[e] = k == 0 ? vals[e] : acc[e] + vals[e];
    }
    int4 packed;
    T* outs = reinterpret_cast<T*>(&packed);
#pragma unroll
    for (int e = 0; e < kElems; ++e) outs[e] = Convert<T>::from_float(acc[e]);
    reinterpret_cast<int4*>(dst)[chunk] = packed;
  }
}

// dst[k] = probs[slots[k]] (0 where slots[k] < 0): a pair's permuted value back at its slot.
__device__ __forceinline__ void warp_gather_pairs(float* dst, const float* probs, const int64_t* slots,
                                                  int num_pairs, int lane) {
  for (int k = lane; k < num_pairs; k += 32) dst[k] = slots[k] >= 0 ? probs[slots[k]] : 0.f;
}

}  // namespace ep_ops::cuda
