"""Inputs and analytic results shared by the MoE integration tests (fused_a2a, token_dispatcher,
moe_layer).

Every rank rebuilds every rank's inputs from the seed, so a worker can compute what any rank
should see. The analytic "experts" scale a row of global expert e by (e + 1), so the MoE output is
``y_t = x_t * sum_k p_tk * (e_tk + 1)`` over the token's kept (token, expert) pairs, and for the
loss ``sum(y * g)`` the gradients are ``dL/dx_t = g_t * sum_k p_tk (e_tk + 1)`` and
``dL/dp_tk = (e_tk + 1) * <x_t, g_t>`` (0 for pairs that are not kept).
"""

import functools
import importlib
import math
import time
import traceback

import torch
import torch.distributed as dist

from ep_ops.launch import parallel_launch

HIDDEN = 16  # float32, H = 16: the wire rows stay aligned for every K used here
NUM_EXPERTS = 6  # a multiple of 2 and 3
TOPK = 2
TOKENS = {2: (5, 8), 3: (5, 8, 0)}  # tokens per rank: different counts, and an empty rank


def token_counts(world_size: int) -> tuple:
    """Tokens of every rank: TOKENS, or for other group sizes (the GPU suite's 4 and 8 ranks)
    the 3-rank pattern repeated."""
    if world_size in TOKENS:
        return TOKENS[world_size]
    return tuple(TOKENS[3][r % 3] for r in range(world_size))


def tokens_of(rank: int, world_size: int) -> int:
    return token_counts(world_size)[rank]


def max_tokens(world_size: int) -> int:
    return max(token_counts(world_size))


def routing_of(rank: int, world_size: int, seed: int = 0, topk: int = TOPK, num_experts: int = NUM_EXPERTS):
    """(x [T, H] float32, topk_idx [T, K] int64 with -1 holes, topk_weights [T, K] float32,
    0 at holes) of ``rank``; distinct expert ids per token."""
    gen = torch.Generator().manual_seed(1000 * seed + 17 * world_size + rank)
    num_tokens = tokens_of(rank, world_size)
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    idx = torch.rand(num_tokens, num_experts, generator=gen).topk(topk, dim=1).indices
    holes = torch.rand(num_tokens, topk, generator=gen) < 0.15
    idx = idx.masked_fill(holes, -1)
    weights = torch.rand(num_tokens, topk, generator=gen).masked_fill(idx < 0, 0.0)
    return x, idx, weights


def upstream(shape, rank: int, salt: int = 0) -> torch.Tensor:
    """A fixed upstream gradient g for the loss sum(y * g)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5000 + 31 * rank + salt))


def dense_routing(idx: torch.Tensor, weights: torch.Tensor, num_experts: int = NUM_EXPERTS):
    """(routing_map [T, E] bool, probs [T, E] float32) from top-k routing (-1 skipped)."""
    column = torch.where(idx >= 0, idx, num_experts)
    shape = (idx.size(0), num_experts + 1)
    routing_map = torch.zeros(shape, dtype=torch.bool).scatter(1, column, True)[:, :num_experts]
    probs = torch.zeros(shape).scatter(1, column, torch.where(idx >= 0, weights, 0.0))[:, :num_experts]
    return routing_map, probs


def reference_drop(idx: torch.Tensor, weights: torch.Tensor, capacity: int, num_experts: int = NUM_EXPERTS):
    """Capacity dropping written as a loop: each expert keeps its first ``capacity`` pairs in
    token order."""
    idx, weights = idx.clone(), weights.clone()
    seen = [0] * num_experts
    for t in range(idx.size(0)):
        for k in range(idx.size(1)):
            e = int(idx[t, k])
            if e < 0:
                continue
            if seen[e] >= capacity:
                idx[t, k], weights[t, k] = -1, 0.0
            seen[e] += 1
    return idx, weights


def capacity_of(
    num_tokens: int, capacity_factor: float, topk: int = TOPK, num_experts: int = NUM_EXPERTS
) -> int:
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


def analytic(x, idx, weights, g):
    """(y, dL/dx, dL/dweights) of the scaling experts for loss sum(y * g)."""
    valid = idx >= 0
    scale = torch.where(valid, (idx + 1).to(x.dtype), 0.0)
    coef = (weights * scale).sum(dim=1, keepdim=True)
    grad_weights = torch.where(valid, scale * (x * g).sum(dim=1, keepdim=True), 0.0)
    return x * coef, g * coef, grad_weights


def scale_by_expert(rows: torch.Tensor, tokens_per_expert: torch.Tensor, first_expert: int) -> torch.Tensor:
    """The analytic experts on grouped rows: row of local expert e times (first_expert + e + 1).
    No host sync: the group of each row comes from a repeat_interleave with a known size."""
    num_local = tokens_per_expert.size(0)
    # Rows past the groups (a static row count above their sum) form one more, unscaled group.
    rest = (rows.size(0) - tokens_per_expert.sum()).reshape(1)
    sizes = torch.cat([tokens_per_expert, rest])
    local = torch.arange(num_local + 1, device=rows.device)
    row_expert = torch.repeat_interleave(local, sizes, output_size=rows.size(0))
    scale = torch.where(row_expert < num_local, row_expert + first_expert + 1, 0)
    return rows * scale.to(rows.dtype).unsqueeze(1)


def graph_is_static(gm) -> tuple[bool, list]:
    """Whether a Dynamo graph has no host read-back (.item()/.tolist()) and no unbacked size."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    problems = []
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target in ("item", "tolist"):
            problems.append(f"{node.name}: .{node.target}()")
        if "local_scalar_dense" in str(node.target):
            problems.append(f"{node.name}: {node.target}")
        value = node.meta.get("example_value")
        values = value if isinstance(value, (tuple, list)) else [value]
        for v in values:
            if isinstance(v, torch.Tensor) and free_unbacked_symbols(v.shape):
                problems.append(f"{node.name}: unbacked shape {tuple(v.shape)}")
    return not problems, problems[:5]


