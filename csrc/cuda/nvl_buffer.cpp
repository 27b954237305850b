#include "nvl_buffer.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/symm_mem/SymmetricMemory.hpp>

#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <new>

namespace ep_ops::cuda {
namespace {

// The buffer's mapped host area (the watchdog's record, exact dispatch's totals), zeroed.
// cudaFreeHost waits for the device, so no kernel still writes it when it goes.
std::shared_ptr<MappedHostArea> make_mapped_host_area() {
  void* host = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(MappedHostArea), cudaHostAllocMapped | cudaHostAllocPortable));
  return std::shared_ptr<MappedHostArea>(new (host) MappedHostArea{},
                                         [](MappedHostArea* p) { cudaFreeHost(p); });
}

struct Entry {
  at::Tensor local;  // keeps the allocation alive while registered
  c10::intrusive_ptr<c10d::symmetric_memory::SymmetricMemory> handle;
  std::shared_ptr<MappedHostArea> mapped;  // pinned host memory the kernels write
  PeerView view;
  int next_slab[4] = {0, 0, 0, 0};  // low-latency buffer: per phase, the slab of the next call
};

using Key = std::pair<std::string, bool>;  // (group name, low_latency)

std::mutex registry_mutex;
std::map<Key, Entry>& registry() {
  static std::map<Key, Entry> entries;
  return entries;
}

}  // namespace

at::Tensor init_nvl_buffer(const at::Tensor& device_hint, const std::string& group_name,
                           int64_t num_bytes, bool low_latency, double timeout_s) {
  const char* op = "init_nvl_buffer";
  TORCH_CHECK_VALUE(std::isfinite(timeout_s) && timeout_s > 0 && timeout_s < 1e6, "ep_ops.", op,
                    ": timeout_s must be a positive number of seconds below 1e6, got ", timeout_s);
  TORCH_CHECK_VALUE(device_hint.is_cuda(), "ep_ops.", op, ": device_hint must be a CUDA tensor");
  TORCH_CHECK_VALUE(num_bytes > kControlBytes + 2 * 16, "ep_ops.", op, ": num_bytes (", num_bytes,
                    ") must exceed the ", kControlBytes, " control bytes");
  c10::cuda::CUDAGuard guard(device_hint.device());
  auto local = c10d::symmetric_memory::empty_strided_p2p({num_bytes}, {1}, at::kByte,
                                                         device_hint.device(), group_name,
                                                         std::nullopt);
  local.zero_();
  auto handle = c10d::symmetric_memory::rendezvous(local, group_name);
  const int num_ranks = handle->get_world_size();
  TORCH_CHECK_VALUE(num_ranks <= kMaxNvlRanks, "ep_ops.", op, ": NVLink buffers serve up to ",
                    kMaxNvlRanks, " ranks, the group has ", num_ranks);
  // Every rank has zeroed its control words before any peer may write into them.
  handle->barrier(0, 60'000);

  PeerView view{};
  auto ptrs = handle->get_buffer_ptrs();
  for (int r = 0; r < num_ranks; ++r) view.base[r] = static_cast<uint8_t*>(ptrs[r]);
  view.rank = handle->get_rank();
  view.num_ranks = num_ranks;
  view.region_bytes = (num_bytes - kControlBytes) / 2 / 128 * 128;  // rows start on a line
  view.num_bytes = num_bytes;
  auto mapped = make_mapped_host_area();
  void* mapped_on_device = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped_on_device, mapped.get(), 0));
  view.watchdog.tripped = reinterpret_cast<uint32_t*>(view.base[view.rank] + kControlBytes -
                                                      kTrippedOffsetFromControlEnd);
  view.watchdog.record = &static_cast<MappedHostArea*>(mapped_on_device)->wait_failure;
  view.watchdog.host_record = &mapped->wait_failure;
  view.watchdog.timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);

  std::lock_guard<std::mutex> lock(registry_mutex);
  registry()[Key{group_name, low_latency}] = Entry{local, handle, mapped, view};
  return local;
}

void release_nvl_buffer(const at::Tensor&, const std::string& group_name, bool low_latency) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().erase(Key{group_name, low_latency});
}

void check_watchdog(const PeerView& v, const char* op) {
  const volatile WaitFailure* record = v.watchdog.host_record;
  if (record->failed == 0) return;
  const int peer = record->peer;
  TORCH_CHECK(false, "ep_ops.", op, ": the group's NVLink buffer is unusable: rank ",
              record->rank, " waited ",
              static_cast<double>(record->waited_ns) * 1e-9, " s for rank ", peer, " (",
              wait_phase_name(record->phase), ", counter ", record->target,
              ") and gave up at its timeout of ", static_cast<double>(v.watchdog.timeout_ns) * 1e-9,
              " s. The outputs of that call and of every call on the buffer since are invalid. Has rank ",
              peer, " died, or is it not making the same ep_ops calls? Destroy the Buffer on every ",
              "rank; go on only with a new process group and a new Buffer.");
}

std::optional<PeerView> find_nvl_buffer(const std::string& group_name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().find(Key{group_name, false});
  if (it == registry().end()) return std::nullopt;
  return it->second.view;
}

std::optional<LowLatencyBuffer> find_ll_buffer(const std::string& group_name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().find(Key{group_name, true});
  if (it == registry().end()) return std::nullopt;
  return LowLatencyBuffer{it->second.view, it->second.local};
}

int take_ll_slab(const std::string& group_name, int phase) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto& slab = registry().at(Key{group_name, true}).next_slab[phase];
  const int taken = slab;
  slab ^= 1;
  return taken;
}

}  // namespace ep_ops::cuda
