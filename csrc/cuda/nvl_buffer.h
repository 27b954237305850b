// The NVLink peer memory of a group: one symmetric-memory allocation per rank, registered under
// the group's name when an ep_ops.Buffer is built (never during graph capture), and looked up by
// the ops. A group holds up to two: the normal ops' buffer and the low-latency ops' buffer
// (ll_layout.h has the latter's layout). The normal buffer's layout is the same on every rank:
//
//   [0, kControlBytes)            control: flags written by peers, counters kept locally
//   [kControlBytes, +half)        dispatch rows sent to this rank
//   [..., end)                    combine rows sent back to this rank
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>  // __host__ __device__ for PeerView

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "nvl_watchdog.h"

namespace ep_ops::cuda {

constexpr int kMaxNvlRanks = 8;
constexpr int64_t kControlBytes = 64 * 1024;
// Row-chunk counters per source of the overlapped dispatch (nvl_dispatch_overlap.cu): a source's
// stream of rows to us is cut into at most this many chunks.
constexpr int kMaxDispatchChunks = 512;
// The same for the overlapped combine (nvl_combine_overlap.cu): the rows a rank sends back to a
// source form a stream of at most this many chunks.
constexpr int kMaxCombineChunks = 128;
// Exact-mode dispatch counts each rank's received tokens per local expert in notify (the host
// reads them with the totals) for groups with at most this many experts per rank.
constexpr int kMaxNotifyExperts = 512;

// Control words, all uint64; peers write the per-source slots [kMaxNvlRanks].
struct Control {
  uint64_t dispatch_epoch;                        // local: dispatches run so far
  uint64_t combine_epoch;                         // local: combines run so far
  uint64_t dispatch_recv_tickets;                 // local: receiver blocks done, cumulative
  uint64_t combine_recv_tickets;                  // local
  uint64_t combine_end_tickets;                   // local: overlapped combine blocks done, cumulative
  uint64_t counts_ready[kMaxNvlRanks];            // source s posted its counts for epoch e
  uint64_t dispatch_arrivals[kMaxNvlRanks];       // sender blocks of source s done, cumulative
  uint64_t dispatch_freed[kMaxNvlRanks];          // receiver r consumed our rows of epoch e
  uint64_t combine_arrivals[kMaxNvlRanks];
  uint64_t combine_freed[kMaxNvlRanks];
  int32_t counts[kMaxNvlRanks][kMaxNvlRanks];     // counts[s][d]: tokens source s sends to d
  int32_t expert_counts[kMaxNvlRanks][kMaxNotifyExperts];  // [s][e]: s's tokens for our expert e
  uint64_t expert_counts_epoch[kMaxNvlRanks];     // the dispatch epoch of s's expert_counts
  // Overlapped dispatch: rows of chunk k that source s has written into our dispatch region this
  // epoch (peers add, our receive resets it to 0 once the chunk is complete, before freed).
  uint64_t dispatch_chunk_rows[kMaxNvlRanks][kMaxDispatchChunks];
  // Overlapped combine: rows of chunk k that rank d has written back into our combine region
  // this epoch (peers add, our last receive block resets them to 0 before freed).
  uint64_t combine_chunk_rows[kMaxNvlRanks][kMaxCombineChunks];
  // Overlapped dispatch's receive, local: the next work item a block takes (each take adds 1;
  // the launch's last block out resets it to 0), and the blocks out, cumulative.
  uint64_t dispatch_recv_next;
  uint64_t dispatch_recv_exits;
  // A cached dispatch's one launch, local: its blocks out, cumulative; the last one out closes
  // the epoch the launch opened (nvl_dispatch_overlap.cu).
  uint64_t dispatch_launch_exits;
  // Exact mode's split, local: the host's request number of the latest notify whose prefix
  // matrix, totals and token positions are written; the send part, launched beside notify,
  // waits for it (nvl_exact_totals.h).
  uint64_t dispatch_prefix_ready;
  // Exact mode's split with the sliced layout, local: the request number of the latest notify
  // that has seen every receiver consume our previous rows and has written our token positions;
  // the send part needs nothing more before its first row (nvl_dispatch_overlap.cu).
  uint64_t dispatch_send_ready;
};
static_assert(sizeof(Control) <= kControlBytes - kTrippedOffsetFromControlEnd);

// Exact-mode dispatch's totals for the host (nvl_exact_totals.h): notify writes them through
// the mapping, then `sequence` = the request number the host passed it. One per buffer: an exact
// dispatch reads its own totals before it returns, and a buffer serves one stream at a time.
struct HostTotals {
  int32_t totals[kMaxNvlRanks + kMaxNotifyExperts];  // per rank, then per local expert
  uint64_t sequence;      // written by the device, after the totals
  uint64_t last_request;  // host only: the request number of the latest exact dispatch
};

// The buffer's pinned host memory, mapped into the device, allocated and freed with the buffer.
// The watchdog's record comes first, so PeerView's two record pointers (device and host address)
// locate the totals too and the kernels' arguments keep their size.
struct MappedHostArea {
  WaitFailure wait_failure;
  alignas(64) HostTotals dispatch_totals;  // a cache line of its own: the host polls it
};
static_assert(std::is_standard_layout_v<MappedHostArea>);

// The totals of the area whose watchdog record is at `record` (device or host address; address
// arithmetic only).
inline HostTotals* host_totals_of(WaitFailure* record) {
  return reinterpret_cast<HostTotals*>(reinterpret_cast<char*>(record) +
                                       offsetof(MappedHostArea, dispatch_totals));
}

// Device-side view handed to kernels by value.
struct PeerView {
  uint8_t* base[kMaxNvlRanks];  // every rank's buffer, mapped into this process
  int rank, num_ranks;
  int64_t region_bytes;         // bytes of each of the two data regions (normal buffer)
  int64_t num_bytes;            // the whole allocation, the same on every rank
  Watchdog watchdog;            // what a timed-out wait trips (nvl_watchdog.h)
  __host__ __device__ Control* control(int r) const { return reinterpret_cast<Control*>(base[r]); }
  __host__ __device__ uint8_t* dispatch_region(int r) const { return base[r] + kControlBytes; }
  __host__ __device__ uint8_t* combine_region(int r) const {
    return base[r] + kControlBytes + region_bytes;
  }
};

// Rank r's buffer, for an r known only at run time (constant indices: a dynamic index into the
// kernel's PeerView argument would copy the whole struct to local memory).
__device__ __forceinline__ uint8_t* peer_base(const PeerView& v, int r) {
  uint8_t* base = nullptr;
#pragma unroll
  for (int i = 0; i < kMaxNvlRanks; ++i) {
    if (i == r) base = v.base[i];
  }
  return base;
}

// Allocates and rendezvous the group's buffer of one kind (collective over the group), keeps it
// in the registry and returns the local tensor. num_bytes covers control and data.
// A wait gives up after `timeout_s` seconds (nvl_watchdog.h).
at::Tensor init_nvl_buffer(const at::Tensor& device_hint, const std::string& group_name,
                           int64_t num_bytes, bool low_latency, double timeout_s);

// Drops the registry's reference (the memory goes once the caller's tensor goes too).
void release_nvl_buffer(const at::Tensor& device_hint, const std::string& group_name,
                        bool low_latency);

// Throws (naming `op`, the ranks and the phase) when a wait on the buffer of `v` timed out in an
// earlier call: the buffer is unusable from then on. Reads pinned memory, no sync.
void check_watchdog(const PeerView& v, const char* op);

// The registered view of the group's normal buffer, if any.
std::optional<PeerView> find_nvl_buffer(const std::string& group_name);

// The group's low-latency buffer: its view and local tensor, if registered.
struct LowLatencyBuffer {
  PeerView view;
  at::Tensor local;
};
std::optional<LowLatencyBuffer> find_ll_buffer(const std::string& group_name);

// Which of the two alternating slabs of `phase` the next low-latency call of the group uses.
// Every rank makes the same calls, so every rank picks the same slab.
int take_ll_slab(const std::string& group_name, int phase);

}  // namespace ep_ops::cuda
