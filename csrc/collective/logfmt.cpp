#include "logfmt.h"

#include <limits>

#include "wire_format.h"

namespace ep_ops::collective {
namespace {

constexpr int64_t kCodeBits = 10, kMagnitudeMax = 511, kSignBit = 1 << 9;

}  // namespace

at::Tensor logfmt_encode(const at::Tensor& v) {
  const int64_t rows = v.size(0), hidden = v.size(1), groups = hidden / wire::kFp8Block;
  const double inf = std::numeric_limits<double>::infinity();
  auto g = v.view({rows, groups, wire::kFp8Block});
  auto nonzero = g != 0;
  auto logs = at::log2(g.abs());
  auto any = nonzero.any(-1, true);
  auto lmin = at::where(any, at::where(nonzero, logs, inf).amin(-1, true), 0.0);
  auto lmax = at::where(any, at::where(nonzero, logs, -inf).amax(-1, true), 0.0);
  auto step = (lmax - lmin) / static_cast<double>(kMagnitudeMax - 1);
  auto magnitude = at::where(step > 0, at::round((logs - lmin) / step) + 1, at::ones_like(logs))
                       .clamp(1, kMagnitudeMax)
                       .to(at::kLong);
  auto code = at::where(nonzero, magnitude + (g < 0).to(at::kLong) * kSignBit, 0);

  // Four 10-bit codes fill five bytes, the first code in the lowest bits.
  auto quads = code.view({rows, hidden / 4, 4});
  auto packed = quads.select(2, 0);
  for (int64_t i = 1; i < 4; ++i) {
    packed = packed + at::bitwise_left_shift(quads.select(2, i), kCodeBits * i);
  }
  std::vector<at::Tensor> bytes;
  for (int64_t b = 0; b < 5; ++b) {
    bytes.push_back(at::bitwise_and(at::bitwise_right_shift(packed, 8 * b), 0xFF).to(at::kByte));
  }
  auto code_bytes = at::stack(bytes, -1).view({rows, wire::logfmt_code_bytes(hidden)});
  auto grid = at::cat({lmin, step}, -1).contiguous().view({rows, groups * 2}).view(at::kByte);
  const int64_t pad = wire::logfmt_row_bytes(hidden) - code_bytes.size(1) - grid.size(1);
  return at::cat({code_bytes, grid, at::zeros({rows, pad}, v.options().dtype(at::kByte))}, 1);
}

at::Tensor logfmt_decode(const at::Tensor& rows, int64_t hidden) {
  const int64_t n = rows.size(0), groups = hidden / wire::kFp8Block;
  const int64_t code_bytes = wire::logfmt_code_bytes(hidden);
  auto bytes = rows.narrow(1, 0, code_bytes).to(at::kLong).view({n, hidden / 4, 5});
  auto packed = bytes.select(2, 0);
  for (int64_t b = 1; b < 5; ++b) {
    packed = packed + at::bitwise_left_shift(bytes.select(2, b), 8 * b);
  }
  std::vector<at::Tensor> codes;
  for (int64_t i = 0; i < 4; ++i) {
    codes.push_back(at::bitwise_and(at::bitwise_right_shift(packed, kCodeBits * i), 1023));
  }
  auto code = at::stack(codes, -1).view({n, groups, wire::kFp8Block});
  auto grid = rows.narrow(1, code_bytes, groups * 8).contiguous().view(at::kFloat).view({n, groups, 2});
  auto lmin = grid.narrow(2, 0, 1), step = grid.narrow(2, 1, 1);
  auto magnitude = at::bitwise_and(code, kMagnitudeMax);
  auto sign = at::where(at::bitwise_and(code, kSignBit) != 0, -1.0, 1.0).to(at::kFloat);
  auto value = sign * at::exp2(lmin + (magnitude - 1).to(at::kFloat) * step);
  return at::where(magnitude == 0, 0.0, value).to(at::kFloat).view({n, hidden});
}

}  // namespace ep_ops::collective
