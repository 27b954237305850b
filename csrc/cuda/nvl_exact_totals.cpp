#include "nvl_exact_totals.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace ep_ops::cuda {

TotalsRequest next_totals_request(const PeerView& v) {
  HostTotals* host = host_totals_of(v.watchdog.host_record);
  return {host_totals_of(v.watchdog.record), ++host->last_request};
}

const int32_t* wait_host_totals(const PeerView& v, uint64_t request, cudaEvent_t notified, const char* op) {
  const HostTotals* host = host_totals_of(v.watchdog.host_record);
  const auto stamped = [&] {
    if (*reinterpret_cast<const volatile uint64_t*>(&host->sequence) != request) return false;
    std::atomic_thread_fence(std::memory_order_acquire);  // the totals were written before the stamp
    return true;
  };
  // Tight polls first (notify usually ends within tens of microseconds), then yield the core.
  // The event is asked only now and then: a query costs about a microsecond.
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t polls = 1;; ++polls) {
    if (stamped()) return host->totals;
    if (polls % 64 != 0) continue;
    const cudaError_t state = cudaEventQuery(notified);
    if (state == cudaSuccess) {
      if (stamped()) return host->totals;  // a finished kernel's mapped writes are visible
      check_watchdog(v, op);  // notify gave up on a peer: raises, naming it
      TORCH_CHECK(false, "ep_ops.", op, ": notify ended without posting its totals (request ", request, ")");
    }
    if (state != cudaErrorNotReady) C10_CUDA_CHECK(state);
    // Not ready is not an error, but the runtime may keep it as the thread's last error, which
    // the next launch check would then raise (c10's CUDAStream::query clears it the same way).
    (void)cudaGetLastError();
    if (std::chrono::steady_clock::now() - start > std::chrono::milliseconds(1)) std::this_thread::yield();
  }
}

ExactSplitSync& exact_split_sync(int device) {
  // Per thread: two host threads dispatching on one device must not record each other's events.
  thread_local ExactSplitSync per_device[64] = {};
  TORCH_CHECK(device >= 0 && device < 64, "ep_ops.dispatch: device index ", device, " out of range");
  ExactSplitSync& sync = per_device[device];
  if (sync.side == nullptr) {  // the caller's device guard makes `device` current
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&sync.inputs, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&sync.notified, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&sync.sent, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&sync.side, cudaStreamNonBlocking));
  }
  return sync;
}

SideStreamJoin::~SideStreamJoin() {
  if (sync_ == nullptr) return;
  // No throwing here (a destructor, maybe during a raise): a failure shows at the next CUDA call.
  if (cudaEventRecord(sync_->sent, sync_->side) == cudaSuccess) cudaStreamWaitEvent(stream_, sync_->sent, 0);
}

}  // namespace ep_ops::cuda
