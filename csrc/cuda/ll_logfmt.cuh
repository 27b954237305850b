// LogFMT-10 on the device, for the low-latency combine's partial sums: the format of
// csrc/collective/logfmt.h, computed the same way (float32, round half to even), so the NVLink
// kernels and the collective backend send the same codes up to the last bit of log2/exp2 (CUDA's
// log2f / exp2f and the host's differ by an ulp at most; the tests compare with a tolerance, as
// for the collective backend against the reference).
//
// Row layout (wire::logfmt_row_bytes): hidden * 10 / 8 code bytes, four 10-bit codes per five
// bytes with the first code in the lowest bits; then per 128 channels a float32 pair (log2 of the
// smallest nonzero magnitude, log2 step); zero padding to the row alignment.
//
// Work split: a thread holds one vector of 8 channels (two quads of codes, 10 bytes at 10 * i),
// so a 128-channel group is 16 consecutive lanes of a warp, reduced with shuffles.
#pragma once

#include <cstdint>

namespace ep_ops::cuda {

constexpr int kLogfmtMagnitudeMax = 511;  // 9-bit magnitude codes 1..511 (0: the value is zero)
constexpr int kLogfmtSignBit = 1 << 9;
constexpr int kLogfmtVectorsPerGroup = 128 / 8;

__host__ __device__ constexpr int64_t logfmt_code_bytes(int64_t hidden) { return hidden * 10 / 8; }

// Encodes vector `i` (8 channels, BF16-rounded values in `v`) of a row at `row`. Every lane of the
// warp must call it together (the group reduction shuffles across 16 lanes); lanes past the row
// (`active` false) pass anything and write nothing. `hidden`: the row's channels.
__device__ __forceinline__ void logfmt_encode_vector(const float (&v)[8], uint8_t* row, int hidden,
                                                     int i, bool active) {
  float logs[8];
  float lo = __int_as_float(0x7f800000), hi = -lo;  // +inf, -inf: no nonzero value yet
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    logs[e] = v[e] != 0.f ? log2f(fabsf(v[e])) : 0.f;
    if (active && v[e] != 0.f) {
      lo = fminf(lo, logs[e]);
      hi = fmaxf(hi, logs[e]);
    }
  }
#pragma unroll
  for (int offset = kLogfmtVectorsPerGroup / 2; offset > 0; offset /= 2) {  // within the 16 lanes
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
  }
  if (!active) return;
  const bool any = lo <= hi;
  const float lmin = any ? lo : 0.f, lmax = any ? hi : 0.f;
  const float step = __fdiv_rn(__fsub_rn(lmax, lmin), static_cast<float>(kLogfmtMagnitudeMax - 1));
  uint64_t quads[2] = {0, 0};
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    uint64_t code = 0;
    if (v[e] != 0.f) {
      float magnitude = step > 0.f ? __fadd_rn(rintf(__fdiv_rn(__fsub_rn(logs[e], lmin), step)), 1.f) : 1.f;
      magnitude = fminf(fmaxf(magnitude, 1.f), static_cast<float>(kLogfmtMagnitudeMax));
      code = static_cast<uint64_t>(magnitude) + (v[e] < 0.f ? kLogfmtSignBit : 0);
    }
    quads[e / 4] |= code << (10 * (e % 4));
  }
  // 10 bytes at 10 * i: even, so five 2-byte stores (the row starts 16-byte aligned).
  auto* words = reinterpret_cast<uint16_t*>(row + 10 * static_cast<int64_t>(i));
  words[0] = static_cast<uint16_t>(quads[0]);
  words[1] = static_cast<uint16_t>(quads[0] >> 16);
  words[2] = static_cast<uint16_t>(((quads[0] >> 32) & 0xffu) | ((quads[1] & 0xffu) << 8));
  words[3] = static_cast<uint16_t>(quads[1] >> 8);
  words[4] = static_cast<uint16_t>(quads[1] >> 24);
  if (i % kLogfmtVectorsPerGroup == 0) {  // the group's grid, by its first lane
    auto* grid = reinterpret_cast<float2*>(row + logfmt_code_bytes(hidden)) + i / kLogfmtVectorsPerGroup;
    *grid = make_float2(lmin, step);
  }
}

// Adds the 8 decoded channels of vector `i` of the row at `row` to `acc` (float32, in order).
__device__ __forceinline__ void logfmt_decode_add(const uint8_t* row, int hidden, int i, float (&acc)[8]) {
  const auto* words = reinterpret_cast<const uint16_t*>(row + 10 * static_cast<int64_t>(i));
  const uint64_t w0 = words[0], w1 = words[1], w2 = words[2], w3 = words[3], w4 = words[4];
  const uint64_t quads[2] = {w0 | (w1 << 16) | ((w2 & 0xffu) << 32), (w2 >> 8) | (w3 << 8) | (w4 << 24)};
  const float2 grid =
      reinterpret_cast<const float2*>(row + logfmt_code_bytes(hidden))[i / kLogfmtVectorsPerGroup];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int code = static_cast<int>((quads[e / 4] >> (10 * (e % 4))) & 1023u);
    const int magnitude = code & kLogfmtMagnitudeMax;
    float value = 0.f;
    if (magnitude != 0) {
      value = exp2f(__fadd_rn(grid.x, __fmul_rn(static_cast<float>(magnitude - 1), grid.y)));
      if (code & kLogfmtSignBit) value = -value;
    }
    acc[e] = __fadd_rn(acc[e], value);
  }
}

}  // namespace ep_ops::cuda
