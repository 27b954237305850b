// Combine between the GPUs of one host, through the group's NVLink buffer.
//
//   begin: wait until every source consumed our previous combine rows; open the epoch.
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
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "nvl_buffer.h"
#include "nvl_convert.cuh"
#include "nvl_dispatch.h"
#include "nvl_permute.cuh"
#include "nvl_positions.cuh"
#include "nvl_rows.cuh"
#include "nvl_signals.cuh"

namespace ep_ops::cuda {
namespace {

constexpr int kSendBlocks = 256;
constexpr int kRecvBlocks = 256;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// Rows source `s` sent to rank `d` in the dispatch, from the prefix matrix.
__device__ __forceinline__ int32_t sent(const int32_t* prefix, int R, int s, int d) {
  return prefix[s * R + d] - rows_before(prefix, R, s, d);
}

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

struct SendArgs {
  const uint8_t* x;
  const uint8_t* weights;
  const int32_t* prefix;
  int64_t payload, weight_bytes, row_bytes;
  const int64_t* pair_slot;  // combine_permuted: [N, num_pairs]; x is h, weights are probs [P]
  int num_pairs;
  bool self_direct;  // our own rows stay in x: recv reads them there (combine, not _permuted)
};


template <typename T>
__global__ void __launch_bounds__(kThreads) send_kernel(PeerView v, SendArgs a) {
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
    int64_t block = 0;  // rows source s sent to ranks below us come first in its region
    for (int d = 0; d < me; ++d) block += sent(a.prefix, R, s, d);
    uint8_t* dst = v.combine_region(s) + (block + index) * a.row_bytes;
    if (a.pair_slot) {
      const int64_t* slots = a.pair_slot + n * a.num_pairs;
      warp_sum_pairs<T>(dst, a.x, slots, a.num_pairs, a.payload, lane);
      if (a.weights) {
        warp_gather_pairs(reinterpret_cast<float*>(dst + a.payload), reinterpret_cast<const float*>(a.weights),
                          slots, a.num_pairs, lane);
      }
      continue;
    }
    warp_copy(dst, a.x + n * a.payload, a.payload, lane);
    if (a.weights) warp_copy_words(dst + a.payload, a.weights + n * a.weight_bytes, a.weight_bytes, lane);
  }
  __syncthreads();
  if (threadIdx.x < R) {
    fence_system();  // the block's row writes (seen through the barrier) before the flag
    add_release(&v.control(threadIdx.x)->combine_arrivals[me], 1);
  }
}

struct RecvArgs {
  uint8_t* out;
  float* out_weights;
  const uint8_t* bias_0;
  const uint8_t* bias_1;
  const bool* in_rank;
  const int32_t* positions;
  const int32_t* prefix;
  int num_tokens, num_topk;
  int64_t payload, row_bytes;
  // self_direct: our own rows are read from x (payload) and weights (weight_bytes per row).
  const uint8_t* x;
  const uint8_t* weights;
  int64_t weight_bytes;
};

// Where token t's row from destination d is: its payload and (if sent) its weights.
struct RowAt {
  const uint8_t* payload;
  const float* weights;
};

// kMaxRanks: R <= kMaxRanks (an instance for 2 ranks keeps every row of a round in registers).
// A lane sums kUnroll 16-byte chunks of the token per round, with the loads of all of them (from
// every destination and both biases) issued before any sum: one memory latency per round instead
// of one per chunk (a load may not pass the previous chunk's store, which the compiler cannot
// tell apart from it).
// More ranks: one chunk per round (its R + 2 loads together); either instance runs one block per
// SM (the old loop, a load at a time, fit two).
template <typename T, int kMaxRanks>
__global__ void __launch_bounds__(kThreads) recv_kernel(PeerView v, RecvArgs a) {
  constexpr int kElems = 16 / sizeof(T);
  constexpr int kUnroll = kMaxRanks <= 2 ? 4 : 1;
  const int me = v.rank, R = v.num_ranks, tid = threadIdx.x, lane = tid % 32;
  Control* mine = v.control(me);
  const uint64_t cur = mine->combine_epoch;
  const bool ok = tid >= R || wait_at_least(v.watchdog, &mine->combine_arrivals[tid],
                                            cur * kSendBlocks, me, tid, kWaitCombineRows);
  if (!block_waits_ok(ok)) return;

  int64_t block[kMaxNvlRanks];  // where each destination's rows start in our region
  int64_t running = 0;
  for (int d = 0; d < R; ++d) {
    block[d] = running;
    running += sent(a.prefix, R, me, d);
  }
  const int64_t own_begin = rows_before(a.prefix, R, me, me);  // our rows in x (self_direct)
  const uint8_t* region = v.combine_region(me);
  const auto row_at = [&](int64_t token, int d) {
    const int64_t position = a.positions[token * R + d];
    if (a.x != nullptr && d == me) {
      const int64_t n = own_begin + position;
      return RowAt{a.x + n * a.payload, reinterpret_cast<const float*>(a.weights + n * a.weight_bytes)};
    }
    const uint8_t* row = region + (block[d] + position) * a.row_bytes;
    return RowAt{row, reinterpret_cast<const float*>(row + a.payload)};
  };
  for (int t = blockIdx.x * kWarps + tid / 32; t < a.num_tokens; t += gridDim.x * kWarps) {
    const int64_t token = t;
    const uint8_t* rows[kMaxRanks];  // the token's row from each destination, null if none
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      rows[d] = d < R && a.in_rank[token * R + d] ? row_at(token, d).payload : nullptr;
    }
    const uint8_t* biases[2] = {a.bias_0 ? a.bias_0 + token * a.payload : nullptr,
                                a.bias_1 ? a.bias_1 + token * a.payload : nullptr};
    const int64_t n = a.payload / 16;
    for (int64_t first = lane; first < n; first += 32 * kUnroll) {
      // Every load of the round first (rows, then biases), then the sums in the fixed order.
      int4 raw[kMaxRanks + 2][kUnroll];
#pragma unroll
      for (int d = 0; d < kMaxRanks + 2; ++d) {
        const uint8_t* src = d < kMaxRanks ? rows[d] : biases[d - kMaxRanks];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t chunk = first + 32 * u;
          if (src && chunk < n) raw[d][u] = reinterpret_cast<const int4*>(src)[chunk];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t chunk = first + 32 * u;
        if (chunk >= n) break;
        float acc[kElems];
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[e] = 0.f;
#pragma unroll
        for (int d = 0; d < kMaxRanks + 2; ++d) {
          const uint8_t* src = d < kMaxRanks ? rows[d] : biases[d - kMaxRanks];
          if (!src) continue;
          const T* vals = reinterpret_cast<const T*>(&raw[d][u]);
#pragma unroll
          for (int e = 0; e < kElems; ++e) acc[e] += Convert<T>::to_float(vals[e]);
        }
        int4 packed;
        T* outs = reinterpret_cast<T*>(&packed);
#pragma unroll
        for (int e = 0; e < kElems; ++e) outs[e] = Convert<T>::from_float(acc[e]);
        reinterpret_cast<int4*>(a.out + token * a.payload)[chunk] = packed;
      }
    }
    for (int k = lane; k < a.num_topk && a.out_weights; k += 32) {
      float acc = 0.f;
      for (int d = 0; d < R; ++d) {
        if (!a.in_rank[token * R + d]) continue;
        acc += row_at(token, d).weights[k];
      }
      a.out_weights[token * a.num_topk + k] = acc;
    }
  }
  __syncthreads();
  if (tid == 0) {
    fence_gpu();
    const uint64_t ticket = atomicAdd(reinterpret_cast<unsigned long long*>(&mine->combine_recv_tickets), 1ULL) + 1;
    if (ticket % kRecvBlocks == 0) {
      for (int d = 0; d < R; ++d) store_release(&v.control(d)->combine_freed[me], cur);
    }
  }
}

