"""A device's measured ceilings: copy bandwidth and matmul rate, which the roofline's
floors divide by (``tools.roofline``).

On a GPU: a 1 GiB device-to-device copy (bytes read + written) and an 8192^3 matmul in the
layer's dtype, each the median of CUDA-event timings. On a CPU both are measured small so
the code paths run; those numbers say nothing about a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_ops.dtypes import dtype_name
from tools.timing import median_event_ms, median_wall_ms


@dataclass(frozen=True)
class Ceilings:
    """A device's measured copy bandwidth (bytes/s) and matmul rate (flop/s)."""

    device: str
    bandwidth: float
    matmul_rate: float
    dtype: str
    note: str = ""


_MEASURED: dict[tuple[str, torch.dtype], Ceilings] = {}


def measure_ceilings(device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> Ceilings:
    """The ceilings of ``device`` (default: the current GPU, else the CPU); cached per process."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key not in _MEASURED:
        _MEASURED[key] = _measure_gpu(device, dtype) if device.type == "cuda" else _measure_cpu()
    return _MEASURED[key]


def _measure_gpu(device: torch.device, dtype: torch.dtype) -> Ceilings:
    copy_bytes, n = 1 << 30, 8192
    with torch.cuda.device(device):
        copy_ms = _copy_ms(copy_bytes, device, median_event_ms, iters=20)
        mm_ms = _matmul_ms(n, dtype, device, median_event_ms, iters=10)
        torch.cuda.empty_cache()
    return Ceilings(torch.cuda.get_device_name(device), 2 * copy_bytes / (copy_ms * 1e-3),
                    2 * n**3 / (mm_ms * 1e-3), dtype_name(dtype),
                    f"copy {copy_bytes >> 20} MiB, matmul {n}^3 {dtype_name(dtype)}")


def _measure_cpu() -> Ceilings:
    copy_bytes, n = 32 << 20, 512
    copy_ms = _copy_ms(copy_bytes, "cpu", median_wall_ms, iters=5)
    mm_ms = _matmul_ms(n, torch.float32, "cpu", median_wall_ms, iters=5)
    return Ceilings("cpu", 2 * copy_bytes / (copy_ms * 1e-3), 2 * n**3 / (mm_ms * 1e-3),
                    "float32", "CPU, tiny sizes: not a GPU ceiling")


def _copy_ms(nbytes: int, device, median, iters: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return median(lambda: dst.copy_(src), iters=iters)


def _matmul_ms(n: int, dtype: torch.dtype, device, median, iters: int) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return median(lambda: torch.mm(a, b), iters=iters)


def measure_fp8_rate(device: torch.device | str = "cuda", n: int = 8192) -> float | None:
    """flop/s of an n^3 e4m3 ``torch._scaled_mm`` (row-wise float32 scales, bf16 out): the
    fp8 floors' rate; None where the device or the build has no fp8 matmul."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
        scale_a = torch.ones(n, 1, device=device)
        scale_b = torch.ones(1, n, device=device)
        ms = median_event_ms(lambda: torch._scaled_mm(a, b, scale_a, scale_b,
                                                      out_dtype=torch.bfloat16, use_fast_accum=True),
                             iters=10)
    except RuntimeError:  # no fp8 matmul on this GPU or build
        return None
    finally:
        torch.cuda.empty_cache()
    return 2 * n**3 / (ms * 1e-3)
