"""NVTX ranges ``tritonmoe/<stage>`` around each stage of an op body.

Uses the ``nvtx`` package where installed (works with or without a GPU), else
``torch.cuda.nvtx`` on CUDA builds, else nothing. A range costs next to nothing when no
profiler is attached. Call only inside op bodies: traced code never sees it.
"""
from __future__ import annotations

import contextlib
import functools

import torch

try:
    import nvtx as _nvtx
except ImportError:  # the package is optional on GPU images that lack it
    _nvtx = None


@functools.cache
def _range_factory():
    """Which library marks the ranges, decided once (the answer cannot change)."""
    if _nvtx is not None:
        return lambda name: _nvtx.annotate(name, domain="tritonmoe")
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range
    return lambda name: contextlib.nullcontext()


def stage_range(stage: str):
    """A context manager marking one pipeline stage for Nsight Systems / rocprof."""
    return _range_factory()(f"tritonmoe/{stage}")
