// The overlapped dispatch: one launch after notify whose first `S` blocks send and whose other
// `Q` blocks receive, each source's rows copied out chunk by chunk while the senders still write
// (why, and what it costs: the top of nvl_dispatch.cu).
//
// Chunks. The rows source s sends to rank d form one stream in d's region, rows
// [prefix[s-1][d], prefix[s][d]); row j of the stream (the token's position among s's tokens for
// d) is in chunk j / C, with C = max(kWarps, ceil(rows / kMaxDispatchChunks)) for the stream's
// `rows` (the prefix matrix gives its sender and its receiver the same number). C used to grow
// with the buffer instead: with DeepEP's default 1 GB buffer a chunk spanned 68 BF16 rows (131
// FP8), so the receive waited for rows of four or more send blocks, whose progress spreads.
//   sender: a warp writes its token's rows, then per destination one release-add of 1 on
//           Control::dispatch_chunk_rows[s][chunk] of the receiver (posted once the warp's loads
//           of its next token are in flight). Warps take tokens in a grid stride, so each stream
//           fills roughly front to back and its chunks complete in order.
//   receiver: work items, in this order: the worst-token padding, our own stream's chunks when
//           they skip the buffer (nothing to wait for), then chunk k of every stream through the
//           buffer, k by k. A block takes the next item from a counter in our control words
//           (one atomic per item), so a block waiting for a late chunk holds up no other item.
//           For a chunk, the block's thread 0 waits until its counter holds its row count,
//           resets it to 0 (only we touch it until our freed flag lets the source send again),
//           and the block's warps copy the chunk's rows out, a row per warp.
// Why this order, and taken rather than dealt in fixed rounds: the rows of a send wave land
// together at its end (S * kWarps warps write a row each), so the receive cannot finish before
// the last wave's copy; what it can avoid is having our own rows, or a block's fixed share of
// chunks that landed long ago, still to copy then (2 x H200, session 13: the copy after the
// send's end went from 19-27 us to 8-10 for BF16; BENCHMARKS.md).
// Rows a source could not place (past the region, which the host's checks rule out) are neither
// written nor counted nor waited for. The send blocks add kSendBlocks / S to dispatch_arrivals
// each, so that counter stays in step with the separate kernels and a process may switch paths
// between calls (every rank must take the same path within a call).
//
// Exact mode's split with the sliced layout (the default; EP_OPS_NVL_SLICED=0 for the packed
// one): source s's stream to d starts at row s * (capacity / R) of d's region, not after the
// rows of lower sources, so the send part needs only what notify has after its scan and its
// freed check (Control::dispatch_send_ready), not the prefix matrix that waits for every peer's
// counts: the send starts before the ranks have exchanged anything. Its chunk sizes come from
// its own counts (the last token's positions). A stream longer than its slice (uneven streams)
// sends its rows past the slice into the room the other streams leave (sliced_row,
// nvl_rows.cuh), each after waiting for the prefix matrix, or not at all when the totals are
// past the region: those rows' stream may have flagged rows already, so the host's abort resets
// the chunk counters once every source's send is in (abort_kernel, nvl_dispatch.cu).
// A captured cached dispatch's one launch (opens_epoch) runs without notify before it: the handle
// has the prefix matrix and our own rows' tokens. The launch opens its own epoch: every block
// reads Control::dispatch_epoch at its start and works for the next one; each send block writes
// its own tokens' positions (notify's scan, the block's tokens kept) and waits for every
// receiver's freed flag of the previous epoch before its first row; the last block out (a ticket
// count over all S + Q blocks, so every block has read the old epoch) writes the new one.
// Notify's launch, scan over all tokens and freed wait cost ~9 us before the send (2 x H200,
// session 18, BENCHMARKS.md). Outside a capture a cached dispatch now takes exact mode's split
// instead, where notify runs beside the send part, whose launch goes first (nvl_dispatch.cu;
// session 22: 0.7-4.8 us faster than exact mode in most quiet runs, where the one launch was 2-5
// slower).
//
// Co-residency: receive blocks spin on our own send blocks (the stream to ourselves), so every
// block must be resident at once: S + Q must not exceed the blocks the device holds (checked
// here, else the caller falls back). Send blocks have the lowest indices and wait for nothing
// but, in exact mode's split, our own notify, which runs beside them (nvl_exact_totals.h).
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>

#include "nvl_dispatch.h"
#include "nvl_dispatch_overlap.h"
#include "nvl_overlap_config.h"
#include "nvl_positions.cuh"
#include "nvl_recv_done.cuh"
#include "nvl_signals.cuh"

