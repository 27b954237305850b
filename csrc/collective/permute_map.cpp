#include "permute_map.h"

namespace ep_ops::collective {

PermuteMap make_permute_map(const at::Tensor& local_idx, int64_t num_local_experts,
                            int64_t pad_multiple, int64_t num_out) {
  const int64_t num_rows = local_idx.size(0), num_slots = local_idx.size(1);
  const int64_t E = num_local_experts;
  auto valid = local_idx >= 0;
  auto expert = at::where(valid, local_idx, at::full_like(local_idx, E));  // column E: empty slots

  // Position of each pair inside its expert group: earlier rows of the same expert first.
  auto onehot = at::zeros({num_rows, E + 1}, local_idx.options());
  onehot.scatter_(1, expert, 1);
  auto before = at::cumsum(onehot, 0) - onehot;
  auto position = before.gather(1, expert);
  auto counts = onehot.narrow(1, 0, E).sum(0);

  auto padded = at::floor_divide(counts + (pad_multiple - 1), pad_multiple) * pad_multiple;
  auto offsets = at::cumsum(padded, 0) - padded;
  offsets = at::cat({offsets, offsets.new_zeros({1})});  // the empty-slot column
  auto slot = offsets.index_select(0, expert.reshape(-1)).view_as(expert) + position;
  const int64_t total = num_out > 0 ? num_out : padded.sum().item<int64_t>();
  auto keep = num_out > 0 ? valid & (slot < total) : valid;

  auto pair_slot = at::where(keep, slot, at::full_like(slot, -1));
  // Inverse map: one write per kept pair; dropped pairs all go to the extra last entry.
  auto pair_ids = at::arange(num_rows * num_slots, local_idx.options());
  auto slot_pair = at::full({total + 1}, -1, local_idx.options());
  slot_pair.scatter_(0, at::where(keep, slot, at::full_like(slot, total)).reshape(-1), pair_ids);
  return {pair_slot, slot_pair.narrow(0, 0, total), padded};
}

at::Tensor unpermute_rows(const at::Tensor& h, const at::Tensor& pair_slot) {
  const auto acc_type = h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto h_ext = at::cat({h.new_zeros({1, h.size(1)}), h});  // row 0 serves the -1 slots
  auto index = pair_slot + 1;
  auto out = h_ext.index_select(0, index.select(1, 0)).to(acc_type);
  for (int64_t k = 1; k < index.size(1); ++k) {
    out = out + h_ext.index_select(0, index.select(1, k)).to(acc_type);
  }
  return out.to(h.scalar_type());
}

at::Tensor gather_pairs(const at::Tensor& values, const at::Tensor& pair_slot) {
  auto flat = at::cat({values.new_zeros({1}), values});
  return flat.index_select(0, (pair_slot + 1).reshape(-1)).view(pair_slot.sizes());
}

}  // namespace ep_ops::collective
