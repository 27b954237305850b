// The collective backend serves CPU tensors (gloo) and, until the NVLink kernels take over,
// CUDA tensors (NCCL): the same device-generic code is registered for both keys.
#include <torch/library.h>

#include "ops.h"

namespace ep_ops::collective {
namespace {

void register_kernels(torch::Library& m) {
  m.impl("get_dispatch_layout", &get_dispatch_layout);
  m.impl("dispatch", &dispatch);
  m.impl("cached_dispatch", &cached_dispatch);
  m.impl("combine", &combine);
  m.impl("low_latency_dispatch", &low_latency_dispatch);
  m.impl("low_latency_dispatch_send", &low_latency_dispatch_send);
  m.impl("low_latency_dispatch_recv", &low_latency_dispatch_recv);
  m.impl("low_latency_combine", &low_latency_combine);
  m.impl("low_latency_combine_send", &low_latency_combine_send);
  m.impl("low_latency_combine_recv", &low_latency_combine_recv);
  m.impl("low_latency_combine_backward", &low_latency_combine_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_ops, CPU, m) { register_kernels(m); }
TORCH_LIBRARY_IMPL(ep_ops, CUDA, m) { register_kernels(m); }

}  // namespace ep_ops::collective
