// Dispatch and cached dispatch between the GPUs of one host, through the group's NVLink buffer.
//
// Launches on the current stream:
//   notify: wait until every receiver has consumed our previous rows, post our per-destination
//           counts to every peer, wait for theirs; out: rank_prefix_matrix and per-rank totals.
//   send:   each warp takes tokens and writes each token's row straight into every destination's
//           dispatch region, at (rows from lower source ranks) + (its index among our tokens for
//           that destination): the receiver's order is fixed by the data, no atomics decide it.
//   recv:   copy the rows out into the output tensors, then tell the sources their rows are
//           consumed.
// Epochs and counters live in the buffer, so a captured graph replays correctly.
// Exact mode (no num_worst_tokens, no handle) reads notify's totals on the host to size its
// outputs: through the buffer's mapped host area, with the overlapped kernel's send blocks
// already running on a side stream (nvl_exact_totals.h says how and why).
// A cached dispatch (a handle) runs the same split outside a capture, its notify taking the
// handle's prefix matrix (no exchange) and its receive part launched at once, with no host read.
// Captured, it runs no notify: the handle has the prefix matrix and the tokens of our rows to
// ourselves, and the one launch opens its epoch itself (nvl_dispatch_overlap.cu).
//
// Two shapes of send + recv, with the same outputs bit for bit (nvl_dispatch_rows.cuh has the
// per-row code both use):
//   overlapped (default; nvl_dispatch_overlap.cu): ONE kernel of S send blocks + Q receive
//       blocks (64 + the rest of the device by default: 68 on 132 SMs; all resident at once;
//       exact mode's split launches the send part alone, then the receive part).
//       Senders post per-chunk progress (a release-add per row on the receiver's counter of its
//       (source, chunk of C >= 16 rows)), and receive blocks copy each chunk out as soon as its
//       counter is full, while the rest is still crossing NVLink. A rank's rows to itself skip
//       the buffer: the receive blocks copy them from the send inputs (notify writes which token
//       each of those rows is), one local copy less (at 2 ranks, half the rows; measured in
//       BENCHMARKS.md, session 5).
//   separate (EP_OPS_NVL_OVERLAP=0, or when S + Q blocks cannot all be resident): send kernel
//       (256 blocks) then recv kernel (256 blocks), which waits for every send block of every
//       source before its first copy.
//
// Why the overlapped shape is faster (2 x H200, 4096 tokens x 7168 BF16, top-8 of 256; estimates,
// not measurements): the separate shape costs notify (~25 us) + send (~150-180 us: 58 MB each way
// at <= 388 GB/s) + recv (~60-80 us: 117 MB read and 117 MB written in local HBM) + launches, in
// series: ~350-400 us measured. Overlapped, the receive copy runs under the send, which is bound
// by the link, not by HBM (all local traffic of a rank, ~410 MB, needs ~120 us at ~3.5 TB/s, less
// than the ~150 us the link needs); what stays exposed is the copy of the last chunk of each
// stream (C rows over 16 warps: ~1-3 us) and one launch less: ~25 + ~160-190 = ~185-215 us for
// BF16 (target <= 200), ~25 + ~85-100 = ~110-125 us for FP8 (target <= 120).
// What it costs: one release-add over NVLink per (token, destination) row, by one lane of
// the sending warp (the warp waits for its writes to land: ~1-2 us, spent while its next token's
// loads are in flight, and hidden by the other warps);
// per chunk a spin by one thread and a block barrier on the receiver; 32 KB of chunk counters in
// the control region; S + Q = every SM (by default) busy for the whole send;
// the receive blocks spin while they wait (local L2 polls).
//
// A/B: EP_OPS_NVL_OVERLAP=0 selects the separate kernels (read at every call; set it alike on
// every rank). EP_OPS_NVL_SEND_BLOCKS (a divisor of 256, default 64) and
// EP_OPS_NVL_RECV_BLOCKS (1..256, default: the rest of the blocks the device holds) size the
// overlapped kernel for tuning; a pair the device cannot hold at once falls back to the separate
// kernels. E.g.
//   EP_OPS_NVL_OVERLAP=0 python3 -m ep_ops.bench --ranks 2   vs   python3 -m ep_ops.bench --ranks 2
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>

