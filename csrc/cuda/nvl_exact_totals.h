// What exact-mode dispatch (num_worst_tokens = 0, no handle) does between notify and the send.
// Its output sizes are the totals notify computes, so the host must read them before it can
// allocate the outputs; the GPU used to idle from notify's end until the host had copied them
// (totals.cpu(): a device-to-host copy, a stream sync, its wake-up), allocated and launched the
// send. Two things shorten that (2 x H200, reference workload, BENCHMARKS.md session 11: dispatch
// BF16 247 us against 264 before, 260 with the mapped totals alone; FP8 170 against 196, 193):
//   - Mapped totals: notify also writes the totals into the buffer's pinned host area
//     (nvl_buffer.h, HostTotals) and then stamps it with a request number; the host spins on
//     the stamp (wait_host_totals) instead of copying a device tensor.
//   - Split launch: the send blocks of the overlapped kernel start on a side stream beside
//     notify, without waiting for the host; the receive blocks follow on the caller's stream
//     once the host has allocated the outputs, and the caller's stream then waits for the side
//     stream (SideStreamJoin). The send needs nothing the host computes; it skips every row when
//     a destination's total is past the buffer, so the host can still raise cleanly.
//     The send blocks wait on the device for notify's prefix matrix (Control::
//     dispatch_prefix_ready, set to this call's request number), not for notify's end through an
//     event: the stream hop and the launch after notify leave the send's path, and so does what
//     notify does after the prefix (the inverse of our column, the sums of the per-expert
//     counts, the host's stamp). 2 x H200, session 14, bench alternating with the event-ordered
//     launch in a quiet call: dispatch BF16 226.9-230.0 us against 232.4-233.3, FP8 151.9-153.7
//     against 155.1-157.2 (BENCHMARKS.md). Their wait's timeout is twice the buffer's, so that
//     notify's own waits on the peers trip the watchdog first and name the peer.
//     With the sliced layout (the default) the send blocks wait for less: notify's freed check
//     and positions (Control::dispatch_send_ready), before it posts or waits for any count, so
//     the exchange with the peers (and Buffer.dispatch's per-expert histogram) runs beside the
//     send too (nvl_dispatch_overlap.cu).
// The send part's launch goes before notify's (its blocks wait for notify on the device anyway),
// so notify's kernels are loaded before its first launch (load_split_kernels, nvl_dispatch.cu).
// A cached dispatch outside a capture runs the same split without the host read: notify takes
// the handle's prefix matrix and the receive part follows at once (session 22, BENCHMARKS.md).
// EP_OPS_NVL_EXACT_SPLIT=0 (read at every call; set it alike on every rank) launches the whole
// overlapped kernel after the host's read instead (a cached dispatch: its one launch), for A/B;
// EP_OPS_NVL_SLICED=0 keeps the split with the packed layout, whose send waits for the prefix
// matrix.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "nvl_buffer.h"

namespace ep_ops::cuda {

// The request number the next notify stamps, and where it writes (device address of the area).
struct TotalsRequest {
  HostTotals* device;  // notify's destination
  uint64_t request;
};
TotalsRequest next_totals_request(const PeerView& v);

// Spins until notify stamped `request` and returns the totals (host memory: R per-rank totals,
// then the per-expert counts when notify counted them). `notified` is recorded right after
// notify: when it completes without the stamp (notify gave up on a peer), raises the watchdog's
// error; a CUDA error on the stream is raised too. Returns or raises once notify has ended.
const int32_t* wait_host_totals(const PeerView& v, uint64_t request, cudaEvent_t notified, const char* op);

// The side stream and the events of a split launch on `device` (the current device), made once
// per host thread and device and never freed (destroying them at exit could outlive the driver):
// `inputs` recorded on the caller's stream before notify (the side stream waits for it),
// `notified` after notify (wait_host_totals), `sent` on the side stream after the send part.
struct ExactSplitSync {
  cudaStream_t side;
  cudaEvent_t inputs, notified, sent;
};
ExactSplitSync& exact_split_sync(int device);

// Joins the side stream back into `stream` when it goes out of scope (also when the host raises
// after the send part was launched), so nothing later on `stream` can reuse what the send reads.
class SideStreamJoin {
 public:
  SideStreamJoin(const ExactSplitSync* sync, cudaStream_t stream) : sync_(sync), stream_(stream) {}
  SideStreamJoin(const SideStreamJoin&) = delete;
  SideStreamJoin& operator=(const SideStreamJoin&) = delete;
  ~SideStreamJoin();

 private:
  const ExactSplitSync* sync_;  // null: nothing to join
  cudaStream_t stream_;
};

}  // namespace ep_ops::cuda