namespace ep_ops::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kSendBlocks = 256;  // the separate send kernel's blocks (nvl_dispatch.cu)
constexpr int kDefaultSendBlocks = 64;
// Tickets per launch on dispatch_launch_exits: at least the most blocks a launch has (S divides
// kSendBlocks, Q <= kDispatchRecvBlocks), so that every block adds at least one.
constexpr int kLaunchExitTickets = kSendBlocks + kDispatchRecvBlocks;

struct ChunkPlan {
  int send_blocks;    // S: blocks [0, S) of the S + Q send
  int recv_blocks;    // Q: blocks [S, S + Q) receive
  int first_block;    // the launch's first block among the S + Q (S for OverlapPart::kReceive)
  int64_t capacity_rows;
  bool self_direct;   // our rows to ourselves skip the buffer (recv.own_tokens is set)
  const int32_t* totals;  // OverlapPart::kSend: notify's per-rank totals (nvl_dispatch_overlap.h)
  uint64_t prefix_request;  // OverlapPart::kSend: the dispatch_prefix_ready value to wait for
  // A cached dispatch's one launch, without notify (the top of this file). A flag, not the
  // positions' nullness: on a rank with no tokens they have no data.
  bool opens_epoch;
  // Exact mode's split with the sliced layout (both parts; sliced_row in nvl_rows.cuh): source
  // s's stream starts at row s * slice_rows of the receiver's region.
  bool sliced;
  int64_t slice_rows;
};

// Exact mode's split send part runs beside notify: it waits for notify's prefix matrix, totals and
// positions (nvl_exact_totals.h). Twice the buffer's timeout, so that notify's waits on the peers
// give up first and name the peer. False: give up (nothing was written).
// With the sliced layout the send part waits only for notify's freed check and positions
// (Control::dispatch_send_ready), and a row past our slice for the prefix (row_past_slice).
__device__ __forceinline__ bool wait_for_prefix(const PeerView& v, const ChunkPlan& p) {
  if (p.prefix_request == 0) return true;
  bool ok = true;
  if (threadIdx.x == 0) {
    Watchdog patient = v.watchdog;
    patient.timeout_ns *= 2;
    Control* mine = v.control(v.rank);
    ok = wait_at_least(patient, p.sliced ? &mine->dispatch_send_ready : &mine->dispatch_prefix_ready,
                       p.prefix_request, v.rank, v.rank, kWaitDispatchPrefix);
  }
  return block_waits_ok(ok);  // thread 0's acquire, then the barrier, before anyone's reads
}

// The sliced send's row `pos` of our stream to `d`, past our slice (uneven streams): it waits
// for notify's prefix matrix and totals (one lane; twice the buffer's timeout, as above), and
// gives null when d's total is past the region (the host raises then) or the wait gave up.
// Out of line, with scalar arguments: rare, and its registers stay out of the send loop.
static __device__ __noinline__ uint8_t* row_past_slice(Control* mine, uint32_t* tripped, WaitFailure* record,
                                                       uint64_t timeout_ns, uint64_t request, const int32_t* prefix,
                                                       const int32_t* totals, int me, int R, int d, int32_t pos,
                                                       int64_t slice_rows, int64_t capacity_rows,
                                                       uint8_t* region, int64_t row_bytes) {
  const Watchdog patient{tripped, record, nullptr, 2 * timeout_ns};
  if (!wait_at_least(patient, &mine->dispatch_prefix_ready, request, me, me, kWaitDispatchPrefix)) return nullptr;
  if (*reinterpret_cast<const volatile int32_t*>(totals + d) > capacity_rows) return nullptr;
  return region + sliced_row(prefix, R, me, d, pos, slice_rows) * row_bytes;
}

// Our tokens for destination `d` (the sliced send, before the prefix matrix): the last token's
// position there plus whether it goes there.
__device__ __forceinline__ int64_t own_rows_to(const DispatchSendArgs& a, int R, int d) {
  if (a.num_tokens == 0) return 0;
  const int64_t at = static_cast<int64_t>(a.num_tokens - 1) * R + d;
  return a.positions[at] + (a.in_rank[at] ? 1 : 0);
}

// Whether a destination receives more rows than fit (a split send, which starts before the
// host's check, then sends nothing).
__device__ __forceinline__ bool totals_overflow(const ChunkPlan& p, int R) {
  bool overflow = false;
  for (int d = 0; p.totals != nullptr && d < R; ++d) overflow |= p.totals[d] > p.capacity_rows;
  return overflow;
}

