// get_dispatch_layout on the GPU: one launch, one pass over topk_idx, no host sync.
//
// A single block walks all tokens (a thread per token per step): each thread writes its
// tokens' is_token_in_rank rows and counts into shared-memory bins, and the block writes the
// bins out at the end. One block is plenty for decode and training batch sizes (4096 x 8 ids are
// 32 K loads), and it needs neither a zero-fill launch nor global atomics, whose launch costs
// would dominate at this size. Integer sums do not depend on the order of the shared atomics, so
// the outputs are deterministic. Ids outside [-1, num_experts) are not checked here (that would need a host
// sync); they are ignored, like -1.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../collective/checks.h"

namespace ep_ops::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kMaxRanks = 64;

__global__ void layout_kernel(const int64_t* __restrict__ topk_idx, int num_tokens, int num_topk,
                              int num_experts, int num_ranks, int experts_per_rank,
                              int* __restrict__ tokens_per_rank, int* __restrict__ tokens_per_expert,
                              bool* __restrict__ is_token_in_rank) {
  extern __shared__ int shared[];  // [num_ranks] rank bins, then [num_experts] expert bins
  int* rank_bins = shared;
  int* expert_bins = shared + num_ranks;
  for (int i = threadIdx.x; i < num_ranks + num_experts; i += blockDim.x) shared[i] = 0;
  __syncthreads();

  for (int token = threadIdx.x; token < num_tokens; token += blockDim.x) {
    uint64_t in_rank = 0;  // bit r: the token goes to rank r (a register, not a local array)
    for (int k = 0; k < num_topk; ++k) {
      const int64_t expert = topk_idx[static_cast<int64_t>(token) * num_topk + k];
      if (expert < 0 || expert >= num_experts) continue;
      atomicAdd(&expert_bins[expert], 1);
      in_rank |= uint64_t{1} << (expert / experts_per_rank);
    }
    for (int r = 0; r < num_ranks; ++r) {
      const bool here = (in_rank >> r) & 1;
      is_token_in_rank[static_cast<int64_t>(token) * num_ranks + r] = here;
      if (here) atomicAdd(&rank_bins[r], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < num_ranks; i += blockDim.x) tokens_per_rank[i] = rank_bins[i];
  for (int i = threadIdx.x; i < num_experts; i += blockDim.x) tokens_per_expert[i] = expert_bins[i];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> get_dispatch_layout(const at::Tensor& topk_idx,
                                                                   int64_t num_experts,
                                                                   int64_t num_ranks) {
  const char* op = "get_dispatch_layout";
  TORCH_CHECK_VALUE(topk_idx.dim() == 2, "ep_ops.", op, ": topk_idx must be 2-D, got shape ",
                    topk_idx.sizes());
  TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kLong, "ep_ops.", op,
                   ": topk_idx must be int64, got ", topk_idx.scalar_type());
  TORCH_CHECK_VALUE(num_ranks > 0 && num_ranks <= kMaxRanks, "ep_ops.", op,
                    ": num_ranks must be in [1, ", kMaxRanks, "], got ", num_ranks);
  const int64_t per_rank = collective::check_num_experts(num_experts, num_ranks, op);
  const size_t shared_bytes = sizeof(int) * (num_ranks + num_experts);
  TORCH_CHECK_VALUE(shared_bytes <= 48 * 1024, "ep_ops.", op, ": num_experts (", num_experts,
                    ") is too large for the GPU layout kernel");

  c10::cuda::CUDAGuard guard(topk_idx.device());
  auto idx = topk_idx.contiguous();
  const int64_t num_tokens = idx.size(0);
  auto int_options = idx.options().dtype(at::kInt);
  auto tokens_per_rank = at::empty({num_ranks}, int_options);
  auto tokens_per_expert = at::empty({num_experts}, int_options);
  auto is_token_in_rank = at::empty({num_tokens, num_ranks}, idx.options().dtype(at::kBool));
  TORCH_CHECK_VALUE(num_tokens <= std::numeric_limits<int>::max(), "ep_ops.", op,
                    ": too many tokens (", num_tokens, ")");
  {  // also with 0 tokens: the kernel writes the (zero) counts
    layout_kernel<<<1, kThreads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
        idx.data_ptr<int64_t>(), static_cast<int>(num_tokens), static_cast<int>(idx.size(1)),
        static_cast<int>(num_experts), static_cast<int>(num_ranks), static_cast<int>(per_rank),
        tokens_per_rank.data_ptr<int>(), tokens_per_expert.data_ptr<int>(),
        is_token_in_rank.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {tokens_per_rank, tokens_per_expert, is_token_in_rank};
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_ops, CUDA, m) { m.impl("get_dispatch_layout", &get_dispatch_layout); }

}  // namespace ep_ops::cuda
