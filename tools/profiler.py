"""The GPU activities of one call, from torch.profiler: which kernels a forward launches and
how long each runs. Only observes: call the function once before (compilation, caches)."""
from __future__ import annotations

import statistics
from collections import Counter

import torch

_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2, as in triton.testing.do_bench
_flush_buffer: torch.Tensor | None = None


def flush_l2(device: torch.device | str = "cuda") -> None:
    """Overwrite a 256 MiB buffer so no operand stays in L2."""
    global _flush_buffer
    if _flush_buffer is None or _flush_buffer.device != torch.device(device):
        _flush_buffer = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=device)
    _flush_buffer.zero_()


def profile_kernels(fn, runs: int = 1, flush: bool = True) -> list[tuple[str, float]]:
    """GPU activities (kernels, memsets, memcpys) of one call of ``fn``, in issue order, as
    (name, median duration in us over ``runs`` profiled calls). Empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    per_run = []
    for _ in range(runs):
        if flush:
            flush_l2()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        events.sort(key=lambda e: e.time_range.start)
        per_run.append([(e.name, e.time_range.elapsed_us()) for e in events])
    names = [name for name, _ in per_run[0]]
    if any([n for n, _ in run] != names for run in per_run):
        return per_run[0]  # a data-dependent number of launches: report the first call
    return [(name, statistics.median(run[j][1] for run in per_run))
            for j, name in enumerate(names)]


def count_launches(fn, most_common: int = 12) -> tuple[int | None, list]:
    """(GPU activities in one call, [[name, count], ...] of the ``most_common`` names);
    (None, []) without CUDA."""
    if not torch.cuda.is_available():
        return None, []
    kernels = profile_kernels(fn, runs=1, flush=False)
    if not kernels:  # CUPTI unavailable or not permitted: say so rather than report 0
        return None, [["torch.profiler saw no GPU activity", 0]]
    names = Counter(name for name, _ in kernels)
    return len(kernels), [[n, c] for n, c in names.most_common(most_common)]
