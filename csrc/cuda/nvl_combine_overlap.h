// The overlapped combine kernel (send and receive blocks in one launch); the design is described
// at the top of nvl_combine_overlap.cu, the switches at the top of nvl_combine.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "nvl_buffer.h"
#include "nvl_combine_rows.cuh"

namespace ep_ops::cuda {

// Read at every call, before any kernel of it (a bad value fails before the begin kernel):
// `wanted` false when EP_OPS_NVL_OVERLAP=0. Every rank must see the same values.
struct CombineOverlapConfig {
  bool wanted;
  int send_blocks, recv_blocks;
};
CombineOverlapConfig combine_overlap_config();

// Launches the overlapped send + receive on `stream` and returns true, or returns false with
// nothing launched when the config does not want it or the device cannot hold all its blocks at
// once (the caller then runs the separate kernels). capacity_rows: rows of this layout that fit a
// combine region (the same on every rank). T: __nv_bfloat16, __half or float.
template <typename T>
bool launch_combine_overlap(const CombineOverlapConfig& config, const PeerView& v,
                            const CombineSendArgs& send, const CombineRecvArgs& recv,
                            int64_t capacity_rows, cudaStream_t stream);

}  // namespace ep_ops::cuda
