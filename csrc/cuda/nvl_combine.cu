// Combine between the GPUs of one host, through the group's NVLink buffer.
//
//   begin: wait until every source consumed our previous combine rows; our tokens' slots
//          (positions); open the epoch. The overlapped kernel does this itself, no begin kernel.
//   send:  every received row goes back into its source rank's combine region, into the block
//          of rows that source had sent us, at the row's index in that block (combine_permuted:
//          the row is the sum of its pairs' rows of h, made as it is sent).
//   recv:  each token sums its rows over destination ranks in ascending order (float32), then
//          bias_0, then bias_1 (the collective backend's order, so results match it bitwise).
// The rows we sent ourselves in the dispatch come back without the buffer (combine; not
// combine_permuted, whose rows are made while sending): send skips them and recv reads them
// straight from x, where they already are. At 2 ranks that halves the send kernel's writes
// (half the rows stay on the rank) and saves reading them back: one local copy of ~58 MB less
// each way on the reference workload.
//
// Two shapes of send + recv, with the same outputs bit for bit (nvl_combine_rows.cuh has the
// per-row code both use):
//   overlapped (default; nvl_combine_overlap.cu): ONE kernel of S send blocks + Q receive blocks
//       (64 + 64 by default, all resident at once); a token is summed as soon as the chunk of each
//       stream that holds its rows has landed, while the rest still crosses NVLink.
//   separate (EP_OPS_NVL_OVERLAP=0, or when S + Q blocks cannot all be resident): send kernel
//       (256 blocks) then recv kernel (256 blocks), which waits for every send block of every
//       destination before its first sum.
// EP_OPS_NVL_COMBINE_SEND_BLOCKS (1..256) / EP_OPS_NVL_COMBINE_RECV_BLOCKS (1..256)
// size the overlapped kernel for tuning. A/B: EP_OPS_NVL_OVERLAP=0 python3 -m ep_ops.bench
// against python3 -m ep_ops.bench (the switch covers dispatch too: compare the combine rows).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nvl_buffer.h"
#include "nvl_combine_overlap.h"
#include "nvl_combine_rows.cuh"
#include "nvl_dispatch.h"
#include "nvl_positions.cuh"
#include "nvl_recv_done.cuh"
#include "nvl_signals.cuh"

namespace ep_ops::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// Opens the epoch once every source consumed our previous rows, and computes our tokens' slots.
__global__ void __launch_bounds__(kScanThreads) begin_kernel(PeerView v, const bool* in_rank,
                                                             int num_tokens, int32_t* positions) {
  const int tid = threadIdx.x, me = v.rank;
  Control* mine = v.control(me);
  const uint64_t cur = mine->combine_epoch + 1;
  token_positions(in_rank, num_tokens, v.num_ranks, positions, nullptr);
  const bool ok = tid >= v.num_ranks || wait_at_least(v.watchdog, &mine->combine_freed[tid],
                                                      cur - 1, me, tid, kWaitCombineFreed);
  if (!block_waits_ok(ok)) return;
  if (tid == 0) mine->combine_epoch = cur;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) send_kernel(PeerView v, CombineSendArgs a) {
  if (watchdog_tripped(v.watchdog)) return;  // begin gave up: the peers may still read our rows
  const int me = v.rank, R = v.num_ranks, lane = threadIdx.x % 32;
  const int64_t num_valid = a.prefix[(R - 1) * R + me];
  // With self_direct our own rows (own_rows from own_begin) are not sent: the warps take the others.
  const int64_t own_begin = a.self_direct ? rows_before(a.prefix, R, me, me) : num_valid;
  const int64_t own_rows = a.self_direct ? a.prefix[me * R + me] - own_begin : 0;
  const int64_t num_sent = num_valid - own_rows;
  for (int64_t i = blockIdx.x * kWarps + threadIdx.x / 32; i < num_sent; i += gridDim.x * kWarps) {
    const int64_t n = i < own_begin ? i : i + own_rows;
    int s = 0;
    while (a.prefix[s * R + me] <= n) ++s;  // the source rank of row n
    const int64_t index = n - rows_before(a.prefix, R, s, me);
    uint8_t* dst = v.combine_region(s) + (combine_stream_start(a.prefix, R, s, me) + index) * a.row_bytes;
    // 4 loads in flight per lane (the old warp_copy's depth): 256 blocks keep rows enough in flight.
    combine_send_row<T, 4>(a, n, dst, lane, [] {});
  }
  __syncthreads();
  if (threadIdx.x < R) {
    add_release(&v.control(threadIdx.x)->combine_arrivals[me], 1);  // the block's rows first
  }
}

// Waits for every destination's send blocks, then sums our tokens (nvl_combine_rows.cuh).
template <typename T, int kMaxRanks>
__global__ void __launch_bounds__(kThreads) recv_kernel(PeerView v, CombineRecvArgs a) {
  const int me = v.rank, R = v.num_ranks, tid = threadIdx.x, lane = tid % 32;
  Control* mine = v.control(me);
  const uint64_t cur = mine->combine_epoch;
  const bool ok = tid >= R || wait_at_least(v.watchdog, &mine->combine_arrivals[tid],
                                            cur * kCombineSendBlocks, me, tid, kWaitCombineRows);
  if (!block_waits_ok(ok)) return;
  const CombinePlaces places = combine_places(v, a);
  for (int t = blockIdx.x * kWarps + tid / 32; t < a.num_tokens; t += gridDim.x * kWarps) {
    combine_recv_token<T, kMaxRanks, /*kConcurrent=*/false>(a, places, me, R, t, lane);
  }
  __syncthreads();
  if (tid == 0 && last_block_done(&mine->combine_recv_tickets, 1, kCombineRecvBlocks)) {
    for (int d = 0; d < R; ++d) store_release(&v.control(d)->combine_freed[me], cur);
  }
}

