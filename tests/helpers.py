"""Comparison helpers shared by the tests."""
from __future__ import annotations

import math

import torch


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when either holds a NaN or an inf."""
    out, ref = out.double(), ref.double()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return math.inf
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_l2(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Fail on a shape mismatch, any NaN/inf, or relative L2 error above tol."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_l2(out, ref)
    assert err <= tol, f"relative L2 error {err:.3e} > {tol:.1e}"


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) or -1 (ints) so an unwritten element fails the comparison."""
    return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
