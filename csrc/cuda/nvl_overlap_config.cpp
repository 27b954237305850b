#include "nvl_overlap_config.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

namespace ep_ops::cuda {

int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long parsed = std::strtol(value, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && parsed > 0 && parsed <= 1 << 20, "ep_ops: ", name,
                    " must be a positive integer, got '", value, "'");
  return static_cast<int>(parsed);
}

bool env_switch_on(const char* name) {
  const char* mode = std::getenv(name);
  return mode == nullptr || std::string(mode) != "0";
}

int resident_blocks(const void* kernel, int threads, std::atomic<int> (&cache)[64]) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::atomic<int>* slot = device >= 0 && device < 64 ? &cache[device] : nullptr;
  if (slot && slot->load() > 0) return slot->load();
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int blocks = per_sm * sms;
  if (slot) slot->store(blocks);
  return blocks;
}

}  // namespace ep_ops::cuda
