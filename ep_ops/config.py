"""``Config``: DeepEP's performance-tuning config, and the buffer sizes it implies.

The constructor, its defaults and the two size-hint methods match ``deep_ep.Config``; the size
formulas are ep_ops' own (see ``nvl_buffer_bytes`` and ``rdma_buffer_bytes``). The send-chunk
fields do not change a size; they are kept so DeepEP code that builds a Config runs unchanged.
"""

import dataclasses

NUM_MAX_NVL_PEERS = 8  # GPUs of one host that share an NVLink domain: NVL rings exist per peer
NUM_MAX_TOPK = 32  # top-k bound the size hints reserve room for
CONTROL_INTS_PER_RING = 4  # head, tail, start and end offset of one ring (int32 each)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def check_positive_int(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def token_bytes(hidden_bytes: int) -> int:
    """Bytes one token takes in a ring slot: the payload (``hidden_bytes``), FP8 scales counted
    conservatively as one float32 per 128 payload bytes, ``NUM_MAX_TOPK`` int64 expert ids and
    float32 weights, and the int32 source index."""
    return hidden_bytes + 4 * (hidden_bytes // 128) + NUM_MAX_TOPK * (8 + 4) + 4


def nvl_buffer_bytes(num_sms: int, num_recv_tokens: int, hidden_bytes: int, num_ranks: int) -> int:
    """NVLink buffer size: ``num_sms // 2`` channels, each with one receive ring of
    ``num_recv_tokens`` slots per NVLink peer (at most ``NUM_MAX_NVL_PEERS``), plus the ring
    control words and the int32 ``[peers, peers]`` rank prefix matrix; rounded up to 128 bytes."""
    num_channels = num_sms // 2
    num_peers = min(num_ranks, NUM_MAX_NVL_PEERS)
    rings = num_channels * num_peers
    num_bytes = rings * num_recv_tokens * token_bytes(hidden_bytes)
    num_bytes += rings * CONTROL_INTS_PER_RING * 4 + num_peers * num_peers * 4
    return _round_up(num_bytes, 128)


def rdma_buffer_bytes(num_sms: int, num_recv_tokens: int, hidden_bytes: int, num_ranks: int) -> int:
    """Inter-host buffer size: 0 within one host (``num_ranks <= NUM_MAX_NVL_PEERS``); otherwise
    a send and a receive ring of ``num_recv_tokens`` slots per channel and per host, plus control
    words; rounded up to 128 bytes. No normal-mode op of ep_ops reads this buffer today (the
    collective backend carries traffic between hosts); the hint keeps DeepEP's sizing logic."""
    if num_ranks <= NUM_MAX_NVL_PEERS:
        return 0
    num_channels = num_sms // 2
    num_hosts = -(-num_ranks // NUM_MAX_NVL_PEERS)
    rings = num_channels * num_hosts
    num_bytes = 2 * rings * (num_recv_tokens * token_bytes(hidden_bytes) + CONTROL_INTS_PER_RING * 4)
    return _round_up(num_bytes, 128)


@dataclasses.dataclass(frozen=True)
class Config:
    """Performance-tuning config of the normal (high-throughput) dispatch and combine.

    Arguments:
        num_sms: SMs the normal kernels use (even: half send, half receive; one channel per pair).
        num_max_nvl_chunked_send_tokens: tokens a sender moves per NVLink chunk.
        num_max_nvl_chunked_recv_tokens: slots of each NVLink receive ring.
        num_max_rdma_chunked_send_tokens: tokens a sender moves per inter-host chunk.
        num_max_rdma_chunked_recv_tokens: slots of each inter-host receive ring.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_positive_int(getattr(self, field.name), field.name)
        if self.num_sms % 2 != 0:
            raise ValueError(f"num_sms must be even (half send, half receive), got {self.num_sms}")
        for kind in ("nvl", "rdma"):
            send = getattr(self, f"num_max_{kind}_chunked_send_tokens")
            recv = getattr(self, f"num_max_{kind}_chunked_recv_tokens")
            if send >= recv:
                raise ValueError(
                    f"num_max_{kind}_chunked_send_tokens ({send}) must be smaller than "
                    f"num_max_{kind}_chunked_recv_tokens ({recv})"
                )

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Minimum ``num_nvl_bytes`` for a normal dispatch/combine with this config.

        Arguments:
            hidden_bytes: bytes of one token's payload, ``hidden * max(x.element_size(), 2)``.
            num_ranks: ranks of the group.
        """
        check_positive_int(hidden_bytes, "hidden_bytes")
        check_positive_int(num_ranks, "num_ranks")
        return nvl_buffer_bytes(self.num_sms, self.num_max_nvl_chunked_recv_tokens, hidden_bytes, num_ranks)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Minimum ``num_rdma_bytes`` for a normal dispatch/combine; 0 within one host.

        Arguments:
            hidden_bytes: bytes of one token's payload, ``hidden * max(x.element_size(), 2)``.
            num_ranks: ranks of the group.
        """
        check_positive_int(hidden_bytes, "hidden_bytes")
        check_positive_int(num_ranks, "num_ranks")
        return rdma_buffer_bytes(self.num_sms, self.num_max_rdma_chunked_recv_tokens, hidden_bytes, num_ranks)