template <typename T>
void launch_combine(const CombineOverlapConfig& overlap, const PeerView& v, const CombineSendArgs& send,
                    const CombineRecvArgs& recv, int64_t capacity_rows, cudaStream_t stream) {
  if (launch_combine_overlap<T>(overlap, v, send, recv, capacity_rows, stream)) return;
  begin_kernel<<<1, kScanThreads, 0, stream>>>(v, recv.in_rank, recv.num_tokens, recv.positions);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  send_kernel<T><<<kCombineSendBlocks, kThreads, 0, stream>>>(v, send);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (v.num_ranks <= 2) {
    recv_kernel<T, 2><<<kCombineRecvBlocks, kThreads, 0, stream>>>(v, recv);
  } else {
    recv_kernel<T, kMaxNvlRanks><<<kCombineRecvBlocks, kThreads, 0, stream>>>(v, recv);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nvl_combine(const PeerView& v, const at::Tensor& x_in,
                                               const std::optional<at::Tensor>& topk_weights,
                                               const std::optional<at::Tensor>& bias_0,
                                               const std::optional<at::Tensor>& bias_1,
                                               const at::Tensor& is_token_in_rank,
                                               const at::Tensor& rank_prefix_matrix,
                                               const std::optional<at::Tensor>& pair_slot_in) {
  c10::cuda::CUDAGuard guard(x_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto x = x_in.contiguous();
  auto in_rank = is_token_in_rank.contiguous();
  auto prefix = rank_prefix_matrix.contiguous();
  const int64_t num_tokens = in_rank.size(0), hidden = x.size(1);
  // combine_permuted sends one row per received row (pair_slot's), weights per (row, slot).
  auto pair_slot = pair_slot_in.has_value() ? std::optional<at::Tensor>(pair_slot_in->contiguous()) : std::nullopt;
  const int64_t num_rows = pair_slot.has_value() ? pair_slot->size(0) : x.size(0);
  const int num_pairs = pair_slot.has_value() ? static_cast<int>(pair_slot->size(1)) : 0;
  const int num_topk = !topk_weights.has_value() ? 0
                       : pair_slot.has_value()   ? num_pairs
                                                 : static_cast<int>(topk_weights->size(1));
  const int64_t payload = hidden * x.element_size();
  const int64_t weight_bytes = 4LL * num_topk;
  const int64_t row_bytes = round_up_line(payload + round16(weight_bytes));  // as dispatch's rows
  const int64_t capacity_rows = v.region_bytes / row_bytes;
  TORCH_CHECK_VALUE(num_rows <= capacity_rows, "ep_ops.combine: the NVLink buffer holds ",
                    capacity_rows, " rows of ", row_bytes, " bytes, this call may need ", num_rows,
                    "; num_nvl_bytes must be at least ", kControlBytes + 2 * num_rows * row_bytes);
  auto w = topk_weights.has_value() ? std::optional<at::Tensor>(topk_weights->contiguous()) : std::nullopt;
  auto b0 = bias_0.has_value() ? std::optional<at::Tensor>(bias_0->contiguous()) : std::nullopt;
  auto b1 = bias_1.has_value() ? std::optional<at::Tensor>(bias_1->contiguous()) : std::nullopt;

  const CombineOverlapConfig overlap = combine_overlap_config();  // before any kernel: bad env fails clean

  auto positions = at::empty({num_tokens, v.num_ranks}, x.options().dtype(at::kInt));
  CombineSendArgs send{static_cast<const uint8_t*>(x.data_ptr()),
                       w.has_value() ? static_cast<const uint8_t*>(w->data_ptr()) : nullptr,
                       prefix.data_ptr<int32_t>(), payload, weight_bytes, row_bytes,
                       pair_slot.has_value() ? pair_slot->data_ptr<int64_t>() : nullptr, num_pairs,
                       /*self_direct=*/!pair_slot.has_value()};

  auto out = at::empty({num_tokens, hidden}, x.options());
  auto out_weights = at::empty(w.has_value() ? at::IntArrayRef{num_tokens, num_topk} : at::IntArrayRef{0},
                               x.options().dtype(at::kFloat));
  CombineRecvArgs recv{static_cast<uint8_t*>(out.data_ptr()),
                       w.has_value() ? out_weights.data_ptr<float>() : nullptr,
                       b0.has_value() ? static_cast<const uint8_t*>(b0->data_ptr()) : nullptr,
                       b1.has_value() ? static_cast<const uint8_t*>(b1->data_ptr()) : nullptr,
                       in_rank.data_ptr<bool>(), positions.data_ptr<int32_t>(), prefix.data_ptr<int32_t>(),
                       static_cast<int>(num_tokens), num_topk, payload, row_bytes,
                       send.self_direct ? send.x : nullptr, send.self_direct ? send.weights : nullptr,
                       weight_bytes};
  switch (x.scalar_type()) {
    case at::kBFloat16:
      launch_combine<__nv_bfloat16>(overlap, v, send, recv, capacity_rows, stream);
      break;
    case at::kHalf:
      launch_combine<__half>(overlap, v, send, recv, capacity_rows, stream);
      break;
    case at::kFloat:
      launch_combine<float>(overlap, v, send, recv, capacity_rows, stream);
      break;
    default:  // nothing has run yet: the callers route other dtypes to the collective backend
      TORCH_CHECK_TYPE(false, "ep_ops.combine: the NVLink kernel takes bfloat16, float16 or float32, got ",
                       x.scalar_type());
  }
  return {out, out_weights};
}

}  // namespace ep_ops::cuda