// Rows per chunk of the stream from source s to rank d (the top of this file).
__device__ __forceinline__ int64_t dispatch_chunk_rows(const int32_t* prefix, int R, int s, int d) {
  return stream_chunk_rows(rows_sent(prefix, R, s, d), kWarps, kMaxDispatchChunks);
}

// Lanes d < R whose bit is set in `rows` flag one row each on d's counter of its chunk (`pos`:
// the row's index in our stream to d, `chunk`: that stream's rows per chunk). The release, after
// the warp barrier, orders every lane's row writes before the flag.
__device__ __forceinline__ void flag_rows(const PeerView& v, const SendLane& s, uint32_t rows, int32_t pos,
                                          int64_t chunk, int lane) {
  __syncwarp();
  if ((rows >> lane) & 1u) {
    Control* receiver = reinterpret_cast<Control*>(s.region - kControlBytes);
    add_release(&receiver->dispatch_chunk_rows[v.rank][pos / chunk], 1);
  }
}

// The positions of send block `block`'s tokens (t / kWarps % S == block: whole groups of 4).
// Out of line, with scalar arguments: the scan's registers stay out of the send loop's
// allocation (inlined, the kernel's spills grew from 148 to 520 bytes).
static __device__ __noinline__ void write_block_positions(const bool* in_rank, int num_tokens, int R,
                                                          int32_t* positions, int send_blocks, int block) {
  token_positions<kThreads>(in_rank, num_tokens, R, positions, nullptr,
                            [&](int64_t t) { return t / kWarps % send_blocks == block; });
}

// A launch that opens its epoch (the top of this file): the send block writes the positions of
// its own tokens, then waits until every receiver has consumed our rows of the previous epoch.
// False: give up (nothing was written).
__device__ __forceinline__ bool open_send(const PeerView& v, const DispatchSendArgs& a, const ChunkPlan& p,
                                          int block, uint64_t epoch) {
  write_block_positions(a.in_rank, a.num_tokens, v.num_ranks, a.positions, p.send_blocks, block);
  const int tid = threadIdx.x;
  const bool ok = tid >= v.num_ranks || wait_at_least(v.watchdog, &v.control(v.rank)->dispatch_freed[tid],
                                                      epoch - 1, v.rank, tid, kWaitDispatchFreed);
  return block_waits_ok(ok);  // the positions and the acquires before any row
}

// A warp takes tokens t = warp, warp + S * kWarps, ...; the next token's destinations are loaded
// while this one is sent, and a token's rows are flagged once the next token's first loads are
// in flight (the release waits for the rows to land: ~1-2 us that the loads now share).
// `epoch`: this dispatch's. False: a wait gave up.
__device__ __forceinline__ bool send_role(const PeerView& v, const DispatchSendArgs& a, const ChunkPlan& p,
                                          int block, uint64_t epoch) {
  if (!wait_for_prefix(v, p)) return false;
  if (p.opens_epoch && !open_send(v, a, p, block, epoch)) return false;
  const int lane = threadIdx.x % 32, stride = p.send_blocks * kWarps, R = v.num_ranks;
  // Sliced: the totals are not known yet (row_past_slice checks them where it matters).
  const int num_tokens = !p.sliced && totals_overflow(p, R) ? 0 : a.num_tokens;
  SendLane lane_dest = send_lane(v, a, lane);
  if (p.sliced) lane_dest.first_row = v.rank * p.slice_rows;
  const int64_t chunk = lane >= R   ? 1
                        : p.sliced ? stream_chunk_rows(own_rows_to(a, R, lane), kWarps, kMaxDispatchChunks)
                                   : dispatch_chunk_rows(a.prefix, R, v.rank, lane);
  // Sliced, our stream's rows past our slice go where the prefix matrix says (row_past_slice).
  const int64_t end_row = p.sliced ? lane_dest.first_row + p.slice_rows : p.capacity_rows;
  const auto dest_of = [&](int token) {
    return token_dest(v, a, lane_dest, token, end_row, p.self_direct, lane, [&](int32_t pos) -> uint8_t* {
      if (!p.sliced) return nullptr;
      return row_past_slice(v.control(v.rank), v.watchdog.tripped, v.watchdog.record, v.watchdog.timeout_ns,
                            p.prefix_request, a.prefix, p.totals, v.rank, R, lane, pos, p.slice_rows,
                            p.capacity_rows, lane_dest.region, a.row.bytes());
    });
  };
  int t = block * kWarps + threadIdx.x / 32;
  TokenDest next = dest_of(t);
  uint32_t pending = 0;  // the previous token's rows, not flagged yet
  int32_t pending_pos = 0;
  for (; t < num_tokens; t += stride) {
    const TokenDest cur = next;
    next = dest_of(t + stride);
    const uint32_t dests = __ballot_sync(0xffffffffu, cur.row != nullptr);
    if (dests == 0) continue;
    dispatch_send_token(a, t, dests, cur.row, lane, [&] {
      flag_rows(v, lane_dest, pending, pending_pos, chunk, lane);
    });
    pending = dests;
    pending_pos = cur.pos;
  }
  flag_rows(v, lane_dest, pending, pending_pos, chunk, lane);
  __syncthreads();
  if (threadIdx.x < v.num_ranks) {
    add_release(&v.control(threadIdx.x)->dispatch_arrivals[v.rank], kSendBlocks / p.send_blocks);
  }
  return true;
}