def run_cases(cases: dict) -> dict:
    """Runs each case and records its outcome (with the traceback on failure), so one launch
    reports every case. After a failure the rank stops: its peers may still be inside a
    collective of the failed case, and they get "connection closed" once this rank exits
    instead of pairing that collective with a later case's."""
    records = {}
    failed = None
    for name, run in cases.items():
        if failed is not None:
            records[name] = {"ok": False, "error": f"not run: case {failed} failed first on this rank"}
            continue
        torch._dynamo.reset()
        start = time.perf_counter()
        try:
            records[name] = {"ok": True, **(run() or {})}
        except Exception:
            records[name] = {"ok": False, "error": traceback.format_exc()}
            failed = name
        records[name]["seconds"] = round(time.perf_counter() - start, 1)
    return records


def check_records(records_by_rank: list, name: str) -> list:
    records = [r[name] for r in records_by_rank]
    for rank, record in enumerate(records):
        assert record["ok"], f"rank {rank}, case {name}:\n{record['error']}"
    return records


# ----- launching ---------------------------------------------------------------------------------

# The test modules of the MoE integration. Each has eager_cases(rank, world_size, group) and
# compiled_cases(...), dicts of name -> zero-argument case.
MODULES = ("test_fused_a2a", "test_token_dispatcher", "test_moe_layer")


def suite_worker(rank, world_size, group_name, modules, compiled):
    """Runs the eager cases of ``modules`` (and their compiled cases when ``compiled``); records
    are named ``module.case``."""
    group = dist.group.WORLD
    cases = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        kinds = (module.eager_cases, module.compiled_cases) if compiled else (module.eager_cases,)
        for kind in kinds:
            for name, run in kind(rank, world_size, group).items():
                cases[f"{module_name}.{name}"] = run
    return run_cases(cases)


@functools.cache
def three_rank_records() -> list:
    """The eager cases of every MoE test module on 3 ranks, in one launch shared by the modules
    (starting 3 ranks costs more than all their eager cases together)."""
    return parallel_launch(3, suite_worker, MODULES, False, timeout=300)


@functools.cache
def two_rank_records(module_name: str) -> list:
    """One module's eager and compiled cases on 2 ranks, in one launch."""
    return parallel_launch(2, suite_worker, (module_name,), True, timeout=500)


def records_of(module_name: str, world_size: int, case: str) -> list:
    """The per-rank records of ``module.case`` (2 or 3 ranks), asserting it passed on every rank."""
    records = two_rank_records(module_name) if world_size == 2 else three_rank_records()
    return check_records(records, f"{module_name}.{case}")
