// The overlapped combine: one launch whose first `S` blocks send our received rows back to their
// source ranks and whose other `Q` blocks sum our tokens as their rows land, while the senders
// still write (the separate receive kernel starts only after every destination's send kernel
// ended: 170 + 60 us in series on the reference workload, BENCHMARKS.md session 8).
//
// It also does the separate shape's begin kernel (6 us plus a launch): each send block waits for
// the freed flags of the previous combine itself, each receive block scans is_token_in_rank and
// writes the positions of the tokens it sums, and the last block to end (a ticket over all S + Q
// blocks) advances combine_epoch, which every block read at its start.
//
// Streams and chunks. The rows rank d sends back to source s form one stream in s's combine
// region, rows [combine_stream_start(s, d), + rows_sent(s, d)); row j of it (the token's position
// among s's tokens for d) is in chunk j / C, with C = max(kWarps, ceil(rows / kMaxCombineChunks))
// computed from the stream's length, which both ends read from the prefix matrix.
//   sender: warps take (row j, stream) pairs j-major, so that every stream fills front to back at
//           the same time; a warp writes its row, then (once its next row's loads are in flight,
//           so that the release's wait overlaps them) lane 0 release-adds 1 to the source's
//           Control::combine_chunk_rows[us][j / C].
//   receiver: warps take our tokens in a grid stride (ascending, as the streams fill). Lane d
//           waits until the chunk holding the token's row from rank d is complete (rows of our
//           own that stay in x need no wait), then the warp sums the token exactly as the separate
//           receive does (same order, same bits). The last block to finish resets the counters
//           to 0 and posts the freed flags; no peer adds to them again before it sees freed.
// The send blocks add their shares of kCombineSendBlocks to combine_arrivals and the receive
// blocks kCombineRecvBlocks tickets in all, so both counters stay in step with the separate
// kernels and a process may switch shapes between calls (every rank must take the same shape
// within a call).
//
// Co-residency: receive blocks spin on the peers' send blocks (and on our own in
// combine_permuted, whose rows to ourselves go through our buffer), so every block must be
// resident at once: S + Q must not exceed what the device holds (checked at launch, else the
// caller runs the separate kernels). Send blocks have the lowest indices and wait only for the
// previous call's freed flags.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>

#include "nvl_combine_overlap.h"
#include "nvl_overlap_config.h"
#include "nvl_positions.cuh"
#include "nvl_recv_done.cuh"
#include "nvl_signals.cuh"

namespace ep_ops::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kDefaultSendBlocks = 64;
constexpr int kDefaultRecvBlocks = 64;
// End tickets per call on Control::combine_end_tickets: at least the largest grid (256 + 256), so
// that every block takes one.
constexpr int kCombineEndTickets = 512;

struct Plan {
  int send_blocks;        // S: blockIdx.x < S send
  int64_t capacity_rows;  // rows of this layout that fit a combine region
};

__device__ __forceinline__ int64_t chunk_rows(int64_t stream_rows) {
  return stream_chunk_rows(stream_rows, kWarps, kMaxCombineChunks);
}

// The row a warp wrote and has not counted yet.
struct PendingRow {
  int source = -1;  // none
  int64_t chunk = 0;
};

// Counts the pending row on its source's chunk counter. Every lane calls it: the warp barrier
// orders every lane's row writes before lane 0's release add.
__device__ __forceinline__ void count_row(const PeerView& v, const PendingRow& row, int lane) {
  __syncwarp();
  if (row.source >= 0 && lane == 0) {
    Control* source = reinterpret_cast<Control*>(peer_base(v, row.source));
    add_release(&source->combine_chunk_rows[v.rank][row.chunk], 1);
  }
}

