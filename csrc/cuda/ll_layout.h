// The low-latency ops' NVLink buffer (one per group, apart from the normal ops' buffer):
//
//   [0, kControlBytes)   LowLatencyControl: counters kept locally, flags written by peers
//   then, per phase, two alternating slabs of R*M rows (R ranks, M token slots per rank; a
//   token's slot is its index among its rank's tokens):
//     dispatch   row (source rank, token): the token's wire row (csrc/collective/wire_format.h)
//     weights    row (source rank, token): the token's top-k weights, for the expert side
//     partials   row (expert rank, token): that rank's weighted sum over its experts, BF16
//
// Every send writes all M of its rows in a dispatch slab: the row of a token that does not come
// to us, and every row past the sender's token count, carries only a -1 source.
//
// Slab sizes are those of the largest format (BF16), so the offsets depend only on (R, M,
// hidden, top-k), which every rank passes alike. Which slab a call uses is chosen on the host
// (take_ll_slab) and baked into a captured graph; counters per (phase, slab) on the device keep
// senders and receivers in step whatever order calls or graph replays come in. The layout of the
// last send is kept on the device too: a send whose sizes moved the slabs first waits until the
// peers have read everything sent before (decided on the device, so graph replays that
// alternate with calls of other sizes are safe as well).
#pragma once

#include <cstdint>

#include "../collective/wire_format.h"
#include "nvl_buffer.h"

namespace ep_ops::cuda {

enum LowLatencyPhase : int { kLLDispatch = 0, kLLWeights = 1, kLLPartials = 2, kLLPhases = 3 };

// Every counter grows by kLLUnit per send (or read) of a slab: every block of the launch adds its
// share (block_share in ll_common.cuh: 1, and block 0 the rest), so no block waits for the others
// and the grid size is free. A launch's epoch is its counter's value / kLLUnit as it starts
// (begin_launch).
constexpr uint64_t kLLUnit = uint64_t{1} << 20;  // more than any grid

struct LowLatencyControl {
  uint64_t sends[kLLPhases][2];                  // local: our sends into slab p so far (× kLLUnit)
  uint64_t recvs[kLLPhases][2];                  // local: our reads of slab p so far (× kLLUnit)
  uint64_t arrivals[kLLPhases][2][kMaxNvlRanks];  // by source s: its sends into our slab p
  uint64_t freed[kLLPhases][2][kMaxNvlRanks];     // by receiver d: its reads of our rows in slab p
  int64_t layout_key;                            // local: LowLatencyGeometry::key() of the last send
};
static_assert(sizeof(LowLatencyControl) <= kControlBytes - kTrippedOffsetFromControlEnd);

// Host side: where each slab starts.
struct LowLatencyGeometry {
  int64_t rows;          // R * M
  int64_t slab[kLLPhases];  // bytes of one slab of each phase

  LowLatencyGeometry(int64_t num_ranks, int64_t num_max, int64_t hidden,
                                         int64_t num_topk) {
    rows = num_ranks * num_max;
    slab[kLLDispatch] = rows * wire::DispatchRow{hidden, num_topk, false}.bytes();
    slab[kLLWeights] = rows * wire::round_up(4 * num_topk, wire::kRowAlign);
    slab[kLLPartials] = rows * wire::combine_row_bytes(hidden, false);
  }
  int64_t offset(int phase, int which) const {
    int64_t at = kControlBytes;
    for (int p = 0; p < phase; ++p) at += 2 * slab[p];
    return at + which * slab[phase];
  }
  int64_t total_bytes() const { return offset(kLLPhases, 0); }
  // Identifies the offsets: equal keys, equal layouts.
  int64_t key() const { return slab[kLLDispatch] * 1'000'003 + slab[kLLWeights] * 1'009 + slab[kLLPartials]; }
};

__host__ __device__ inline LowLatencyControl* ll_control(uint8_t* base) {
  return reinterpret_cast<LowLatencyControl*>(base);
}

}  // namespace ep_ops::cuda
