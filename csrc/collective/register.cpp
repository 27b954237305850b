// The collective backend serves CPU tensors (gloo) and CUDA tensors (NCCL); the code is
// device-generic. A CUDA build registers the CUDA key in csrc/cuda/ (which falls back to these
// functions per call), since one key takes one kernel.
#include <torch/library.h>

#include "ops.h"

namespace ep_ops::collective {
namespace {

// Normal-mode ops: on CUDA, csrc/cuda/register.cpp chooses between NVLink and these.
void register_normal_kernels(torch::Library& m) {
  m.impl("dispatch", &dispatch);
  m.impl("cached_dispatch", &cached_dispatch);
  m.impl("combine", &combine);
}

// The fused-permute ops: on CUDA, csrc/cuda/register_permuted.cpp chooses NVLink or these.
void register_permuted_kernels(torch::Library& m) {
  m.impl("dispatch_permuted", &dispatch_permuted);
  m.impl("combine_permuted", &combine_permuted);
}

void register_low_latency_kernels(torch::Library& m) {
  m.impl("low_latency_dispatch", &low_latency_dispatch);
  m.impl("low_latency_dispatch_send", &low_latency_dispatch_send);
  m.impl("low_latency_dispatch_recv", &low_latency_dispatch_recv);
  m.impl("low_latency_combine", &low_latency_combine);
  m.impl("low_latency_combine_send", &low_latency_combine_send);
  m.impl("low_latency_combine_recv", &low_latency_combine_recv);
  m.impl("low_latency_combine_backward", &low_latency_combine_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_ops, CPU, m) {
  m.impl("get_dispatch_layout", &get_dispatch_layout);
  register_normal_kernels(m);
  register_permuted_kernels(m);
  register_low_latency_kernels(m);
}

#ifndef EP_OPS_WITH_CUDA  // a CUDA build registers its own kernels (csrc/cuda/*register.cpp)
TORCH_LIBRARY_IMPL(ep_ops, CUDA, m) {
  m.impl("get_dispatch_layout", &get_dispatch_layout);
  register_normal_kernels(m);
  register_permuted_kernels(m);
  register_low_latency_kernels(m);
}
#endif

}  // namespace ep_ops::collective
