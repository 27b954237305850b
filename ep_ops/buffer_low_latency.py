"""``Buffer``'s low-latency methods (DeepEP's ``low_latency_dispatch`` / ``low_latency_combine``
and their helpers), kept apart from the normal-mode half in ``buffer.py``. ``Buffer`` inherits
them; they use its group, checks and events."""

import time

import torch

from ep_ops.meta.low_latency import dispatch_outputs

from ._buffer_args import _check_handle_tuple, _check_tensor, _no_op
from .config import NUM_MAX_TOPK, check_positive_int
from .nvl import ll_bytes_needed

LOW_LATENCY_HANDLE = (
    "(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts, recv_token_slots)"
)


def _unpack_ll_handle(handle, method: str):
    return _check_handle_tuple(handle, 6, LOW_LATENCY_HANDLE, "Buffer.low_latency_dispatch", method)


class LowLatencyMethods:
    """Mixed into ``Buffer``: the low-latency mode (graph-capturable decode-sized calls)."""

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Minimum ``num_rdma_bytes`` for low-latency calls with these sizes and top-k up to 32:
        ``ep_ops.nvl.ll_bytes_needed(M, hidden, R, 32)``, i.e. 64 KiB of control words plus two
        alternating slabs of one row per (source rank, token slot) for dispatch rows, weights and
        combine partials: per rank, not per expert, so ~130x less than DeepEP's hint for its
        reference decode workload. All ranks must use the same ``num_max_dispatch_tokens_per_rank``."""
        for name, value in (
            ("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
            ("hidden", hidden),
            ("num_ranks", num_ranks),
            ("num_experts", num_experts),
        ):
            check_positive_int(value, name)
        if num_experts % num_ranks != 0:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of num_ranks ({num_ranks})")
        return ll_bytes_needed(num_max_dispatch_tokens_per_rank, hidden, num_ranks, NUM_MAX_TOPK)

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """Zero the zero-copy combine buffers (arguments checked as in the low-latency calls)."""
        self._check_alive()
        self._check_low_latency(
            "Buffer.clean_low_latency_buffer", num_max_dispatch_tokens_per_rank, hidden, num_experts, 0
        )
        for buffer in self._combine_buffers:
            if buffer is not None:
                buffer.zero_()

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """Dispatch a decode-sized batch into a static per-expert layout (graph-capturable).

        R = group size, M = num_max_dispatch_tokens_per_rank, E_local = num_experts / R.

        Arguments:
            x: ``[num_tokens, hidden]`` bfloat16, num_tokens <= M.
            topk_idx: ``[num_tokens, num_topk]`` int64 expert ids, -1 = none.
            num_max_dispatch_tokens_per_rank: M, the same on every rank.
            num_experts: total experts, a multiple of R.
            cumulative_local_expert_recv_stats: optional ``[E_local]`` int32; ``recv_count`` is added.
            dispatch_wait_recv_cost_stats: optional ``[R]`` int64; the nanoseconds this rank spent
                in the receive step are added to **every** entry (the collective backend cannot
                attribute the wait to one peer). Measured on the host: the wait itself for CPU
                tensors; on CUDA only the time to issue the work. Not allowed during graph capture.
            use_fp8: cast to float8_e4m3fn with float32 scales per 128 channels.
            round_scale: scales rounded up to powers of 2. use_ue8m0: scales packed as UE8M0
                (needs round_scale).
            async_finish: return an event (CUDA); not with return_recv_hook.
            return_recv_hook: only send now; the returned hook receives, filling the returned
                tensors in place (and updating the stats). Call it once before reading them.

        Returns:
            recv_x: ``[E_local, R*M, hidden]`` bfloat16, or with use_fp8 a pair of that shape in
                float8_e4m3fn and scales ``[E_local, R*M, hidden / 128]`` float32 (UE8M0:
                ``hidden / 512`` int32), scales column-major in the last two dims;
            recv_count ``[E_local]`` int32 valid rows per expert; handle
            ``(src_info, layout_range, M, hidden, num_experts, recv_token_slots)``; event; hook
            (a no-op callable without return_recv_hook).
        """
        method = "Buffer.low_latency_dispatch"
        # Both forms start with low_latency_dispatch_send's header exchange.
        with self._checks_of("low_latency_dispatch_send"):
            self._check_alive()
            _check_tensor(x, "x", method, shape=(None, None))
            _check_tensor(topk_idx, "topk_idx", method, shape=(None, None))
            self._check_device(x, "x", method)
            hidden, num_topk = x.size(1), topk_idx.size(1)
            num_local_experts = self._check_low_latency(
                method, num_max_dispatch_tokens_per_rank, hidden, num_experts, num_topk
            )
            if async_finish and return_recv_hook:
                raise ValueError(f"{method}: async_finish and return_recv_hook cannot both be set")
            recv_stats = cumulative_local_expert_recv_stats
            if recv_stats is not None:
                _check_tensor(
                    recv_stats,
                    "cumulative_local_expert_recv_stats",
                    method,
                    torch.int32,
                    (num_local_experts,),
                )
                self._check_device(recv_stats, "cumulative_local_expert_recv_stats", method)
            wait_stats = dispatch_wait_recv_cost_stats
            self._check_wait_stats(wait_stats, "dispatch_wait_recv_cost_stats", method)

        ops = torch.ops.ep_ops
        args = (x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8, round_scale, use_ue8m0)
        if return_recv_hook:
            recv_packed = ops.low_latency_dispatch_send(*args, self.group_name)
            outputs = dispatch_outputs(
                x, self.group_size, num_max_dispatch_tokens_per_rank, hidden, num_topk,
                num_experts, use_fp8, use_ue8m0,
            )  # fmt: skip

            def recv_op():
                return ops.low_latency_dispatch_recv(
                    recv_packed, num_max_dispatch_tokens_per_rank, hidden, num_topk,
                    num_experts, use_fp8, use_ue8m0, self.group_name,
                )  # fmt: skip

            def fill(received) -> None:
                for out, value in zip(outputs, received, strict=True):
                    out.set_(value)  # the received tensors become the returned ones, no copy
                if recv_stats is not None:
                    recv_stats.add_(outputs[2])

            hook = self._once(recv_op, fill, wait_stats)
        else:
            outputs = self._timed(lambda: ops.low_latency_dispatch(*args, self.group_name), wait_stats)
            if recv_stats is not None:
                recv_stats.add_(outputs[2])
            hook = _no_op

        recv_x, recv_x_scales, recv_count, src_info, layout_range, recv_token_slots = outputs
        handle = (
            src_info,
            layout_range,
            num_max_dispatch_tokens_per_rank,
            hidden,
            num_experts,
            recv_token_slots,
        )
        event = self._event(async_finish, (x, topk_idx, *outputs, recv_stats))
        return (recv_x, recv_x_scales) if use_fp8 else recv_x, recv_count, handle, event, hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ):
        """Weighted sum over each token's top-k experts, back on the token's rank.

        Arguments:
            x: ``[E_local, R*M, hidden]`` bfloat16 expert outputs in low_latency_dispatch's layout.
            topk_idx: ``[num_tokens, num_topk]`` int64, as passed to low_latency_dispatch.
            topk_weights: ``[num_tokens, num_topk]`` float32.
            handle: the handle from ``low_latency_dispatch``.
            use_logfmt: partial sums cross the link LogFMT-10 encoded (lossy, fewer bytes).
            zero_copy: read the expert output from the tensor ``get_next_low_latency_combine_buffer``
                returned (x only gives the shape).
            async_finish, return_recv_hook: as in low_latency_dispatch; the hook fills the
                returned tensor in place.
            out: optional ``[num_tokens, hidden]`` bfloat16; the result is written there and returned.
            combine_wait_recv_cost_stats: optional ``[R]`` int64, as dispatch_wait_recv_cost_stats.

        Returns:
            combined_x ``[num_tokens, hidden]`` bfloat16, event, hook.
        """
        method = "Buffer.low_latency_combine"
        # Both forms start with low_latency_combine_send's header exchange.
        with self._checks_of("low_latency_combine_send"):
            self._check_alive()
            _, _, num_max, hidden, num_experts, recv_token_slots = _unpack_ll_handle(handle, method)
            _check_tensor(topk_idx, "topk_idx", method, shape=(None, None))
            num_local_experts = self._check_low_latency(
                method, num_max, hidden, num_experts, topk_idx.size(1)
            )
            expert_shape = (num_local_experts, self.group_size * num_max, hidden)
            _check_tensor(x, "x", method, shape=expert_shape)
            self._check_device(x, "x", method)
            if async_finish and return_recv_hook:
                raise ValueError(f"{method}: async_finish and return_recv_hook cannot both be set")
            num_tokens = topk_idx.size(0)
            if out is not None:
                _check_tensor(out, "out", method, torch.bfloat16, (num_tokens, hidden))
                self._check_device(out, "out", method)
            wait_stats = combine_wait_recv_cost_stats
            self._check_wait_stats(wait_stats, "combine_wait_recv_cost_stats", method)
            if zero_copy:
                x = self._combine_buffers[self._combine_index]
                if x is None or tuple(x.shape) != expert_shape:
                    raise ValueError(
                        f"{method}: zero_copy=True reads the expert output from the tensor that "
                        "Buffer.get_next_low_latency_combine_buffer(handle) returns; call it and fill "
                        "that tensor before this call"
                    )
        self._combine_index ^= 1

        ops = torch.ops.ep_ops
        args = (x, topk_idx, topk_weights, recv_token_slots, num_max, use_logfmt, self.group_name)
        if return_recv_hook:
            recv_partials = ops.low_latency_combine_send(*args)
            combined_x = out if out is not None else x.new_empty((num_tokens, hidden), dtype=torch.bfloat16)

            def recv_op():
                return ops.low_latency_combine_recv(
                    recv_partials, topk_idx, hidden, num_experts, num_max, use_logfmt, self.group_name
                )

            fill = combined_x.copy_ if out is not None else combined_x.set_
            hook = self._once(recv_op, fill, wait_stats)
        else:
            combined_x = self._timed(lambda: ops.low_latency_combine(*args), wait_stats)
            if out is not None:
                combined_x = out.copy_(combined_x)
            hook = _no_op
        event = self._event(async_finish, (x, topk_idx, topk_weights, recv_token_slots, combined_x))
        return combined_x, event, hook

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The ``[E_local, R*M, hidden]`` bfloat16 tensor the next ``low_latency_combine(...,
        zero_copy=True)`` reads; fill it with the expert output. The Buffer owns two and
        alternates between them on every low_latency_combine call (allocated once per shape)."""
        self._check_alive()
        method = "Buffer.get_next_low_latency_combine_buffer"
        _, _, num_max, hidden, num_experts, _ = _unpack_ll_handle(handle, method)
        shape = (num_experts // self.group_size, self.group_size * num_max, hidden)
        buffer = self._combine_buffers[self._combine_index]
        if buffer is None or tuple(buffer.shape) != shape:
            buffer = torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
            self._combine_buffers[self._combine_index] = buffer
        return buffer

    def _check_low_latency(
        self, method: str, num_max: int, hidden: int, num_experts: int, num_topk: int
    ) -> int:
        """Checks the low-latency sizes and num_rdma_bytes; returns E_local."""
        key = (num_max, hidden, num_experts, num_topk)
        sizes = self._ll_bytes_needed.get(key)
        if sizes is None:
            hint = self.get_low_latency_rdma_size_hint(num_max, hidden, self.group_size, num_experts)
            sizes = self._ll_bytes_needed[key] = (
                hint,
                max(hint, ll_bytes_needed(num_max, hidden, self.group_size, num_topk)),
            )
        hint, needed = sizes
        if self.num_rdma_bytes < needed:
            source = (
                f"Buffer.get_low_latency_rdma_size_hint({num_max}, {hidden}, {self.group_size}, {num_experts})"
                if needed == hint
                else f"num_topk={num_topk} is above the {NUM_MAX_TOPK} the size hint assumes"
            )
            raise ValueError(
                f"{method}: num_rdma_bytes={self.num_rdma_bytes} is too small: this call needs "
                f"{needed} bytes ({source}); create the Buffer with num_rdma_bytes >= {needed}"
            )
        return num_experts // self.group_size

    def _check_wait_stats(self, stats, name: str, method: str) -> None:
        if stats is None:
            return
        _check_tensor(stats, name, method, torch.int64, (self.group_size,))
        self._check_device(stats, name, method)
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise ValueError(
                f"{method}: {name} is measured on the host and cannot be used during CUDA graph capture"
            )

    @staticmethod
    def _timed(op, wait_stats):
        """Runs ``op()``; adds its host time in nanoseconds to every entry of ``wait_stats``."""
        start = time.perf_counter_ns()
        result = op()
        if wait_stats is not None:
            wait_stats.add_(time.perf_counter_ns() - start)
        return result

    def _once(self, recv_op, fill, wait_stats):
        """A receive hook: runs ``fill(recv_op())`` on its first successful call, nothing
        afterwards. A call that raises (the Buffer was destroyed, the receive op failed) leaves the
        hook pending, so the next call raises again instead of returning with the outputs unfilled.
        (The receive ops are local: calling one again involves no peer.)"""
        done = False

        def hook() -> None:
            nonlocal done
            if done:
                return
            self._check_alive()
            fill(self._timed(recv_op, wait_stats))
            done = True

        return hook
