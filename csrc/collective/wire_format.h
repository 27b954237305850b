// Sizes of the byte rows the low-latency halves exchange. The Python fakes compute the same
// sizes in meta/wire.py; opcheck's fake-vs-real comparison keeps the two in step.
#pragma once

#include <cstdint>

// The NVLink kernels (csrc/cuda/) compute row offsets on the device too.
#ifdef __CUDACC__
#define EP_OPS_WIRE_FN __host__ __device__ inline
#else
#define EP_OPS_WIRE_FN inline
#endif

namespace ep_ops::wire {

constexpr int64_t kFp8Block = 128;  // channels per FP8 scale
constexpr int64_t kUe8m0Pack = 4;   // UE8M0 scales per int32
constexpr int64_t kRowAlign = 16;   // rows padded so kernels can move them in 16-byte units

EP_OPS_WIRE_FN int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// One token row of low-latency dispatch: payload | float32 scales (FP8) | int32 source token
// index (-1 = empty slot) | int32 global expert ids.
struct DispatchRow {
  int64_t hidden, num_topk;
  bool use_fp8;
  EP_OPS_WIRE_FN int64_t payload_bytes() const { return use_fp8 ? hidden : 2 * hidden; }
  EP_OPS_WIRE_FN int64_t scale_offset() const { return payload_bytes(); }
  EP_OPS_WIRE_FN int64_t num_scales() const { return use_fp8 ? hidden / kFp8Block : 0; }
  EP_OPS_WIRE_FN int64_t src_offset() const { return scale_offset() + 4 * num_scales(); }
  EP_OPS_WIRE_FN int64_t topk_offset() const { return src_offset() + 4; }
  EP_OPS_WIRE_FN int64_t bytes() const { return round_up(topk_offset() + 4 * num_topk, kRowAlign); }
};

// LogFMT-10: 10 bits per value, then a float32 (log-min, log-step) pair per 128 channels.
EP_OPS_WIRE_FN int64_t logfmt_code_bytes(int64_t hidden) { return hidden * 10 / 8; }
EP_OPS_WIRE_FN int64_t logfmt_row_bytes(int64_t hidden) {
  return round_up(logfmt_code_bytes(hidden) + 8 * (hidden / kFp8Block), kRowAlign);
}

// One partial sum of low-latency combine: BF16, or LogFMT-10.
EP_OPS_WIRE_FN int64_t combine_row_bytes(int64_t hidden, bool use_logfmt) {
  return use_logfmt ? logfmt_row_bytes(hidden) : round_up(2 * hidden, kRowAlign);
}

}  // namespace ep_ops::wire
