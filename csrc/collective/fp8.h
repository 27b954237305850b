// Per-128-channel FP8 (e4m3) casting and UE8M0 scale packing, shared by the low-latency ops.
#pragma once

#include <ATen/ATen.h>

namespace ep_ops::collective {

// x [T, H] bfloat16 -> (q [T, H] float8_e4m3fn, scale_inv [T, H/128] float32) with
// scale_inv = max(amax, 1e-4) / 448 (rounded up to a power of 2 when round_scale) and
// q = x * (1 / scale_inv), so x ~= q * scale_inv.
std::pair<at::Tensor, at::Tensor> cast_to_fp8(const at::Tensor& x, bool round_scale);

// scale_inv [..., C] float32 (powers of 2) -> [..., C/4] int32, the float exponent bytes of four
// consecutive scales per int32, the first in the lowest byte (DeepEP's packed UE8M0).
at::Tensor pack_ue8m0(const at::Tensor& scale_inv);

}  // namespace ep_ops::collective