// Source s's stream in our region: where it starts, how many of its rows fit, its rows per chunk.
struct Stream {
  int64_t base, rows, chunk;
};
__device__ __forceinline__ Stream stream_of(const DispatchRecvArgs& a, const ChunkPlan& p, int R, int me, int s) {
  const int64_t base = rows_before(a.prefix, R, s, me);
  return {base, rows_that_fit(base, rows_sent(a.prefix, R, s, me), p.capacity_rows),
          dispatch_chunk_rows(a.prefix, R, s, me)};
}

// The receive's work items in the order blocks take them (the top of this file).
struct RecvItems {
  int64_t num_valid;    // rows received; the outputs' rows past them are worst-token padding
  int64_t pad_chunks;   // padding rows, kWarps per item
  int64_t own_chunks;   // our own stream's chunks when they skip the buffer, else 0
  int64_t most_chunks;  // chunks of the longest stream through the buffer
  int buffered;         // streams through the buffer: R - 1 with self_direct, else R
  __device__ __forceinline__ int64_t count() const { return pad_chunks + own_chunks + most_chunks * buffered; }
  // The source of the i-th buffered stream.
  __device__ __forceinline__ int source(int i, int me, bool self_direct) const {
    return self_direct && i >= me ? i + 1 : i;
  }
};

__device__ __forceinline__ RecvItems recv_items(const DispatchRecvArgs& a, const ChunkPlan& p, int R, int me) {
  const int64_t num_valid = a.prefix[(R - 1) * R + me];
  RecvItems w{num_valid, (max(int64_t{0}, a.num_rows - num_valid) + kWarps - 1) / kWarps, 0, 0,
              p.self_direct ? R - 1 : R};
  for (int s = 0; s < R; ++s) {
    const Stream st = stream_of(a, p, R, me, s);
    const int64_t chunks = (st.rows + st.chunk - 1) / st.chunk;
    if (p.self_direct && s == me) {
      w.own_chunks = chunks;
    } else {
      w.most_chunks = max(w.most_chunks, chunks);
    }
  }
  return w;
}

// The token of our own stream's row n (output row; `base`: the stream's first): own_tokens is
// indexed by position in the stream, or in a launch that opens its epoch (the handle's
// recv_src_idx) by output row. A handle's token out of range (not from this dispatch) gives -1,
// read as a padding row rather than out of bounds.
__device__ __forceinline__ int own_token(const DispatchRecvArgs& a, const DispatchSendArgs& in,
                                         const ChunkPlan& p, int64_t n, int64_t base) {
  const int t = a.own_tokens[p.opens_epoch ? n : n - base];
  return t >= 0 && t < in.num_tokens ? t : -1;
}

