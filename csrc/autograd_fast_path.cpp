// The autograd formulas of the differentiable ops are Python (ep_ops/autograd.py, through
// torch.library.register_autograd, on the Autograd alias key). That Python kernel runs on every
// call, gradient or not: ~8 us of host time per call (a Python op measured with and without
// register_autograd on this repo's CPU machine, 2026-11-22: 6.3 vs 14.6 us), which the GPU waits
// for whenever the host is the bottleneck (every op call in a decoding step or a benchmark).
//
// This boxed kernel is registered directly on AutogradCPU and AutogradCUDA: a kernel on a runtime
// key takes precedence over an alias-key one, so it runs instead. When no input needs a gradient
// it goes straight to the backend kernel, as the Python kernel would have; otherwise it hands the
// call to the Python kernel through AutogradOther, whose entry still holds the alias kernel.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace ep_ops {
namespace {

bool any_input_requires_grad(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const size_t num_args = op.schema().arguments().size();
  for (size_t i = stack.size() - num_args; i < stack.size(); ++i) {
    const c10::IValue& value = stack[i];
    if (value.isTensor() && value.toTensor().requires_grad()) return true;
  }
  return false;
}

void autograd_fast_path(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  if (!c10::GradMode::is_enabled() || !any_input_requires_grad(op, *stack)) {
    at::AutoDispatchBelowAutograd guard;
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
    return;
  }
  const auto python_autograd = c10::DispatchKeySet(c10::DispatchKey::AutogradOther);
  op.redispatchBoxed(python_autograd | (keys & c10::after_autograd_keyset), stack);
}

// The ops ep_ops/autograd.py gives a formula (tests/test_autograd.py checks the lists agree).
constexpr const char* kDifferentiableOps[] = {
    "dispatch",           "cached_dispatch",      "combine",             "dispatch_permuted",
    "combine_permuted",   "low_latency_dispatch", "low_latency_combine",
};

void register_fast_path(torch::Library& m) {
  for (const char* name : kDifferentiableOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&autograd_fast_path>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ep_ops, AutogradCPU, m) { register_fast_path(m); }
TORCH_LIBRARY_IMPL(ep_ops, AutogradCUDA, m) { register_fast_path(m); }

}  // namespace ep_ops
