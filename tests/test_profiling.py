"""NVTX ranges: every stage of an op body is marked, with or without a profiler."""
import contextlib

import pytest
import torch

import moe_ops  # noqa: F401
from moe_ops import profiling
from moe_ops.configs import shrink

from test_ops import make_layer


class RecordingNvtx:
    """Stands in for the nvtx package and records the ranges opened."""

    def __init__(self):
        self.names = []

    def annotate(self, message, domain=None):
        self.names.append((domain, message))
        return contextlib.nullcontext()


@pytest.fixture
def recorder(monkeypatch):
    """Route stage_range through a RecordingNvtx for one test (the range backend is chosen
    once per process, so the choice is dropped before and after)."""
    recording = RecordingNvtx()
    monkeypatch.setattr(profiling, "_nvtx", recording)
    profiling._range_factory.cache_clear()
    yield recording
    profiling._range_factory.cache_clear()


def test_stage_range_works_without_a_profiler():
    with profiling.stage_range("route"):
        pass


@pytest.mark.parametrize("num_tokens", [5, 40])  # the decode path and the token-block path
def test_fused_moe_marks_its_five_stages(recorder, num_tokens, device):
    config = shrink("qwen3-30b-a3b")
    router, w_gate_up, w_down, _ = make_layer(config, torch.float32, device)
    x = torch.randn(num_tokens, config.hidden_size, device=device)
    torch.ops.tritonmoe.fused_moe(x, router, w_gate_up, w_down, **config.routing_kwargs())
    assert recorder.names == [("tritonmoe", f"tritonmoe/{stage}")
                              for stage in ("route", "align", "gate_up", "down", "combine")]


@pytest.mark.parametrize("num_tokens,stages", [
    (3, ("align", "gate_up", "down", "combine")),  # decode: ranks inside the align launch
    (40, ("rank", "align", "gate_up", "down", "combine")),
])
def test_fused_experts_marks_its_stages(recorder, num_tokens, stages, device):
    config = shrink("mixtral-8x7b")
    router, w_gate_up, w_down, _ = make_layer(config, torch.float32, device)
    x = torch.randn(num_tokens, config.hidden_size, device=device)
    weights, ids = torch.ops.tritonmoe.route(x, router, 2)
    recorder.names.clear()
    torch.ops.tritonmoe.fused_experts(x, weights, ids, w_gate_up, w_down)
    assert [name for _, name in recorder.names] == [f"tritonmoe/{stage}" for stage in stages]
