"""ep_ops: expert-parallel dispatch/combine as torch.library ops.

Importing the package loads the compiled ops (``ep_ops._C``), their fakes (``ep_ops.meta``),
their autograd formulas and the compiler annotations, then exposes the Python surfaces.
"""

from ._loader import load_library

load_library()

from . import autograd as _autograd  # noqa: E402,F401  (registers autograd formulas)
from . import meta  # noqa: E402,F401  (registers the fakes)
from ._side_effects import mark_communication_ops  # noqa: E402

mark_communication_ops()

# fused_a2a, token_dispatcher, moe_layer: the MoE integration (Megatron/NeMo drop-ins, example
# layer), Python over the ops; gather_scatter registers the ep_ops_py all-gather/reduce-scatter.
from . import functional, fused_a2a, gather_scatter, permute, token_dispatcher  # noqa: E402
from .buffer import Buffer  # noqa: E402
from .config import Config  # noqa: E402
from .event import EventOverlap  # noqa: E402
from .moe_layer import MoELayer  # noqa: E402
from .token_dispatcher import MoEConfig, MoEFlexTokenDispatcher  # noqa: E402

__all__ = [
    "Buffer",
    "Config",
    "EventOverlap",
    "MoEConfig",
    "MoEFlexTokenDispatcher",
    "MoELayer",
    "functional",
    "fused_a2a",
    "gather_scatter",
    "meta",
    "permute",
    "token_dispatcher",
]
