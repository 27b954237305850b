#include "fp8.h"

#include "wire_format.h"

namespace ep_ops::collective {
namespace {

// Exact on the bits: keep the exponent, add one where the mantissa is non-zero. (exp2 of
// ceil(log2) can land one power too low just above a power of two.)
at::Tensor round_up_to_power_of_2(const at::Tensor& positive) {
  auto bits = positive.view(at::kInt);
  auto exponent = at::bitwise_and(bits, 0x7F800000);
  auto bump = (at::bitwise_and(bits, 0x007FFFFF) != 0).to(at::kInt) * (1 << 23);
  return (exponent + bump).view(at::kFloat);
}

}  // namespace

std::pair<at::Tensor, at::Tensor> cast_to_fp8(const at::Tensor& x, bool round_scale) {
  constexpr double kFp8Max = 448.0, kMinAmax = 1e-4;
  const int64_t tokens = x.size(0), groups = x.size(1) / wire::kFp8Block;
  auto xf = x.to(at::kFloat).view({tokens, groups, wire::kFp8Block});
  auto amax = xf.abs().amax(-1).clamp_min(kMinAmax);
  // A tensor divisor keeps this an exact IEEE division on every device (CUDA turns division by
  // a scalar into multiplication by its reciprocal, one ulp away).
  auto scale_inv = amax / at::full_like(amax, kFp8Max);
  if (round_scale) scale_inv = round_up_to_power_of_2(scale_inv);
  auto q = (xf * at::reciprocal(scale_inv).unsqueeze(-1)).to(at::kFloat8_e4m3fn);
  return {q.view({tokens, groups * wire::kFp8Block}), scale_inv};
}

at::Tensor pack_ue8m0(const at::Tensor& scale_inv) {
  auto exponent = at::bitwise_and(at::bitwise_right_shift(scale_inv.view(at::kInt), 23), 0xFF);
  auto sizes = scale_inv.sizes().vec();
  sizes.back() /= wire::kUe8m0Pack;
  // Little-endian: four bytes viewed as one int32 put the first scale in the lowest byte.
  return exponent.to(at::kByte).contiguous().view(at::kInt).view(sizes);
}

}  // namespace ep_ops::collective
