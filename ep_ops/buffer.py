"""``Buffer``: drop-in for DeepEP's (and UCCL-EP's) ``deep_ep.Buffer``, over ``torch.ops.ep_ops``.

Same constructor arguments, methods, argument names, defaults and return tuples as DeepEP v1.
Each method checks what only the wrapper can see (tuple forms, handles, buffer sizes, stats
tensors), then calls one op; the ops check everything else. Differences from DeepEP:

- Every op runs on the current stream (there is no separate communication stream), so
  ``allocate_on_comm_stream`` has no effect, ``previous_event`` is waited on by the current
  stream, and ``async_finish=True`` returns an event recorded after the op (CUDA only).
- Handles are plain tuples of tensors in ep_ops' own layout (see ``dispatch`` and
  ``low_latency_dispatch``); DeepEP handles are not accepted.
- ``num_nvl_bytes`` / ``num_rdma_bytes`` are checked against the size hints, so code that sizes
  its buffers for DeepEP keeps working. On an NCCL group of one host they size the NVLink peer
  memory of the normal ops (``num_nvl_bytes``) and of the low-latency ops (``num_rdma_bytes``);
  that memory stays inside the library (``get_local_buffer_tensor`` returns separate scratch).
- Low-latency rows past ``recv_count`` are unspecified on the NVLink kernels (zero on the
  collective backend), as in DeepEP.
"""

import torch
import torch.distributed as dist

from . import _C
from ._buffer_args import _check_handle_tuple, _check_tensor
from .buffer_low_latency import LowLatencyMethods
from .config import Config, check_positive_int
from .event import EventOverlap
from .nvl import init_nvl_buffer, nvl_timeout_s, nvl_usable, release_nvl_buffer

DISPATCH_HANDLE_NAMES = ("rank_prefix_matrix", "recv_src_idx", "is_token_in_rank")
DISPATCH_HANDLE = "(" + ", ".join(DISPATCH_HANDLE_NAMES) + ")"


def _group_device(group: dist.ProcessGroup) -> torch.device:
    """CPU for gloo groups (or without CUDA); the current CUDA device otherwise."""
    if str(dist.get_backend(group)) == "gloo" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _unpack_x(x, method: str):
    """A tensor, or an ``(x, x_scales)`` FP8 pair -> ``(x, x_scales or None)``."""
    x_scales = None
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{method}: x must be a tensor or an (x, x_scales) pair, got {len(x)} items")
        x, x_scales = x
        _check_tensor(x_scales, "x_scales (x[1])", method)
    _check_tensor(x, "x", method, shape=(None, None))
    return x, x_scales


def _unpack_handle(handle, method: str):
    handle = _check_handle_tuple(handle, 3, DISPATCH_HANDLE, "Buffer.dispatch", method)
    for name, t in zip(DISPATCH_HANDLE_NAMES, handle, strict=True):
        _check_tensor(t, f"handle's {name}", method)
    return handle


def _unpack_bias(bias, method: str):
    """None, a tensor, or a tuple of up to two tensors (or None) -> ``(bias_0, bias_1)``."""
    if bias is None or isinstance(bias, torch.Tensor):
        return bias, None
    if not isinstance(bias, (tuple, list)) or len(bias) > 2:
        raise ValueError(
            f"{method}: bias must be None, a tensor or a tuple of up to two tensors, got "
            f"{type(bias).__name__}" + (f" of length {len(bias)}" if isinstance(bias, (tuple, list)) else "")
        )
    bias_0, bias_1 = (*bias, None, None)[:2]
    for name, t in (("bias[0]", bias_0), ("bias[1]", bias_1)):
        if t is not None:
            _check_tensor(t, name, method)
    return bias_0, bias_1


