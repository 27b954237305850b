"""Loads the compiled library; a missing build fails here, once, with the fix in the message."""

import importlib

import torch  # noqa: F401  (loads libtorch, which the extension links against)


def load_library():
    try:
        return importlib.import_module("ep_ops._C")
    except ImportError as error:
        raise ImportError(
            "ep_ops: the compiled extension ep_ops._C could not be loaded "
            f"({error}). Build it from the repository root with "
            "`pip install --no-build-isolation -e .` (needs torch, ninja and a C++ compiler)."
        ) from error