// Receive block q of Q takes work items until none is left, then posts its share of the freed
// tickets; the last block out resets the item counter. `cur`: this dispatch's epoch. False: a
// wait gave up.
__device__ __forceinline__ bool recv_role(const PeerView& v, const DispatchRecvArgs& a,
                                          const DispatchSendArgs& in, const ChunkPlan& p,
                                          int32_t* hist, int64_t (&taken)[2], int q, uint64_t cur) {
  const int me = v.rank, R = v.num_ranks, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  Control* mine = v.control(me);
  for (int i = tid; i < a.experts_per_rank; i += blockDim.x) hist[i] = 0;
  __syncthreads();

  const RecvItems work = recv_items(a, p, R, me);
  const int64_t items = work.count();
  const int64_t first_expert = static_cast<int64_t>(me) * a.experts_per_rank;
  const int64_t row_bytes = a.row.bytes();
  const uint8_t* region = v.dispatch_region(me);
  // Two slots for the taken item: thread 0 writes the next one while slow warps may still read
  // this one; the barrier of the next turn separates a slot's reuse from its last read.
  for (int turn = 0; items > 0; ++turn) {
    if (tid == 0) taken[turn & 1] = static_cast<int64_t>(atomicAdd(
                      reinterpret_cast<unsigned long long*>(&mine->dispatch_recv_next), 1ull));
    __syncthreads();
    int64_t g = taken[turn & 1];
    if (g >= items) break;  // block-uniform
    if (g < work.pad_chunks) {  // worst-token padding: nothing to wait for
      const int64_t n = work.num_valid + g * kWarps + warp;
      if (n < a.num_rows) dispatch_recv_padding(a, n, lane);
      continue;
    }
    g -= work.pad_chunks;
    if (g < work.own_chunks) {  // from the send inputs: nothing to wait for
      const Stream own = stream_of(a, p, R, me, me);
      const int64_t lo = g * own.chunk, hi = min(own.rows, lo + own.chunk);
      for (int64_t n = own.base + lo + warp; n < own.base + hi && n < a.num_rows; n += kWarps) {
        const int t = own_token(a, in, p, n, own.base);
        if (t < 0) {
          dispatch_recv_padding(a, n, lane);
        } else {
          dispatch_recv_row(a, n, TokenRow{in, t}, first_expert, hist, lane);
        }
      }
      continue;
    }
    g -= work.own_chunks;
    const int64_t k = g / work.buffered;
    const int s = work.source(static_cast<int>(g % work.buffered), me, p.self_direct);
    const Stream st = stream_of(a, p, R, me, s);
    const int64_t lo = k * st.chunk, hi = min(st.rows, lo + st.chunk);
    if (lo >= hi) continue;  // block-uniform
    bool ok = true;
    if (tid == 0) {
      uint64_t* counter = &mine->dispatch_chunk_rows[s][k];
      ok = wait_at_least(v.watchdog, counter, static_cast<uint64_t>(hi - lo), me, s, kWaitDispatchRows);
      if (ok) *reinterpret_cast<volatile uint64_t*>(counter) = 0;  // complete: ready for the next epoch
    }
    if (!block_waits_ok(ok)) return false;  // thread 0's acquire, then the barrier, before the reads
    for (int64_t n = st.base + lo + warp; n < st.base + hi && n < a.num_rows; n += kWarps) {
      const int64_t in_region = p.sliced ? sliced_row(a.prefix, R, s, me, n - st.base, p.slice_rows) : n;
      const BufferRow</*kConcurrent=*/true> src{region + in_region * row_bytes, a.row};
      dispatch_recv_row(a, n, src, first_expert, hist, lane);
    }
  }
  __syncthreads();
  dispatch_flush_hist(a, hist);
  const uint64_t tickets = tickets_for_block(q, p.recv_blocks);
  if (a.post_freed) dispatch_recv_block_done(v, cur, tickets);
  if (tid == 0 && last_block_done(&mine->dispatch_recv_exits, tickets, kDispatchRecvBlocks)) {
    mine->dispatch_recv_next = 0;  // every take of this launch is done: the next launch starts at 0
  }
  return true;
}

// A launch that opens its epoch: the last of its blocks out writes it (after every block's read
// of the old one, at its start).
__device__ __forceinline__ void close_epoch(const PeerView& v, const ChunkPlan& p, int block, uint64_t epoch) {
  __syncthreads();
  const uint64_t tickets = tickets_for_block(block, p.send_blocks + p.recv_blocks, kLaunchExitTickets);
  Control* mine = v.control(v.rank);
  if (threadIdx.x == 0 && last_block_done(&mine->dispatch_launch_exits, tickets, kLaunchExitTickets)) {
    mine->dispatch_epoch = epoch;
  }
}