template <typename T>
void launch_send_and_recv(const PeerView& v, const SendArgs& send, const RecvArgs& recv, cudaStream_t stream) {
  send_kernel<T><<<kSendBlocks, kThreads, 0, stream>>>(v, send);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (v.num_ranks <= 2) {
    recv_kernel<T, 2><<<kRecvBlocks, kThreads, 0, stream>>>(v, recv);
  } else {
    recv_kernel<T, kMaxNvlRanks><<<kRecvBlocks, kThreads, 0, stream>>>(v, recv);
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
  const int64_t row_bytes = payload + round16(weight_bytes);
  const int64_t capacity_rows = v.region_bytes / row_bytes;
  TORCH_CHECK_VALUE(num_rows <= capacity_rows, "ep_ops.combine: the NVLink buffer holds ",
                    capacity_rows, " rows of ", row_bytes, " bytes, this call may need ", num_rows,
                    "; num_nvl_bytes must be at least ", kControlBytes + 2 * num_rows * row_bytes);
  auto w = topk_weights.has_value() ? std::optional<at::Tensor>(topk_weights->contiguous()) : std::nullopt;
  auto b0 = bias_0.has_value() ? std::optional<at::Tensor>(bias_0->contiguous()) : std::nullopt;
  auto b1 = bias_1.has_value() ? std::optional<at::Tensor>(bias_1->contiguous()) : std::nullopt;

  auto positions = at::empty({num_tokens, v.num_ranks}, x.options().dtype(at::kInt));
  begin_kernel<<<1, kScanThreads, 0, stream>>>(v, in_rank.data_ptr<bool>(), static_cast<int>(num_tokens),
                                               positions.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  SendArgs send{static_cast<const uint8_t*>(x.data_ptr()),
                w.has_value() ? static_cast<const uint8_t*>(w->data_ptr()) : nullptr,
                prefix.data_ptr<int32_t>(), payload, weight_bytes, row_bytes,
                pair_slot.has_value() ? pair_slot->data_ptr<int64_t>() : nullptr, num_pairs,
                /*self_direct=*/!pair_slot.has_value()};

  auto out = at::empty({num_tokens, hidden}, x.options());
  auto out_weights = at::empty(w.has_value() ? at::IntArrayRef{num_tokens, num_topk} : at::IntArrayRef{0},
                               x.options().dtype(at::kFloat));
  RecvArgs recv{static_cast<uint8_t*>(out.data_ptr()),
                w.has_value() ? out_weights.data_ptr<float>() : nullptr,
                b0.has_value() ? static_cast<const uint8_t*>(b0->data_ptr()) : nullptr,
                b1.has_value() ? static_cast<const uint8_t*>(b1->data_ptr()) : nullptr,
                in_rank.data_ptr<bool>(), positions.data_ptr<int32_t>(), prefix.data_ptr<int32_t>(),
                static_cast<int>(num_tokens), num_topk, payload, row_bytes,
                send.self_direct ? send.x : nullptr, send.self_direct ? send.weights : nullptr,
                weight_bytes};
  switch (x.scalar_type()) {
    case at::kBFloat16:
      launch_send_and_recv<__nv_bfloat16>(v, send, recv, stream);
      break;
    case at::kHalf:
      launch_send_and_recv<__half>(v, send, recv, stream);
      break;
    case at::kFloat:
      launch_send_and_recv<float>(v, send, recv, stream);
      break;
    default:  // the begin kernel has run: the callers route other dtypes to the collective backend
      TORCH_CHECK_TYPE(false, "ep_ops.combine: the NVLink kernel takes bfloat16, float16 or float32, got ",
                       x.scalar_type());
  }
  return {out, out_weights};
}

}  // namespace ep_ops::cuda