// Returns false when a wait gave up (nothing was written).
template <typename T>
__device__ __forceinline__ bool send_role(const PeerView& v, const CombineSendArgs& a,
                                          const Plan& p, uint64_t epoch) {
  __shared__ int64_t first[kMaxNvlRanks], start[kMaxNvlRanks], count[kMaxNvlRanks],
      chunk[kMaxNvlRanks];
  __shared__ int sources[kMaxNvlRanks];
  const int me = v.rank, R = v.num_ranks, lane = threadIdx.x % 32;
  if (threadIdx.x < R) {
    const int s = threadIdx.x;
    first[s] = rows_before(a.prefix, R, s, me);  // our received rows from s start here in x
    start[s] = combine_stream_start(a.prefix, R, s, me);  // and go back to here in s's region
    count[s] = rows_that_fit(start[s], rows_sent(a.prefix, R, s, me), p.capacity_rows);
    chunk[s] = chunk_rows(rows_sent(a.prefix, R, s, me));  // as the source computes it
  }
  // Every source consumed the rows of our previous combine in its region.
  const bool ok = threadIdx.x >= R || wait_at_least(v.watchdog, &v.control(me)->combine_freed[threadIdx.x],
                                                    epoch - 1, me, threadIdx.x, kWaitCombineFreed);
  // The streams this kernel writes: every source's, but our own with self_direct (it stays in x).
  int num_streams = 0;
  for (int s = 0; s < R; ++s) {
    if (a.self_direct && s == me) continue;
    if (threadIdx.x == 0) sources[num_streams] = s;
    ++num_streams;
  }
  if (!block_waits_ok(ok)) return false;
  int64_t longest = 0;
  for (int i = 0; i < num_streams; ++i) longest = max(longest, count[sources[i]]);
  PendingRow pending;
  for (int64_t g = blockIdx.x * kWarps + threadIdx.x / 32; g < longest * num_streams;
       g += p.send_blocks * kWarps) {
    const int64_t j = g / num_streams;
    const int s = sources[g % num_streams];
    if (j >= count[s]) continue;  // warp-uniform
    uint8_t* dst = peer_base(v, s) + kControlBytes + v.region_bytes + (start[s] + j) * a.row_bytes;
    combine_send_row<T, kSendStage>(a, first[s] + j, dst, lane,
                                    [&] { count_row(v, pending, lane); });
    pending = {s, j / chunk[s]};
  }
  count_row(v, pending, lane);
  __syncthreads();
  if (threadIdx.x < R) {
    // This block's share of kCombineSendBlocks (the separate send kernel's count of blocks).
    add_release(&v.control(threadIdx.x)->combine_arrivals[me],
                tickets_for_block(blockIdx.x, p.send_blocks, kCombineSendBlocks));
  }
  return true;
}

// Writes the positions of the tokens receive block q of num_q sums (recv_role's loop: token t is
// block q's when (t / kWarps) % num_q == q). The whole scan is a few KB of reads, done while the
// first chunks cross. Out of line: inlined, its registers add spills to the receive's loop.
__device__ __noinline__ void block_positions(const bool* in_rank, int num_tokens, int R,
                                             int32_t* positions, int q, int num_q) {
  token_positions<kThreads>(in_rank, num_tokens, R, positions, nullptr,
                            [=](int64_t t) { return (t / kWarps) % num_q == q; });
}

// Returns false when a wait gave up.
template <typename T, int kMaxRanks>
__device__ __forceinline__ bool recv_role(const PeerView& v, const CombineRecvArgs& a,
                                          const Plan& p, uint64_t epoch) {
  const int me = v.rank, R = v.num_ranks, tid = threadIdx.x, lane = tid % 32;
  const int q = blockIdx.x - p.send_blocks, num_q = gridDim.x - p.send_blocks;
  Control* mine = v.control(me);
  block_positions(a.in_rank, a.num_tokens, R, a.positions, q, num_q);
  const CombinePlaces places = combine_places(v, a);
  // Lane d < R: the stream from rank d, unless its rows stay in x (ours, self_direct).
  const bool buffered = lane < R && !(a.x != nullptr && lane == me);
  const int64_t stream_rows =
      buffered
          ? rows_that_fit(places.block[lane], rows_sent(a.prefix, R, me, lane), p.capacity_rows)
          : 0;
  const int64_t C = chunk_rows(buffered ? rows_sent(a.prefix, R, me, lane) : 0);
  int64_t complete = -1;  // the last chunk of the stream this lane saw complete
  bool ok = true;
  for (int t = q * kWarps + tid / 32; t < a.num_tokens; t += num_q * kWarps) {
    bool lane_ok = true;
    if (buffered && a.in_rank[static_cast<int64_t>(t) * R + lane]) {
      const int64_t row = a.positions[static_cast<int64_t>(t) * R + lane];
      const int64_t k = row / C;
      if (row < stream_rows && k != complete) {
        const uint64_t want = static_cast<uint64_t>(min(C, stream_rows - k * C));
        lane_ok = wait_at_least(v.watchdog, &mine->combine_chunk_rows[lane][k], want, me, lane,
                                kWaitCombineRows);
        complete = k;
      }
    }
    ok = __all_sync(0xffffffffu, lane_ok);
    if (!ok) break;  // warp-uniform
    __syncwarp();    // the lanes' acquires before every lane's reads of the rows
    combine_recv_token<T, kMaxRanks, /*kConcurrent=*/true>(a, places, me, R, t, lane);
  }
  if (!block_waits_ok(ok)) return false;
  const uint64_t tickets = tickets_for_block(q, num_q, kCombineRecvBlocks);
  if (tid == 0 && last_block_done(&mine->combine_recv_tickets, tickets, kCombineRecvBlocks)) {
    // Every row of every stream was read: reset the counters, then free the region.
    for (int d = 0; d < R; ++d) {
      for (int k = 0; k < kMaxCombineChunks; ++k) mine->combine_chunk_rows[d][k] = 0;
    }
    for (int d = 0; d < R; ++d) store_release(&v.control(d)->combine_freed[me], epoch);
  }
  return true;
}

