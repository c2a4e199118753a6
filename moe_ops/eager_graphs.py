"""CUDA graphs of a layer's forward for the small token counts of eager decoding.

In eager mode (Hugging Face ``generate`` without ``torch.compile``) one MoE layer's
forward at T=1 is a handful of kernels of a few microseconds each, behind ~0.5 ms of
host work: Python, argument binding and five Triton launches. A CUDA graph replays the
same kernels for ~5 us of host time. ``EagerGraphs`` keeps, per layer, graphs of its
forward for token counts up to ``MAX_TOKENS`` that recur (decoding runs the same T
step after step); other calls run eagerly.

A graph is keyed by everything it froze: the input's shape, dtype, device and the
current stream, and the address, shape and dtype of every weight (a weight replaced
or moved gets a new graph; one updated in place is read afresh at every replay).
Each call copies its input into the graph's static input, replays, and returns a
clone of the static output, so no two calls share an output. A token count is
captured the second time it is seen, so one-off prefill sizes never pay for capture.
A layer's graphs of one device and stream share one memory pool (their replays are
serialised on that stream and each output is cloned before the next replay).

Never used while the caller captures a graph of its own, while compiling or tracing;
``moe_ops.set_eager_graphs(False)`` switches them off. A replay reuses the layer's static
buffers, so one layer must not be called from several host threads at once (as with
any CUDA-graph runner).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable

import torch

MAX_TOKENS = 64  # decode and small-batch sizes, where host time dominates
MAX_GRAPHS = 8  # per layer; the least recently used graph goes first
CAPTURE_ON_SIGHTING = 2  # capture a key the second time it is seen

_enabled = True


def set_eager_graphs(enabled: bool) -> None:
    """Turn the CUDA graphs of eager small-T forwards on (the default) or off."""
    global _enabled
    _enabled = bool(enabled)


class _Captured:
    """One captured forward: replay after copying the input into ``static_x``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, place, pool):
        self.place, self.pool = place, pool
        self.static_x = x.clone(memory_format=torch.contiguous_format)
        # Warm-up on a side stream, as graph capture requires; kernels are compiled by now.
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            fn(self.static_x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.static_out = fn(self.static_x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


class EagerGraphs:
    """A layer's cache of captured forwards (see the module docstring). Copies and
    pickles of the layer start with an empty cache."""

    def __init__(self):
        self._graphs: OrderedDict = OrderedDict()
        self._sightings: dict = {}
        self._failed = False

    def __deepcopy__(self, memo):
        return EagerGraphs()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def clear(self) -> None:
        """Drop every captured graph (their memory returns to the pool)."""
        self._graphs.clear()
        self._sightings.clear()

    def usable(self, x: torch.Tensor) -> bool:
        """Whether a call on x [T, H] may go through a graph (metadata only)."""
        return (_enabled and not self._failed and x.is_cuda and 0 < x.shape[0] <= MAX_TOKENS
                and not torch.cuda.is_current_stream_capturing())

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
            weights: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        """``fn(x)``, replayed from a graph when this key has one (captured on its
        second sighting), else run eagerly."""
        stream = torch.cuda.current_stream(x.device)
        place = (x.device.index, stream.stream_id)
        key = (tuple(x.shape), x.dtype, place, tuple(None if w is None else (w.data_ptr(), w.shape, w.dtype) for w in weights))
        captured = self._graphs.get(key)
        if captured is not None:
            self._graphs.move_to_end(key)
            return captured(x)
        seen = self._sightings.get(key, 0) + 1
        if seen < CAPTURE_ON_SIGHTING:
            if len(self._sightings) >= 4 * MAX_GRAPHS:
                self._sightings.clear()  # many one-off keys: forget them, stay bounded
            self._sightings[key] = seen
            return fn(x)
        self._sightings.pop(key, None)
        # One pool per device and stream, reused only while a graph in it lives (a
        # handle whose graphs are all gone must not be captured into again).
        pool = next((g.pool for g in self._graphs.values() if g.place == place), None)
        try:
            captured = _Captured(fn, x, place, pool or torch.cuda.graph_pool_handle())
        except RuntimeError as error:
            # A forward that cannot be captured here (another thread capturing on the
            # legacy stream, ...) keeps running eagerly, as it did before.
            self._failed = True
            warnings.warn(f"moe_ops: eager CUDA graphs are off for this layer, its capture "
                          f"failed: {error}", RuntimeWarning, stacklevel=3)
            return fn(x)
        self._graphs[key] = captured
        if len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return captured(x)
