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
// receive kernels). Every rank must see the same values.
struct DispatchOverlapConfig {
  bool enabled;
  int send_blocks, recv_blocks;
};
DispatchOverlapConfig dispatch_overlap_config();

// Launches the overlapped send + receive on `stream`. capacity_rows: rows of this layout that fit
// a dispatch region (the same on every rank).
void launch_dispatch_overlap(const DispatchOverlapConfig& config, const PeerView& v,
                             const DispatchSendArgs& send, const DispatchRecvArgs& recv,
                             int64_t capacity_rows, cudaStream_t stream);

}  // namespace ep_ops::cuda