#include "nvl_buffer.h"
#include "nvl_dispatch.h"
#include "nvl_dispatch_overlap.h"
#include "nvl_dispatch_rows.cuh"
#include "nvl_exact_totals.h"
#include "nvl_overlap_config.h"
#include "nvl_positions.cuh"
#include "nvl_recv_done.cuh"
#include "nvl_rows.cuh"
#include "nvl_signals.cuh"

namespace ep_ops::cuda {
namespace {

constexpr int kSendBlocks = 256;  // fixed: receivers count send blocks to know a source is done
constexpr int kRecvBlocks = kDispatchRecvBlocks;  // the freed ticket counts them (nvl_recv_done.cuh)
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

// The tokens per expert (of all experts) among ours: a token counts once per distinct expert.
// A thread takes two tokens per round with all their ids loaded together (one memory latency per
// round: at 4096 tokens, two rounds instead of four). Ends with a block barrier.
__device__ __forceinline__ void count_expert_tokens(const int64_t* topk, int num_tokens, int num_topk,
                                                    int num_experts, int32_t* hist) {
  constexpr int kUnrolledTopk = 8, kTokensPerRound = 2;
  for (int i = threadIdx.x; i < num_experts; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  const auto count = [&](int64_t e, bool seen) {
    if (e >= 0 && e < num_experts && !seen) atomicAdd(&hist[e], 1);
  };
  const int stride = blockDim.x;
  for (int t0 = threadIdx.x; t0 < num_tokens; t0 += kTokensPerRound * stride) {
    if (num_topk <= kUnrolledTopk) {
      int64_t ids[kTokensPerRound][kUnrolledTopk];
#pragma unroll
      for (int b = 0; b < kTokensPerRound; ++b) {
        const int t = t0 + b * stride;
        const int64_t* row = topk + static_cast<int64_t>(t) * num_topk;
#pragma unroll
        for (int k = 0; k < kUnrolledTopk; ++k) ids[b][k] = t < num_tokens && k < num_topk ? __ldg(row + k) : -1;
      }
#pragma unroll
      for (int b = 0; b < kTokensPerRound; ++b) {
#pragma unroll
        for (int k = 0; k < kUnrolledTopk; ++k) {
          bool seen = false;
#pragma unroll
          for (int j = 0; j < k; ++j) seen |= ids[b][j] == ids[b][k];
          count(ids[b][k], seen);
        }
      }
      continue;
    }
    for (int t = t0; t < num_tokens && t < t0 + kTokensPerRound * stride; t += stride) {
      const int64_t* row = topk + static_cast<int64_t>(t) * num_topk;
      for (int k = 0; k < num_topk; ++k) {
        bool seen = false;
        for (int j = 0; j < k; ++j) seen |= row[j] == row[k];
        count(row[k], seen);
      }
    }
  }
  __syncthreads();
}

// count_experts (exact mode with top-k, when the caller asked: dispatch_counts.h): also count,
// per local expert, the tokens every source sends us, into totals_out[R ...] (the host reads them
// with the totals: Buffer.dispatch's list of counts without a second sync). experts_per_rank <=
// kMaxNotifyExperts. A flag, not topk's nullness: a rank with no tokens has a null topk and must
// still post its (zero) counts.
// host (exact mode): the totals also go to the buffer's mapped host area, stamped with `request`
// once they are all there (nvl_exact_totals.h).
// release_prefix (exact mode's split): once the positions are written and every receiver has
// freed our previous rows, set Control::dispatch_send_ready to `request` (the sliced send
// starts then); once the prefix matrix and the totals are written too, set
// Control::dispatch_prefix_ready to it (the packed send starts then, and the sliced send's rows
// past their slice). What follows each runs beside the send instead of before it.
__global__ void __launch_bounds__(kScanThreads) notify_kernel(
    PeerView v, const bool* in_rank, int num_tokens, const int32_t* given_prefix,
    int32_t* prefix_out, int32_t* totals_out, int32_t* positions, int32_t* own_tokens,
    bool count_experts, const int64_t* topk, int num_topk, int experts_per_rank,
    HostTotals* host, uint64_t request, bool release_prefix) {
  __shared__ int32_t counts[kMaxNvlRanks];
  __shared__ int32_t expert_hist[kMaxNvlRanks * kMaxNotifyExperts];
  __shared__ uint64_t epoch;
  const int me = v.rank, R = v.num_ranks, tid = threadIdx.x;
  Control* mine = v.control(me);
  const auto post_total = [&](int i, int32_t value) {
    totals_out[i] = value;
    // volatile: the host polls the mapped area
    if (host != nullptr) *reinterpret_cast<volatile int32_t*>(&host->totals[i]) = value;
  };
  if (tid == 0) epoch = mine->dispatch_epoch + 1;
  __syncthreads();
  const uint64_t cur = epoch;
  // Our tokens' slots per destination, and how many go to each (the counts we post).
  token_positions(in_rank, num_tokens, R, positions, counts);

  // Receivers must have consumed our rows of the previous dispatch before we overwrite them.
  bool ok = tid >= R || wait_at_least(v.watchdog, &mine->dispatch_freed[tid], cur - 1, me, tid,
                                      kWaitDispatchFreed);
  if (!block_waits_ok(ok)) return;
  // The split's sliced send may start: it needs only the freed flags and our positions.
  if (release_prefix && tid == 0) store_release(&mine->dispatch_send_ready, request);

  if (given_prefix == nullptr) {
    if (count_experts) {  // each destination's slice of our histogram, before its counts flag
      count_expert_tokens(topk, num_tokens, num_topk, R * experts_per_rank, expert_hist);
      for (int i = tid; i < R * experts_per_rank; i += blockDim.x) {
        v.control(i / experts_per_rank)->expert_counts[me][i % experts_per_rank] = expert_hist[i];
      }
      __syncthreads();  // every thread's writes before the flags (the release below is cumulative)
    }
    if (tid < R) {
      Control* peer = v.control(tid);
      for (int j = 0; j < R; ++j) peer->counts[me][j] = counts[j];
      if (count_experts) peer->expert_counts_epoch[me] = cur;
      store_release(&peer->counts_ready[me], cur);
      ok = wait_at_least(v.watchdog, &mine->counts_ready[tid], cur, me, tid, kWaitDispatchCounts);
    }
    if (!block_waits_ok(ok)) return;
    if (tid < R) {  // column tid of the prefix matrix
      int32_t running = 0;
      for (int i = 0; i < R; ++i) {
        running += *reinterpret_cast<volatile int32_t*>(&mine->counts[i][tid]);
        prefix_out[i * R + tid] = running;
      }
      post_total(tid, running);
    }
  } else if (tid < R) {  // cached dispatch: the handle's prefix matrix has the counts
    post_total(tid, given_prefix[(R - 1) * R + tid]);
  }
  __syncthreads();  // the prefix matrix and the totals are written (the positions since the scan)
  if (release_prefix && tid == 0) store_release(&mine->dispatch_prefix_ready, request);

  if (own_tokens != nullptr) {  // the inverse of our column: only the receive reads it
    for (int t = tid; t < num_tokens; t += blockDim.x) {
      const int64_t at = static_cast<int64_t>(t) * R + me;
      if (in_rank[at]) own_tokens[positions[at]] = t;
    }
  }
  // Only when every source counted this epoch (a rank whose caller did not ask posts none):
  // else -1, and the host leaves no counts. The counts flags made the sources' counts visible.
  if (given_prefix == nullptr && count_experts) {
    bool every_source_counted = true;
    for (int s = 0; s < R; ++s) {
      every_source_counted &= *reinterpret_cast<volatile uint64_t*>(&mine->expert_counts_epoch[s]) == cur;
    }
    for (int e = tid; e < experts_per_rank; e += blockDim.x) {
      int32_t sum = 0;
      for (int s = 0; s < R; ++s) sum += *reinterpret_cast<volatile int32_t*>(&mine->expert_counts[s][e]);
      post_total(R + e, every_source_counted ? sum : -1);
    }
  }
  __syncthreads();
  if (tid == 0) {
    mine->dispatch_epoch = cur;
    if (host != nullptr) {
      // every thread's totals (seen through the barrier) before the stamp
      store_release(&host->sequence, request);
    }
  }
}

// A dispatch that stops after notify (a capacity error seen by every rank alike) still closes
// its epoch: as a sender it reports its send blocks done, as a receiver its rows consumed.
// as_sender false: the send blocks ran already (a split launch: they reported themselves,
// nvl_dispatch_overlap.h). drain_chunks (the split's sliced send, which starts before the totals
// are known): the sources may have flagged rows on our chunk counters; once every source's send
// blocks are in, reset the counters, then free the region.
__global__ void abort_kernel(PeerView v, bool as_sender, bool drain_chunks) {
  const int tid = threadIdx.x, me = v.rank, R = v.num_ranks;
  Control* mine = v.control(me);
  const uint64_t cur = mine->dispatch_epoch;
  if (drain_chunks) {
    const bool ok = tid >= R || wait_at_least(v.watchdog, &mine->dispatch_arrivals[tid], cur * kSendBlocks,
                                              me, tid, kWaitDispatchRows);
    if (!block_waits_ok(ok)) return;
    for (int i = tid; i < R * kMaxDispatchChunks; i += blockDim.x) {
      mine->dispatch_chunk_rows[i / kMaxDispatchChunks][i % kMaxDispatchChunks] = 0;
    }
    __syncthreads();  // every reset before the freed flags (the release below is cumulative)
  }
  if (tid >= R) return;
  if (as_sender) add_release(&v.control(tid)->dispatch_arrivals[me], kSendBlocks);
  store_release(&v.control(tid)->dispatch_freed[me], cur);
}

__global__ void __launch_bounds__(kThreads) send_kernel(PeerView v, DispatchSendArgs a) {
  if (watchdog_tripped(v.watchdog)) return;  // notify gave up: the prefix matrix is not valid
  const int lane = threadIdx.x % 32;
  const SendLane lane_dest = send_lane(v, a, lane);
  const int64_t capacity_rows = v.region_bytes / a.row.bytes();
  for (int t = blockIdx.x * kWarps + threadIdx.x / 32; t < a.num_tokens; t += gridDim.x * kWarps) {
    // capacity_rows cannot be passed after the host's capacity check
    const TokenDest dest = token_dest(v, a, lane_dest, t, capacity_rows, /*skip_self=*/false, lane);
    const uint32_t dests = __ballot_sync(0xffffffffu, dest.row != nullptr);
    if (dests != 0) dispatch_send_token(a, t, dests, dest.row, lane, [] {});
  }
  __syncthreads();
  if (threadIdx.x < v.num_ranks) {
    add_release(&v.control(threadIdx.x)->dispatch_arrivals[v.rank], 1);  // the block's rows first
  }
}

// minBlocks 1: without it ptxas picks 64 registers for this kernel and spills (84 bytes).
__global__ void __launch_bounds__(kThreads, 1) recv_kernel(PeerView v, DispatchRecvArgs a) {
  __shared__ int32_t hist[kMaxLocalExperts];
  const int me = v.rank, R = v.num_ranks, tid = threadIdx.x, lane = tid % 32;
  Control* mine = v.control(me);
  const uint64_t cur = mine->dispatch_epoch;
  for (int i = tid; i < a.experts_per_rank; i += blockDim.x) hist[i] = 0;
  const bool ok = tid >= R || wait_at_least(v.watchdog, &mine->dispatch_arrivals[tid],
                                            cur * kSendBlocks, me, tid, kWaitDispatchRows);
  if (!block_waits_ok(ok)) return;

  const int64_t num_valid = a.prefix[(R - 1) * R + me];
  const int64_t first_expert = static_cast<int64_t>(me) * a.experts_per_rank;
  const int64_t row_bytes = a.row.bytes();
  for (int64_t n = blockIdx.x * kWarps + tid / 32; n < a.num_rows; n += gridDim.x * kWarps) {
    if (n >= num_valid) {
      dispatch_recv_padding(a, n, lane);
      continue;
    }
    const BufferRow</*kConcurrent=*/false> src{v.dispatch_region(me) + n * row_bytes, a.row};
    dispatch_recv_row(a, n, src, first_expert, hist, lane);
  }
  __syncthreads();
  dispatch_flush_hist(a, hist);
  if (a.post_freed) dispatch_recv_block_done(v, cur);
}

// Under CUDA's lazy loading (the default since CUDA 12.2) a kernel is loaded at its first launch,
// and loading may wait for the kernels already running on the device. The split's send part goes
// first and spins until notify runs, so notify's first launch behind it would wait forever (2 x
// H200, session 22: the bench hung on its first exact dispatch). The kernels the host launches
// while the send part may spin are loaded before its first launch, once per device; the
// overlapped kernel itself is loaded by dispatch_overlap_config's occupancy query.
void load_split_kernels(int device) {
  static std::atomic<bool> loaded[64];
  if (loaded[device].load(std::memory_order_acquire)) return;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, notify_kernel));
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, abort_kernel));
  loaded[device].store(true, std::memory_order_release);
}

