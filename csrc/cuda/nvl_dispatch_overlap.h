// The overlapped dispatch kernel (send and receive blocks in one launch); the design and the
// switches are described at the top of nvl_dispatch.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "nvl_buffer.h"
#include "nvl_dispatch_rows.cuh"

namespace ep_ops::cuda {

// Which kernel shape this call uses, from the environment (read at every call, before notify so
// a bad value fails before any kernel runs): `enabled` false when EP_OPS_NVL_OVERLAP=0 or when
// the blocks could not all be resident at once (the caller then runs the separate send and
// receive kernels). Every rank must see the same values. The one launch and exact mode's two
// launches (OverlapPart below) split the blocks alike: send_blocks + recv_blocks.
struct DispatchOverlapConfig {
  bool enabled;
  int send_blocks, recv_blocks;
};
DispatchOverlapConfig dispatch_overlap_config();

// Which blocks of the overlapped kernel a launch runs: all of them, or (the split of exact mode
// and of a cached dispatch outside a capture, nvl_exact_totals.h) the send blocks at once on a
// side stream and the receive blocks later on the caller's, once the outputs exist. The receive
// blocks wait only for chunk counters that send blocks fill (and with self_direct, not for our
// own send blocks at all), so the parts need not be resident together; only the split uses kSend
// and kReceive, and it runs with self_direct.
enum class OverlapPart { kAll, kSend, kReceive };

// Launches the overlapped send + receive (or `part` of it) on `stream`. capacity_rows: rows of
// this layout that fit a dispatch region (the same on every rank). totals (device, from notify;
// with part == kSend): every send block skips all its rows when a destination's total is past
// capacity_rows (every rank sees the same totals), so the host can raise with no chunk counter
// left half counted. The send part reads only recv.own_tokens (whether our rows to ourselves
// skip the buffer), which must be the receive part's. prefix_request (part == kSend): the send
// blocks first wait until notify, running beside them, sets Control::dispatch_prefix_ready to it
// (nvl_exact_totals.h); the totals, the prefix matrix and the positions are read after that.
// opens_epoch (a cached dispatch, part == kAll, no notify before it): the launch opens its own
// epoch; each send block writes its tokens' positions into send.positions and waits itself for
// the receivers' freed flags; recv.own_tokens is the handle's recv_src_idx.
// sliced (exact mode's split, both parts alike): each source's rows at a fixed slice of the
// receiver's region; the send part waits for Control::dispatch_send_ready instead (notify's freed
// check and positions), and for the prefix only for rows past its slice (nvl_dispatch_overlap.cu).
void launch_dispatch_overlap(const DispatchOverlapConfig& config, const PeerView& v,
                             const DispatchSendArgs& send, const DispatchRecvArgs& recv,
                             int64_t capacity_rows, cudaStream_t stream,
                             OverlapPart part = OverlapPart::kAll, const int32_t* totals = nullptr,
                             uint64_t prefix_request = 0, bool opens_epoch = false, bool sliced = false);

}  // namespace ep_ops::cuda
