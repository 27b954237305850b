// What the overlapped kernels (dispatch: nvl_dispatch_overlap.cu; combine: nvl_combine_overlap.cu)
// read from the environment and ask of the device. Both run S send blocks and Q receive blocks in
// one launch, and the receive blocks spin on send blocks, so every block must be resident at once.
#pragma once

#include <atomic>

namespace ep_ops::cuda {

// A positive integer (at most 2^20) from the environment, or `fallback` when unset; a bad value
// throws a ValueError naming the variable.
int env_int(const char* name, int fallback);

// A switch that is on unless the environment sets it to "0" (read at every call).
bool env_switch_on(const char* name);

// False when EP_OPS_NVL_OVERLAP=0 (both kernels then run their separate send and receive
// kernels). Read at every call; every rank must see the same value.
inline bool overlap_wanted() { return env_switch_on("EP_OPS_NVL_OVERLAP"); }

// Blocks of `kernel` (launched with `threads` threads, no dynamic shared memory) that the
// current device holds at once. `cache`: one slot per device id below 64 (0: not measured yet).
int resident_blocks(const void* kernel, int threads, std::atomic<int> (&cache)[64]);

}  // namespace ep_ops::cuda
