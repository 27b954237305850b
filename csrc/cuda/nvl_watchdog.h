// What the NVLink kernels do when a peer stops answering. Every spin-wait has a deadline (the
// buffer's timeout); the first wait to miss it trips the buffer's watchdog:
//   - a device word in the buffer's own control region (`tripped`), which every later wait on
//     that buffer reads and gives up on at once, so the kernels of this call and of any later
//     call or graph replay stop without touching data instead of hanging or trapping;
//   - a record in pinned host memory mapped into the device (`WaitFailure`), which the host
//     reads without a sync at the start of every op on the buffer (and after exact dispatch's
//     sync) and turns into a Python error naming the rank, the peer and the phase.
// A tripped buffer stays tripped: its counters are out of step with the peers'.
#pragma once

#include <cuda_runtime.h>  // __host__ __device__

#include <cstdint>

namespace ep_ops::cuda {

// What a wait was waiting for.
enum WaitPhase : int32_t {
  kWaitDispatchFreed,
  kWaitDispatchCounts,
  kWaitDispatchRows,
  kWaitCombineFreed,
  kWaitCombineRows,
  kWaitLowLatencyDispatchFreed,
  kWaitLowLatencyDispatchRows,
  kWaitLowLatencyWeightsFreed,
  kWaitLowLatencyWeights,
  kWaitLowLatencyPartialsFreed,
  kWaitLowLatencyPartials,
  kWaitLowLatencyAllFreed,
  kWaitDispatchPrefix,
};

__host__ __device__ inline const char* wait_phase_name(int32_t phase) {
  switch (phase) {
    case kWaitDispatchFreed: return "dispatch: the peer consuming our previous dispatch rows";
    case kWaitDispatchCounts: return "dispatch: the peer's token counts";
    case kWaitDispatchRows: return "dispatch: the peer's rows";
    case kWaitCombineFreed: return "combine: the peer consuming our previous combine rows";
    case kWaitCombineRows: return "combine: the peer's rows";
    case kWaitLowLatencyDispatchFreed: return "low-latency dispatch: the peer reading our previous rows";
    case kWaitLowLatencyDispatchRows: return "low-latency dispatch: the peer's rows";
    case kWaitLowLatencyWeightsFreed: return "low-latency combine: the peer reading our previous weights";
    case kWaitLowLatencyWeights: return "low-latency combine: the peer's top-k weights";
    case kWaitLowLatencyPartialsFreed: return "low-latency combine: the peer reading our previous partial sums";
    case kWaitLowLatencyPartials: return "low-latency combine: the peer's partial sums";
    case kWaitLowLatencyAllFreed: return "low-latency: the peer reading everything we sent (sizes changed)";
    case kWaitDispatchPrefix: return "dispatch: our own notify's prefix matrix (notify did not finish)";
    default: return "an unknown phase";
  }
}

// Written once by the device, read by the host; `failed` is written last.
struct WaitFailure {
  int32_t failed;
  int32_t rank, peer, phase;
  uint64_t target;     // the counter value the wait needed
  uint64_t waited_ns;  // how long it waited
};

// Handed to the kernels inside PeerView.
struct Watchdog {
  uint32_t* tripped;          // device word in the buffer's control region, never cleared
  WaitFailure* record;        // the mapped record, device address
  WaitFailure* host_record;   // the same record, host address
  uint64_t timeout_ns;
};

// Where `tripped` lives in a buffer: the last 64 bytes of its control region, which neither
// control layout uses (both assert it).
constexpr int64_t kTrippedOffsetFromControlEnd = 64;

}  // namespace ep_ops::cuda
