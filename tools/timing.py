"""How the tools and benchmarks time a call: one module, so every table means the same thing.

    median_event_ms   CUDA events around each of n calls, median (a GPU)
    median_wall_ms    time.perf_counter around each of n calls, median (a CPU)
    Timer             triton.testing.do_bench's median, L2 flushed between calls, on a GPU;
                      median_wall_ms on a CPU; says which in ``describe()``
    capture_graph     one call captured in a CUDA graph, for replay timings
"""
from __future__ import annotations

import statistics
import time

import torch

from tools.cli import on_gpu


def median_event_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median ms of ``iters`` calls of ``fn``, each between two CUDA events, after ``warmup``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def median_wall_ms(fn, iters: int, warmup: int = 1) -> float:
    """Median wall-clock ms of ``iters`` calls after ``warmup`` (for CPU runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class Timer:
    """``triton.testing.do_bench`` median (CUDA events, L2 flushed before every call) on a
    GPU; on a CPU the median of ``cpu_reps`` wall-clock calls after ``cpu_warmup``."""

    def __init__(self, warmup_ms: float, rep_ms: float, cpu_reps: int = 1, cpu_warmup: int = 1):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.cpu_reps, self.cpu_warmup = cpu_reps, cpu_warmup
        self.gpu = on_gpu()

    def __call__(self, fn) -> float:
        """Milliseconds per call of ``fn``."""
        if not self.gpu:
            return median_wall_ms(fn, self.cpu_reps, self.cpu_warmup)
        import triton.testing

        return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                       return_mode="median")

    def describe(self) -> str:
        """One line for a result's header: how its times were taken."""
        if self.gpu:
            return (f"median of per-call CUDA-event timings, triton.testing.do_bench "
                    f"(warmup {self.warmup_ms} ms, rep {self.rep_ms} ms), L2 flushed between calls")
        return (f"median of {self.cpu_reps} time.perf_counter timings after "
                f"{self.cpu_warmup} warm-up call{'s' * (self.cpu_warmup != 1)} (CPU)")

    def replayed(self, fn) -> float:
        """Milliseconds per call of ``fn`` replayed from a CUDA graph (CPU: called as is).

        Replay, not eager calls, where kernels are compared: an eager forward spends a few
        hundred microseconds in Python, which at small T hides the kernels.
        """
        if not self.gpu:
            return self(fn)
        graph, _ = capture_graph(fn)
        try:
            return self(graph.replay)
        finally:
            del graph


def capture_graph(fn):
    """Warm ``fn`` up on a side stream, capture one call; returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out