template <typename T, int kMaxRanks>
__global__ void __launch_bounds__(kThreads, 1)
    combine_overlap_kernel(PeerView v, CombineSendArgs send, CombineRecvArgs recv, Plan plan) {
  if (watchdog_tripped(v.watchdog)) return;  // a wait gave up: the peers may still read our rows
  Control* mine = v.control(v.rank);
  const uint64_t epoch = mine->combine_epoch + 1;  // this call's
  const bool done = blockIdx.x < plan.send_blocks ? send_role<T>(v, send, plan, epoch)
                                                  : recv_role<T, kMaxRanks>(v, recv, plan, epoch);
  if (!done) return;
  __syncthreads();  // every thread of the block read the epoch
  const uint64_t tickets = tickets_for_block(blockIdx.x, gridDim.x, kCombineEndTickets);
  if (threadIdx.x == 0 && last_block_done(&mine->combine_end_tickets, tickets, kCombineEndTickets)) {
    mine->combine_epoch = epoch;  // every block has read the old value; the next call reads this
  }
}

}  // namespace

CombineOverlapConfig combine_overlap_config() {
  const int send_blocks = env_int("EP_OPS_NVL_COMBINE_SEND_BLOCKS", kDefaultSendBlocks);
  const int recv_blocks = env_int("EP_OPS_NVL_COMBINE_RECV_BLOCKS", kDefaultRecvBlocks);
  TORCH_CHECK_VALUE(send_blocks <= kCombineSendBlocks,
                    "ep_ops: EP_OPS_NVL_COMBINE_SEND_BLOCKS must be at most ", kCombineSendBlocks,
                    ", got ", send_blocks);
  TORCH_CHECK_VALUE(recv_blocks <= kCombineRecvBlocks,
                    "ep_ops: EP_OPS_NVL_COMBINE_RECV_BLOCKS must be at most ", kCombineRecvBlocks,
                    ", got ", recv_blocks);
  return {overlap_wanted(), send_blocks, recv_blocks};
}

template <typename T>
bool launch_combine_overlap(const CombineOverlapConfig& config, const PeerView& v,
                            const CombineSendArgs& send, const CombineRecvArgs& recv,
                            int64_t capacity_rows, cudaStream_t stream) {
  if (!config.wanted) return false;
  const int blocks = config.send_blocks + config.recv_blocks;
  const Plan plan{config.send_blocks, capacity_rows};
  static std::atomic<int> resident_small[64], resident_large[64];
  if (v.num_ranks <= 2) {
    auto* kernel = combine_overlap_kernel<T, 2>;
    if (blocks > resident_blocks(reinterpret_cast<const void*>(kernel), kThreads, resident_small))
      return false;
    kernel<<<blocks, kThreads, 0, stream>>>(v, send, recv, plan);
  } else {
    auto* kernel = combine_overlap_kernel<T, kMaxNvlRanks>;
    if (blocks > resident_blocks(reinterpret_cast<const void*>(kernel), kThreads, resident_large))
      return false;
    kernel<<<blocks, kThreads, 0, stream>>>(v, send, recv, plan);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template bool launch_combine_overlap<__nv_bfloat16>(const CombineOverlapConfig&, const PeerView&,
                                                    const CombineSendArgs&, const CombineRecvArgs&,
                                                    int64_t, cudaStream_t);
template bool launch_combine_overlap<__half>(const CombineOverlapConfig&, const PeerView&,
                                             const CombineSendArgs&, const CombineRecvArgs&,
                                             int64_t, cudaStream_t);
template bool launch_combine_overlap<float>(const CombineOverlapConfig&, const PeerView&,
                                            const CombineSendArgs&, const CombineRecvArgs&, int64_t,
                                            cudaStream_t);

}  // namespace ep_ops::cuda
