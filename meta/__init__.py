"""Fake (meta) implementations of every ep_ops op: the shape, stride, dtype and device contract.

Importing this package registers one ``register_fake`` per op. The schemas in ``csrc/ops.cpp``
point here with ``set_python_module("ep_ops.meta")``, so a fake-tensor trace finds the fakes even
when only the compiled library was loaded.
"""

from . import combine, dispatch, layout, low_latency, nvl_buffer, permuted  # noqa: F401  (registration side effects)