__global__ void __launch_bounds__(kThreads, 1) dispatch_overlap_kernel(PeerView v, DispatchSendArgs send,
                                                                        DispatchRecvArgs recv, ChunkPlan plan) {
  __shared__ int32_t hist[kMaxLocalExperts];
  __shared__ int64_t taken[2];
  if (watchdog_tripped(v.watchdog)) return;  // notify gave up: the prefix matrix is not valid
  const int block = plan.first_block + static_cast<int>(blockIdx.x);
  // This dispatch's epoch: notify's, or the next one when the launch opens it. The split's send
  // part, launched before notify, may read the previous one here: only a launch that opens its
  // epoch sends with it; the receive part, behind notify on its stream, reads notify's.
  const uint64_t epoch = v.control(v.rank)->dispatch_epoch + (plan.opens_epoch ? 1 : 0);
  const bool done = block < plan.send_blocks
                        ? send_role(v, send, plan, block, epoch)
                        : recv_role(v, recv, send, plan, hist, taken, block - plan.send_blocks, epoch);
  if (done && plan.opens_epoch) close_epoch(v, plan, block, epoch);
}

}  // namespace

// The receive blocks default to every block the device holds beside the send blocks (68 on a
// 132-SM H100/H200): 2 x H200, session 11, 32 + 100 against 32 + 64 blocks in the same call:
// dispatch BF16 244.5 / 244.5 us against 246.8 / 247.4, cached dispatch 228.8 / 228.2 against
// 237.0 (BENCHMARKS.md). Fewer leave SMs to concurrent work: EP_OPS_NVL_RECV_BLOCKS.
// Send blocks: 64, both shapes (64 + 68 on a 132-SM H200). 2 x H200, python3 -m ep_ops.bench:
// session 12, exact mode's split with 64 + 68: dispatch FP8 159.8 / 160.1 us against 177.6 /
// 173.3 with 32 + 100, BF16 level; session 13, once the receive took its chunks own rows first,
// the one launch with 64 + 68: cached dispatch 219.3-221.1 us in four runs against 229.0-230.9
// with 32 + 100 (session 12, before that change, 64 + 68 had been the slower: 242 against 232).
// A receive part larger than the free SMs waits for the send's SMs: 64 + 100 took FP8 164.5,
// 128 + 100 178.5 (session 12, with fixed shares of the chunks). With blocks taking items
// (session 13), neither 64 more receive blocks joining the split's receive part as the send
// part's SMs free up, nor the one launch's send blocks receiving once done, was faster: the last
// wave's chunks are already taken by then.
DispatchOverlapConfig dispatch_overlap_config() {
  static std::atomic<int> resident[64];
  const int blocks = resident_blocks(reinterpret_cast<const void*>(dispatch_overlap_kernel), kThreads, resident);
  const int send = env_int("EP_OPS_NVL_SEND_BLOCKS", kDefaultSendBlocks);
  TORCH_CHECK_VALUE(kSendBlocks % send == 0, "ep_ops: EP_OPS_NVL_SEND_BLOCKS must divide ", kSendBlocks,
                    ", got ", send);
  const int recv = env_int("EP_OPS_NVL_RECV_BLOCKS", std::clamp(blocks - send, 1, kDispatchRecvBlocks));
  TORCH_CHECK_VALUE(recv <= kDispatchRecvBlocks, "ep_ops: EP_OPS_NVL_RECV_BLOCKS must be at most ",
                    kDispatchRecvBlocks, ", got ", recv);
  return {overlap_wanted() && send + recv <= blocks, send, recv};
}

void launch_dispatch_overlap(const DispatchOverlapConfig& config, const PeerView& v,
                             const DispatchSendArgs& send, const DispatchRecvArgs& recv,
                             int64_t capacity_rows, cudaStream_t stream, OverlapPart part,
                             const int32_t* totals, uint64_t prefix_request, bool opens_epoch, bool sliced) {
  const int S = config.send_blocks, Q = config.recv_blocks;
  TORCH_CHECK(!opens_epoch || part == OverlapPart::kAll, "ep_ops: only a whole dispatch launch opens its epoch");
  // The split runs with our rows to ourselves skipping the buffer, which the sliced layout
  // assumes (sliced_row); own_tokens cannot tell here: on a rank with no tokens it has no data.
  TORCH_CHECK(!sliced || part != OverlapPart::kAll, "ep_ops: only the split uses the sliced layout");
  const ChunkPlan plan{S, Q, part == OverlapPart::kReceive ? S : 0, capacity_rows,
                       /*self_direct=*/recv.own_tokens != nullptr, part == OverlapPart::kSend ? totals : nullptr,
                       part == OverlapPart::kSend ? prefix_request : 0, opens_epoch, sliced,
                       capacity_rows / v.num_ranks};
  const int blocks = part == OverlapPart::kSend ? S : part == OverlapPart::kReceive ? Q : S + Q;
  dispatch_overlap_kernel<<<blocks, kThreads, 0, stream>>>(v, send, recv, plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ep_ops::cuda
