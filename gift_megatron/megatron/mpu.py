"""Megatron-Core's parallel state, imported on first use.

Importing :mod:`gift_megatron.megatron` must not import Megatron-Core (the package docstring says why), so
the modules that need its parallel state call :func:`parallel_state` where they use it.
"""

from __future__ import annotations

from types import ModuleType


def parallel_state() -> ModuleType:
    """``megatron.core.parallel_state``: the process groups and ranks of the TP/PP/CP/DP/EP layout."""
    from megatron.core import parallel_state as ps

    return ps