const uint8_t* bytes_of(const std::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<const uint8_t*>(t->data_ptr()) : nullptr;
}

}  // namespace

bool nvl_dispatch_supported(const at::Tensor& x, const std::optional<at::Tensor>& topk_idx,
                            const PeerView& v) {
  return x.is_cuda() && x.dim() == 2 && (x.size(1) * x.element_size()) % 16 == 0 &&
         v.num_ranks <= kMaxNvlRanks && (!topk_idx.has_value() || topk_idx->dim() == 2);
}

NvlDispatchResult nvl_dispatch(const PeerView& v, const at::Tensor& x_in,
                               const std::optional<at::Tensor>& x_scales,
                               const std::optional<at::Tensor>& topk_idx,
                               const std::optional<at::Tensor>& topk_weights,
                               const at::Tensor& is_token_in_rank, int64_t num_experts,
                               int64_t expert_alignment, int64_t num_worst_tokens,
                               const std::optional<at::Tensor>& given_prefix,
                               const std::optional<at::Tensor>& given_src, bool routing_only,
                               bool host_counts) {
  c10::cuda::CUDAGuard guard(x_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int R = v.num_ranks, me = v.rank;
  auto x = x_in.contiguous();
  auto in_rank = is_token_in_rank.contiguous();
  const int64_t num_tokens = x.size(0), hidden = x.size(1);
  const int num_scales = x_scales.has_value() ? static_cast<int>(x_scales->size(1)) : 0;
  const int num_topk = topk_idx.has_value() ? static_cast<int>(topk_idx->size(1)) : 0;
  const bool has_weights = topk_weights.has_value();
  const RowLayout row = dispatch_row_layout(hidden * x.element_size(), num_scales, num_topk, has_weights);
  const int64_t capacity_rows = v.region_bytes / row.bytes();
  auto int_options = x.options().dtype(at::kInt);
  const int64_t per_rank = num_topk > 0 ? num_experts / R : 0;
  TORCH_CHECK_VALUE(per_rank <= kMaxLocalExperts, "ep_ops.dispatch: at most ", kMaxLocalExperts,
                    " experts per rank on NVLink, got ", per_rank);
  const DispatchOverlapConfig overlap = dispatch_overlap_config();
  const int64_t given_rows = given_src.has_value() ? given_src->size(0) : -1;
  const bool exact = given_rows < 0 && num_worst_tokens == 0;
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  TORCH_CHECK(!exact || !capturing,
              "ep_ops.dispatch: exact mode (num_worst_tokens=0) reads its row count on the host, "
              "which a CUDA graph capture cannot do; capture with num_worst_tokens > 0");

  // Output rows: exact mode reads them from notify's totals below (at most capacity_rows, or it
  // raises after closing its epoch); worst-token mode and cached dispatch know them now and check
  // them before any kernel, so a call that does not fit leaves the buffer in step (it used to
  // raise after notify, whose epoch no receive then closed: the next dispatch timed out).
  int64_t num_rows = given_rows >= 0 ? given_rows : num_worst_tokens;
  TORCH_CHECK_VALUE(exact || num_rows <= capacity_rows, "ep_ops.dispatch: the NVLink buffer holds ",
                    capacity_rows, " rows of ", row.bytes(), " bytes, this call may need ", num_rows,
                    "; num_nvl_bytes must be at least ", kControlBytes + 2 * num_rows * row.bytes());

  // notify
  auto prefix = given_prefix.has_value() ? given_prefix->contiguous()
                                         : at::empty({R, R}, int_options);
  // Exact mode with top-k, when asked: notify also counts the tokens per local expert.
  const bool notify_counts =
      host_counts && exact && num_topk > 0 && !routing_only && per_rank <= kMaxNotifyExperts;
  auto totals = at::empty({R + (notify_counts ? per_rank : 0)}, int_options);
  auto idx = topk_idx.has_value() ? std::optional<at::Tensor>(topk_idx->contiguous()) : std::nullopt;
  auto positions = at::empty({num_tokens, R}, int_options);
  // The overlapped kernel copies our rows to ourselves from x (not through our own buffer): it
  // needs the token of each of those rows. Not with routing_only: dispatch_permuted's copy reads
  // every row from the buffer.
  const bool self_direct = overlap.enabled && !routing_only;
  // The split (below) for exact mode, and for a cached dispatch outside a capture: its notify
  // takes the handle's prefix matrix and exchanges nothing, and its receive part follows at once.
  // Its send part waits until notify sets a control word to the call's request number, which a
  // replayed graph would not renew: a captured cached dispatch runs as one launch without notify
  // instead (the handle has the prefix matrix and, in its recv_src_idx, the token of each of our
  // rows to ourselves; the launch opens its own epoch and each send block writes its tokens'
  // positions: nvl_dispatch_overlap.cu).
  const bool cached = given_src.has_value();
  const bool split = (exact || (cached && !capturing)) && overlap.enabled && self_direct &&
                     env_switch_on("EP_OPS_NVL_EXACT_SPLIT");
  const bool opens_epoch = cached && self_direct && !split;
  auto own_tokens = opens_epoch ? given_src->contiguous()
                                : at::empty({self_direct ? num_tokens : 0}, int_options);
  auto w = has_weights ? std::optional<at::Tensor>(topk_weights->contiguous()) : std::nullopt;
  auto s = x_scales.has_value() ? std::optional<at::Tensor>(x_scales->contiguous()) : std::nullopt;
  // Exact mode reads the totals on the host; the split's send part waits for the request number.
  const TotalsRequest host_totals = exact || split ? next_totals_request(v) : TotalsRequest{nullptr, 0};
  // The split: the send part starts on the side stream beside notify and waits on the device for
  // notify's release (release_prefix), while the host reads the totals in exact mode
  // (nvl_exact_totals.h).
  // The split's send places rows in fixed slices of the receivers' regions, so it starts once
  // notify has seen the freed flags, without the prefix matrix (nvl_dispatch_overlap.cu).
  const bool sliced = split && env_switch_on("EP_OPS_NVL_SLICED");
  ExactSplitSync* sync = exact || split ? &exact_split_sync(x.get_device()) : nullptr;
  if (split) {  // what the send reads was written on our stream before this point
    load_split_kernels(x.get_device());
    C10_CUDA_CHECK(cudaEventRecord(sync->inputs, stream));
    C10_CUDA_CHECK(cudaStreamWaitEvent(sync->side, sync->inputs, 0));
  }
  DispatchSendArgs send{static_cast<const uint8_t*>(x.data_ptr()), bytes_of(s), bytes_of(idx), bytes_of(w),
                in_rank.data_ptr<bool>(), positions.data_ptr<int32_t>(), prefix.data_ptr<int32_t>(),
                static_cast<int>(num_tokens), row, 4LL * num_scales, 8LL * num_topk,
                has_weights ? 4LL * num_topk : 0};

  // The split's send part goes first: its blocks wait on the device for notify anyway, so its
  // launch (~8 us after notify's start when it came second: session 21) leaves the path; exact
  // mode measured level either way (session 22, BENCHMARKS.md). `join` puts the side stream back
  // into ours on every exit from here on.
  if (split) {
    DispatchRecvArgs rows_to_self{};  // all the send part reads of the receive's arguments
    rows_to_self.own_tokens = own_tokens.data_ptr<int32_t>();
    launch_dispatch_overlap(overlap, v, send, rows_to_self, capacity_rows, sync->side, OverlapPart::kSend,
                            totals.data_ptr<int32_t>(), host_totals.request, /*opens_epoch=*/false, sliced);
  }
  const SideStreamJoin join(split ? sync : nullptr, stream);
  if (!opens_epoch) {
    notify_kernel<<<1, kScanThreads, 0, stream>>>(
        v, in_rank.data_ptr<bool>(), static_cast<int>(num_tokens),
        given_prefix.has_value() ? prefix.data_ptr<int32_t>() : nullptr,
        given_prefix.has_value() ? nullptr : prefix.data_ptr<int32_t>(), totals.data_ptr<int32_t>(),
        positions.data_ptr<int32_t>(), self_direct ? own_tokens.data_ptr<int32_t>() : nullptr, notify_counts,
        notify_counts ? idx->data_ptr<int64_t>() : nullptr, num_topk, static_cast<int>(per_rank),
        exact ? host_totals.device : nullptr, host_totals.request, /*release_prefix=*/split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (exact) C10_CUDA_CHECK(cudaEventRecord(sync->notified, stream));
  // Sized without the totals: zeroed before the host's wait, off the path to the receive's launch.
  auto expert_counts = at::zeros({idx.has_value() ? per_rank : 0}, int_options);

  // Exact mode's output rows: the totals (its host wait). Every rank sees every total, so all
  // fail alike.
  NvlDispatchResult out;
  if (exact) {
    const int32_t* t = wait_host_totals(v, host_totals.request, sync->notified, "dispatch");
    int64_t most = 0;
    for (int r = 0; r < R; ++r) most = std::max<int64_t>(most, t[r]);
    if (most > capacity_rows) {
      abort_kernel<<<1, 256, 0, stream>>>(v, /*as_sender=*/!split, /*drain_chunks=*/sliced);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      TORCH_CHECK_VALUE(false, "ep_ops.dispatch: the NVLink buffer is too small: a rank receives ",
                        most, " rows of ", row.bytes(), " bytes; num_nvl_bytes must be at least ",
                        kControlBytes + 2 * most * row.bytes());
    }
    num_rows = t[me];
    if (notify_counts && std::all_of(t + R, t + R + per_rank, [](int32_t c) { return c >= 0; })) {
      out.host_expert_counts.assign(t + R, t + R + per_rank);
      for (auto& c : out.host_expert_counts) c = (c + expert_alignment - 1) / expert_alignment * expert_alignment;
    }
  }

  // recv
  const bool copy_rows = !routing_only;
  out.recv_x = at::empty(copy_rows ? at::IntArrayRef{num_rows, hidden} : at::IntArrayRef{0}, x.options());
  out.recv_x_scales = at::empty(s.has_value() && copy_rows ? at::IntArrayRef{num_rows, num_scales} : at::IntArrayRef{0},
                                x.options().dtype(at::kFloat));
  out.recv_topk_idx = at::empty(idx.has_value() ? at::IntArrayRef{num_rows, num_topk} : at::IntArrayRef{0},
                                x.options().dtype(at::kLong));
  out.recv_topk_weights = at::empty(has_weights ? at::IntArrayRef{num_rows, num_topk} : at::IntArrayRef{0},
                                    x.options().dtype(at::kFloat));
  out.num_recv_tokens_per_expert = expert_counts;
  out.recv_src_idx = at::empty({num_rows}, int_options);
  out.rank_prefix_matrix = prefix;
  DispatchRecvArgs recv{copy_rows ? static_cast<uint8_t*>(out.recv_x.data_ptr()) : nullptr,
                s.has_value() && copy_rows ? out.recv_x_scales.data_ptr<float>() : nullptr,
                idx.has_value() ? out.recv_topk_idx.data_ptr<int64_t>() : nullptr,
                has_weights ? out.recv_topk_weights.data_ptr<float>() : nullptr,
                out.recv_src_idx.data_ptr<int32_t>(),
                out.num_recv_tokens_per_expert.data_ptr<int32_t>(), prefix.data_ptr<int32_t>(),
                num_rows, row, copy_rows ? num_scales : 0, num_topk, static_cast<int>(per_rank),
                /*post_freed=*/copy_rows, self_direct ? own_tokens.data_ptr<int32_t>() : nullptr};
  if (split) {
    launch_dispatch_overlap(overlap, v, send, recv, capacity_rows, stream, OverlapPart::kReceive, nullptr, 0,
                            /*opens_epoch=*/false, sliced);
  } else if (overlap.enabled) {
    launch_dispatch_overlap(overlap, v, send, recv, capacity_rows, stream, OverlapPart::kAll, nullptr, 0,
                            opens_epoch);
  } else {
    send_kernel<<<kSendBlocks, kThreads, 0, stream>>>(v, send);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    recv_kernel<<<kRecvBlocks, kThreads, 0, stream>>>(v, recv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (idx.has_value() && expert_alignment > 1) {
    auto& c = out.num_recv_tokens_per_expert;
    c = (at::floor_divide(c + (expert_alignment - 1), expert_alignment) * expert_alignment)
            .to(at::kInt);
  }
  return out;
}

}  // namespace ep_ops::cuda
