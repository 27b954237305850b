"""Inputs and analytic results shared by the MoE integration tests (fused_a2a, token_dispatcher,
moe_layer).

Every rank rebuilds every rank's inputs from the seed, so a worker can compute what any rank
should see. The analytic "experts" scale a row of global expert e by (e + 1), so the MoE output is
``y_t = x_t * sum_k p_tk * (e_tk + 1)`` over the token's kept (token, expert) pairs, and for the
loss ``sum(y * g)`` the gradients are ``dL/dx_t = g_t * sum_k p_tk (e_tk + 1)`` and
``dL/dp_tk = (e_tk + 1) * <x_t, g_t>`` (0 for pairs that are not kept).
"""

import math
import time
import traceback

import torch

HIDDEN = 16  # float32, H = 16: the wire rows stay aligned for every K used here
NUM_EXPERTS = 6  # a multiple of 2 and 3
TOPK = 2
TOKENS = {2: (5, 8), 3: (5, 8, 0)}  # tokens per rank: different counts, and an empty rank


def tokens_of(rank: int, world_size: int) -> int:
    return TOKENS[world_size][rank]


def max_tokens(world_size: int) -> int:
    return max(TOKENS[world_size])


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
    return not problems, problems


def run_cases(cases: dict) -> dict:
    """Runs each case; a failure is recorded with its traceback so the other cases still run
    (cases fail alike on every rank: same code, same communication sequence)."""
    records = {}
    for name, run in cases.items():
        torch._dynamo.reset()
        start = time.perf_counter()
        try:
            records[name] = {"ok": True, **(run() or {})}
        except Exception:
            records[name] = {"ok": False, "error": traceback.format_exc()}
        records[name]["seconds"] = round(time.perf_counter() - start, 1)
    return records


def check_records(records_by_rank: list, name: str) -> list:
    records = [r[name] for r in records_by_rank]
    for rank, record in enumerate(records):
        assert record["ok"], f"rank {rank}, case {name}:\n{record['error']}"
    return records
