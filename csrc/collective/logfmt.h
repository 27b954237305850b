// LogFMT-10, the lossy format low-latency combine can send partial sums in: per 128 channels a
// float32 (log2-min, log2-step) pair, and per value 10 bits: a sign and a 9-bit code of
// log2|v| on that grid (code 0 = zero). About 0.66 of BF16's bytes.
#pragma once

#include <ATen/ATen.h>

namespace ep_ops::collective {

// v [N, H] float32 (H a multiple of 128) -> [N, wire::logfmt_row_bytes(H)] uint8.
at::Tensor logfmt_encode(const at::Tensor& v);

// The inverse, to [N, hidden] float32.
at::Tensor logfmt_decode(const at::Tensor& rows, int64_t hidden);

}  // namespace ep_ops::collective