class Buffer(LowLatencyMethods):
    """Expert-parallel communication buffer: normal (high-throughput) dispatch/combine and
    low-latency dispatch/combine over one process group.

    Attributes:
        num_sms: SMs of the normal kernels (class-wide, see ``set_num_sms``).
        group, group_name, rank, group_size: the process group, its registered name (the ops'
            communication key), this rank and the number of ranks.
        num_nvl_bytes, num_rdma_bytes, low_latency_mode, explicitly_destroy: as given.
        device: where tensors must live: CPU for gloo groups, the current CUDA device otherwise.
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        is_intranode: bool | None = None,
        *,
        comm=None,
        timeout_s: float | None = None,
    ) -> None:
        """
        Arguments:
            group: the communication group (gloo: CPU tensors; NCCL: CUDA tensors). Must be
                registered with torch.distributed (``dist.new_group`` and WORLD are).
            num_nvl_bytes: normal-mode buffer size, at least the ``Config.get_nvl_buffer_size_hint``
                of the configs used (checked on each dispatch/combine).
            num_rdma_bytes: low-latency buffer size, at least ``get_low_latency_rdma_size_hint``
                (checked on each low-latency call); on an NCCL group of one host it becomes the
                low-latency NVLink kernels' peer memory (whatever ``low_latency_mode`` says).
            low_latency_mode, num_qps_per_rank, allow_nvlink_for_low_latency_mode, allow_mnnvl,
                is_intranode: accepted for DeepEP / UCCL-EP compatibility; ep_ops picks its
                backend (NVLink kernels or collectives) per group and needs no QPs or proxies.
            explicitly_destroy: kept for compatibility; ``destroy()`` works either way.
            comm: DeepEP's mpi4py alternative to ``group``; not supported.
            timeout_s: seconds an NVLink kernel waits for a peer before giving up (default
                ``EP_OPS_NVL_TIMEOUT_S`` or 100); then the Buffer is unusable and its next call
                raises, naming the peer and the phase (``ep_ops.nvl.init_nvl_buffer``). The
                collective backend waits as long as the process group's timeout.
        """
        if comm is not None:
            raise NotImplementedError(
                "Buffer: comm (an mpi4py communicator) is not supported; pass group, a "
                "torch.distributed ProcessGroup"
            )
        if group is None:
            raise ValueError("Buffer: group is required (a torch.distributed ProcessGroup)")
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"Buffer: group must be a torch.distributed ProcessGroup, got {type(group).__name__}"
            )
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Buffer: {name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"Buffer: {name} must be >= 0, got {value}")
        check_positive_int(num_qps_per_rank, "num_qps_per_rank")
        timeout_s = nvl_timeout_s(timeout_s)

        self.group = group
        self.group_name = group.group_name
        self.rank = group.rank()
        self.group_size = group.size()
        self.device = _group_device(group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.allow_mnnvl = allow_mnnvl
        self.explicitly_destroy = explicitly_destroy
        self.is_intranode = is_intranode
        self._raw = {}  # "nvl" / "rdma" -> uint8 tensor, allocated by get_local_buffer_tensor
        # (default config getter, hidden bytes, Buffer.num_sms) -> num_nvl_bytes a call needs: the
        # check runs on every call, and building and validating a Config costs microseconds.
        self._nvl_bytes_needed = {}
        # (M, hidden, num_experts, num_topk) -> (DeepEP's size hint, num_rdma_bytes needed): the
        # low-latency calls' size check, likewise on every call.
        self._ll_bytes_needed = {}
        self._combine_buffers = [None, None]  # zero-copy low-latency combine inputs, alternating
        self._combine_index = 0
        self._destroyed = False
        # The NVLink kernels' peer memory, when this group can use them (ep_ops/nvl.py).
        self._nvl = self._nvl_ll = None
        if self.device.type == "cuda" and nvl_usable(group):
            if num_nvl_bytes > 0:
                self._nvl = init_nvl_buffer(group, num_nvl_bytes, timeout_s=timeout_s)
            if num_rdma_bytes > 0:
                self._nvl_ll = init_nvl_buffer(group, num_rdma_bytes, low_latency=True, timeout_s=timeout_s)

    # ---------------------------------------------------------------- class-wide settings

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SMs of the normal kernels (even: half send, half receive)."""
        check_positive_int(new_num_sms, "new_num_sms")
        if new_num_sms % 2 != 0:
            raise ValueError(f"new_num_sms must be even, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Default dispatch config for ``num_ranks`` ranks."""
        check_positive_int(num_ranks, "num_ranks")
        if num_ranks <= 8:
            return Config(Buffer.num_sms, 6, 256, 6, 128)
        return Config(Buffer.num_sms, 16, 288, 20, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Default combine config for ``num_ranks`` ranks."""
        check_positive_int(num_ranks, "num_ranks")
        if num_ranks <= 8:
            return Config(Buffer.num_sms, 4, 256, 6, 128)
        return Config(Buffer.num_sms, 4, 288, 12, 128)

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True when a CUDA device of compute capability 9.0 or newer is present."""
        return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current CUDA stream (no event when CUDA is not in use)."""
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return EventOverlap()
        event = torch.cuda.Event()
        event.record()
        return EventOverlap(event)

    # ---------------------------------------------------------------- buffer management

    def get_comm_stream(self):
        """The stream the ops run on: the current CUDA stream (ep_ops has no stream of its own);
        None for a CPU buffer."""
        self._check_alive()
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def get_local_buffer_tensor(
        self,
        dtype: torch.dtype,
        size: torch.Size | None = None,
        offset: int = 0,
        use_rdma_buffer: bool = False,
    ) -> torch.Tensor:
        """A view of this rank's ``num_nvl_bytes`` (or ``num_rdma_bytes``) scratch bytes as ``dtype``.

        Local memory owned by the Buffer (allocated on first use, zeroed), not visible to peers.

        Arguments:
            dtype: the element type of the view.
            size: the view's shape (its elements must fit); None = every whole element.
            offset: the first byte (a multiple of ``dtype``'s size), like DeepEP.
            use_rdma_buffer: view the ``num_rdma_bytes`` buffer instead.
        """
        self._check_alive()
        method = "Buffer.get_local_buffer_tensor"
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{method}: dtype must be a torch.dtype, got {type(dtype).__name__}")
        num_bytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        if not isinstance(offset, int) or not 0 <= offset <= num_bytes or offset % dtype.itemsize:
            raise ValueError(
                f"{method}: offset must be a byte offset in [0, {num_bytes}] and a multiple of "
                f"{dtype.itemsize} ({dtype}), got {offset}"
            )
        count = (num_bytes - offset) // dtype.itemsize
        tensor = self._raw_bytes("rdma" if use_rdma_buffer else "nvl", num_bytes)
        tensor = tensor[offset : offset + count * dtype.itemsize].view(dtype)
        if size is None:
            return tensor
        size = torch.Size(size)
        if size.numel() > count:
            raise ValueError(
                f"{method}: size {list(size)} needs {size.numel()} elements, the buffer holds {count}"
            )
        return tensor[: size.numel()].view(size)

    def reset_rdma_buffer(self) -> None:
        """UCCL-EP: zero every buffer this object owns."""
        self._check_alive()
        for tensor in (*self._raw.values(), *self._combine_buffers):
            if tensor is not None:
                tensor.zero_()

    def connect_atomic_buffer(self, proxy) -> None:
        """UCCL-EP only: not supported."""
        raise NotImplementedError(
            "Buffer.connect_atomic_buffer: ep_ops has no proxy threads; its ops communicate "
            "through the process group given to the Buffer, so there is nothing to connect"
        )

    def destroy(self) -> None:
        """Release the tensors this Buffer owns. Idempotent; other methods raise afterwards."""
        self._raw = {}
        self._combine_buffers = [None, None]
        if self._nvl is not None:
            release_nvl_buffer(self.group_name)
            self._nvl = None
        if self._nvl_ll is not None:
            release_nvl_buffer(self.group_name, low_latency=True)
            self._nvl_ll = None
        self._destroyed = True

    # ---------------------------------------------------------------- normal mode

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Routing statistics for a later ``dispatch``; local, no communication.

        Arguments:
            topk_idx: ``[num_tokens, num_topk]`` int64 expert ids, -1 = none.
            num_experts: total experts, a multiple of the group size.
            previous_event: waited on before the op. async_finish: return an event (CUDA).
            allocate_on_comm_stream: no effect (see the module docstring).

        Returns:
            num_tokens_per_rank ``[num_ranks]`` int32; None (DeepEP's num_tokens_per_rdma_rank);
            num_tokens_per_expert ``[num_experts]`` int32; is_token_in_rank
            ``[num_tokens, num_ranks]`` bool; event.
        """
        self._check_alive()
        method = "Buffer.get_dispatch_layout"
        _check_tensor(topk_idx, "topk_idx", method)
        self._check_device(topk_idx, "topk_idx", method)
        self._wait(previous_event)
        num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank = torch.ops.ep_ops.get_dispatch_layout(
            topk_idx, num_experts, self.group_size
        )
        event = self._event(
            async_finish, (topk_idx, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank)
        )
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, event

    def dispatch(
        self,
        x,
        handle: tuple | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send each token once to every rank that holds one of its experts.

        Arguments:
            x: ``[num_tokens, hidden]`` bfloat16 (float16/32/64 accepted), or a pair of
                float8_e4m3fn ``[num_tokens, hidden]`` and float32 scales ``[num_tokens, hidden / 128]``.
            handle: a previous dispatch's handle: dispatch along its layout (no top-k allowed).
            num_tokens_per_rank: optional ``[num_ranks]`` int32 from get_dispatch_layout (shape checked).
            num_tokens_per_rdma_rank: ignored (None within one host in DeepEP).
            is_token_in_rank: ``[num_tokens, num_ranks]`` bool from get_dispatch_layout (required
                without a handle).
            num_tokens_per_expert: ``[num_experts]`` int32 from get_dispatch_layout (required with
                top-k: it gives num_experts).
            topk_idx: optional ``[num_tokens, num_topk]`` int64 expert ids, -1 = none.
            topk_weights: optional ``[num_tokens, num_topk]`` float32.
            expert_alignment: per-local-expert counts are rounded up to this multiple.
            num_worst_tokens: 0 = exact (outputs sized by what arrived, one host sync); > 0 = every
                output has this many rows (padding: topk_idx -1), no host sync, graph-capturable.
            config: ``Config``; default ``get_dispatch_config(group_size)``; sizes the buffer check.
            previous_event, async_finish, allocate_on_comm_stream: see get_dispatch_layout.

        Returns:
            recv_x (same form as x, ``[N, hidden]``), recv_topk_idx ``[N, num_topk]`` int64 local
            expert ids (-1 = not here) or None, recv_topk_weights ``[N, num_topk]`` float32 or None,
            num_recv_tokens_per_expert_list (list of ints per local expert; [] in worst-token mode
            or without top-k), handle ``(rank_prefix_matrix [R, R] int32, recv_src_idx [N] int32,
            is_token_in_rank [num_tokens, R] bool)``, event. With a handle: recv_x, None, None,
            None, the same handle, event. Rows come ordered by source rank, then source token.
        """
        method = "Buffer.dispatch"
        with self._checks_of("dispatch" if handle is None else "cached_dispatch"):
            self._check_alive()
            x, x_scales = _unpack_x(x, method)
            self._check_device(x, "x", method)
            self._check_nvl_bytes(config, Buffer.get_dispatch_config, x, method)
            if handle is not None:
                if topk_idx is not None or topk_weights is not None:
                    raise ValueError(
                        f"{method}: topk_idx and topk_weights must be None when a handle is given"
                    )
                rank_prefix_matrix, recv_src_idx, is_token_in_rank = handle = _unpack_handle(handle, method)
            else:
                num_experts = self._check_dispatch_layout(
                    method, topk_idx, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert
                )
            self._wait(previous_event)
        ops = torch.ops.ep_ops

        if handle is not None:
            recv_x, recv_x_scales = ops.cached_dispatch(
                x, x_scales, is_token_in_rank, rank_prefix_matrix, recv_src_idx, self.group_name
            )
            recv = (recv_x, recv_x_scales) if x_scales is not None else recv_x
            return (
                recv,
                None,
                None,
                None,
                handle,
                self._event(async_finish, (x, x_scales, recv_x, recv_x_scales)),
            )

        wants_counts = topk_idx is not None and num_worst_tokens == 0
        if wants_counts:
            # The NVLink kernels then count them in notify and leave them on the host with the
            # totals they read at their sync (csrc/dispatch_counts.h).
            _C.request_dispatch_counts(self.group_name)
        outputs = ops.dispatch(
            x, x_scales, topk_idx, topk_weights, is_token_in_rank,
            num_experts, expert_alignment, num_worst_tokens, self.group_name,
        )  # fmt: skip
        recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, counts, rank_prefix_matrix, recv_src_idx = (
            outputs
        )
        counts_list = []
        if wants_counts:
            # None when none were left (the collective backend, or notify could not count them):
            # then tolist() waits for the device tensor.
            counts_list = _C.take_dispatch_counts(self.group_name)
            if counts_list is None:
                counts_list = counts.tolist()
        handle = (rank_prefix_matrix, recv_src_idx, is_token_in_rank)
        event = self._event(async_finish, (x, x_scales, topk_idx, topk_weights, *outputs))
        return (
            (recv_x, recv_x_scales) if x_scales is not None else recv_x,
            recv_topk_idx if topk_idx is not None else None,
            recv_topk_weights if topk_weights is not None else None,
            counts_list,
            handle,
            event,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: tuple,
        topk_weights: torch.Tensor | None = None,
        bias=None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Inverse of dispatch: every original token gets the **sum** (no weights) of its rows.

        Arguments:
            x: ``[N, hidden]`` float rows in the order dispatch delivered them (bfloat16 in DeepEP).
            handle: the handle from ``dispatch``.
            topk_weights: optional ``[N, num_topk]`` float32, summed the same way.
            bias: None, a ``[num_tokens, hidden]`` tensor of x's dtype, or a tuple of up to two.
            config: ``Config``; default ``get_combine_config(group_size)``; sizes the buffer check.
            previous_event, async_finish, allocate_on_comm_stream: see get_dispatch_layout.

        Returns:
            combined_x ``[num_tokens, hidden]`` (x's dtype), combined_topk_weights
            ``[num_tokens, num_topk]`` float32 or None, event.
        """
        method = "Buffer.combine"
        with self._checks_of("combine"):
            self._check_alive()
            _check_tensor(x, "x", method, shape=(None, None))
            self._check_device(x, "x", method)
            rank_prefix_matrix, recv_src_idx, is_token_in_rank = _unpack_handle(handle, method)
            bias_0, bias_1 = _unpack_bias(bias, method)
            self._check_nvl_bytes(config, Buffer.get_combine_config, x, method)
            self._wait(previous_event)
        combined_x, combined_topk_weights = torch.ops.ep_ops.combine(
            x,
            topk_weights,
            bias_0,
            bias_1,
            is_token_in_rank,
            rank_prefix_matrix,
            recv_src_idx,
            self.group_name,
        )
        event = self._event(
            async_finish, (x, topk_weights, bias_0, bias_1, combined_x, combined_topk_weights)
        )
        return combined_x, combined_topk_weights if topk_weights is not None else None, event

    # The same ops serve groups that span hosts (collective backend): same methods, same signatures.
    internode_dispatch = dispatch
    internode_combine = combine

    # ---------------------------------------------------------------- helpers

    def _checks_of(self, op: str) -> "_RejectOnError":
        """Runs the wrapper's own checks before the communicating op ``op``.

        The ops agree on their inputs in a header exchange before moving data, so that a rank with
        bad input makes every rank raise. A check failing here, on this rank alone, would skip
        that exchange: the other ranks would wait in it, or pair it with this rank's next call.
        So a failing rank still takes part in ``op``'s exchange, with an input the op rejects
        locally (the other ranks then raise "rank r rejected its input"), and raises its own error.
        """
        return _RejectOnError(self, op)

    def _reject(self, op: str) -> None:
        """Calls ``op`` with an input it rejects (a 1-D ``x``): it takes part in the header
        exchange, flags this rank's input as bad and raises, which is swallowed here."""
        num_ranks, device = self.group_size, self.device
        empty = torch.empty(0, dtype=torch.bfloat16, device=device)
        no_tokens = torch.empty((0, num_ranks), dtype=torch.bool, device=device)
        prefix = torch.zeros((num_ranks, num_ranks), dtype=torch.int32, device=device)
        src_idx = torch.empty(0, dtype=torch.int32, device=device)
        ids = torch.empty((0, 1), dtype=torch.int64, device=device)
        ops, name = torch.ops.ep_ops, self.group_name
        calls = {
            "dispatch": lambda: ops.dispatch(empty, None, None, None, no_tokens, num_ranks, 1, 0, name),
            "cached_dispatch": lambda: ops.cached_dispatch(empty, None, no_tokens, prefix, src_idx, name),
            "combine": lambda: ops.combine(empty, None, None, None, no_tokens, prefix, src_idx, name),
            "low_latency_dispatch_send": lambda: ops.low_latency_dispatch_send(
                empty, ids, 1, num_ranks, False, False, False, name
            ),
            "low_latency_combine_send": lambda: ops.low_latency_combine_send(
                empty, ids, ids.float(), torch.empty((num_ranks, 1, 1), dtype=torch.int32, device=device),
                1, False, name,
            ),
        }  # fmt: skip
        try:
            calls[op]()
        except Exception:  # noqa: BLE001  (the point of the call: every rank raises)
            return
        raise AssertionError(f"Buffer._reject: ep_ops.{op} accepted an input it must reject")

    def _check_dispatch_layout(
        self, method, topk_idx, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert
    ) -> int:
        """Checks dispatch's layout arguments (without a handle); returns num_experts."""
        if is_token_in_rank is None:
            raise ValueError(
                f"{method}: is_token_in_rank is required without a handle; "
                "get it from Buffer.get_dispatch_layout(topk_idx, num_experts)"
            )
        if num_tokens_per_rank is not None:
            _check_tensor(num_tokens_per_rank, "num_tokens_per_rank", method, torch.int32, (self.group_size,))
        if num_tokens_per_expert is not None:
            _check_tensor(num_tokens_per_expert, "num_tokens_per_expert", method, torch.int32, (None,))
            return num_tokens_per_expert.size(0)
        if topk_idx is not None:
            raise ValueError(
                f"{method}: num_tokens_per_expert is required with topk_idx (its length is num_experts); "
                "get it from Buffer.get_dispatch_layout(topk_idx, num_experts)"
            )
        return self.group_size  # unused without top-k; any multiple of the group size

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("Buffer was destroyed")

    def _check_device(self, t: torch.Tensor, name: str, method: str) -> None:
        if t.device != self.device:
            raise ValueError(
                f"{method}: {name} must be on {self.device} (the Buffer's device), got {t.device}"
            )

    def _config(self, config, default, method: str) -> Config:
        if config is None:
            return default(self.group_size)
        if not isinstance(config, Config):
            raise TypeError(f"{method}: config must be an ep_ops Config, got {type(config).__name__}")
        return config

    def _check_nvl_bytes(self, config: Config | None, default, x: torch.Tensor, method: str) -> None:
        """num_nvl_bytes must hold what ``config`` (None: ``default(group_size)``) asks for x."""
        hidden_bytes = x.size(1) * max(x.element_size(), 2)
        if config is None:
            key = (default, hidden_bytes, Buffer.num_sms)
            needed = self._nvl_bytes_needed.get(key)
            if needed is None:
                needed = default(self.group_size).get_nvl_buffer_size_hint(hidden_bytes, self.group_size)
                self._nvl_bytes_needed[key] = needed
        else:
            needed = self._config(config, default, method).get_nvl_buffer_size_hint(
                hidden_bytes, self.group_size
            )
        if self.num_nvl_bytes < needed:
            raise ValueError(
                f"{method}: num_nvl_bytes={self.num_nvl_bytes} is too small: this call needs {needed} "
                f"bytes (config.get_nvl_buffer_size_hint(hidden_bytes={hidden_bytes}, "
                f"num_ranks={self.group_size})); create the Buffer with num_nvl_bytes >= {needed}"
            )

    def _wait(self, previous_event) -> None:
        if previous_event is None:
            return
        if not isinstance(previous_event, EventOverlap):
            raise TypeError(
                f"Buffer: previous_event must be an EventOverlap or None, got {type(previous_event).__name__}"
            )
        previous_event.current_stream_wait()

    def _event(self, async_finish: bool, tensors) -> EventOverlap:
        """With async_finish on CUDA: an event recorded now, keeping ``tensors`` alive."""
        if not async_finish or self.device.type != "cuda":
            return EventOverlap()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return EventOverlap(event, tuple(t for t in tensors if t is not None))

    def _raw_bytes(self, kind: str, num_bytes: int) -> torch.Tensor:
        if kind not in self._raw:
            self._raw[kind] = torch.zeros(num_bytes, dtype=torch.uint8, device=self.device)
        return self._raw[kind]


class _RejectOnError:
    """``Buffer._checks_of``'s context: on an exception, ``buffer._reject(op)``, then the exception
    goes on. A class rather than ``contextlib.contextmanager``, whose generator costs a few
    microseconds on every call."""

    __slots__ = ("buffer", "op")

    def __init__(self, buffer: Buffer, op: str):
        self.buffer, self.op = buffer, op

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is not None and issubclass(exc_type, Exception):
            self.buffer._reject(self.op)
        return False
