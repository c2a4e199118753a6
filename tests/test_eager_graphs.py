"""FusedMoE's CUDA graphs of eager small-T forwards (moe_ops.eager_graphs): the same
numbers as the eager launches, fresh outputs, weights followed, never inside a capture."""
import copy
import pickle

import pytest
import torch

import moe_ops
from conftest import ON_GPU
from helpers import capture
from moe_ops import eager_graphs
from moe_ops.configs import shrink
from moe_ops.module import FusedMoE

gpu_only = pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")


@pytest.fixture
def graphs_off_afterwards():
    yield
    moe_ops.set_eager_graphs(True)


def eager_output(moe, x):
    moe_ops.set_eager_graphs(False)
    try:
        return moe(x)
    finally:
        moe_ops.set_eager_graphs(True)


@gpu_only
@pytest.mark.parametrize("name", ["deepseek-v3", "qwen2-57b-a14b", "mixtral-8x7b"])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_replay_equals_eager_and_outputs_are_fresh(name, num_tokens, device, graphs_off_afterwards):
    moe = FusedMoE.from_config(shrink(name), dtype=torch.bfloat16, device=device)
    with torch.inference_mode():
        xs = [torch.randn(num_tokens, moe.config.hidden_size, device=device, dtype=torch.bfloat16)
              for _ in range(4)]
        outs = [moe(x) for x in xs]  # the second call captures, the later ones replay
        assert len(moe.eager_graphs._graphs) == 1
        for x, out in zip(xs, outs):  # earlier outputs survive later replays
            assert torch.equal(out, eager_output(moe, x))


@gpu_only
def test_weights_updated_in_place_or_replaced_are_followed(device, graphs_off_afterwards):
    moe = FusedMoE.from_config(shrink("qwen3-30b-a3b"), dtype=torch.bfloat16, device=device)
    x = torch.randn(2, moe.config.hidden_size, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            moe(x)
        moe.w_down.mul_(2)  # in place: the graph reads the new values
        assert torch.equal(moe(x), eager_output(moe, x))
        moe.w_down = torch.nn.Parameter(moe.w_down * -1, requires_grad=False)  # a new tensor
        assert torch.equal(moe(x), eager_output(moe, x))


@gpu_only
def test_not_used_inside_a_callers_capture(device):
    moe = FusedMoE.from_config(shrink("mixtral-8x7b"), dtype=torch.bfloat16, device=device)
    x = torch.randn(3, moe.config.hidden_size, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        graph, static_out = capture(lambda: moe(x))
        graph.replay()
        assert torch.equal(static_out, eager_output(moe, x))
    assert not moe.eager_graphs._graphs


@gpu_only
def test_large_token_counts_and_grad_run_eagerly(device):
    moe = FusedMoE.from_config(shrink("mixtral-8x7b"), dtype=torch.bfloat16, device=device)
    big = torch.randn(eager_graphs.MAX_TOKENS + 1, moe.config.hidden_size, device=device,
                      dtype=torch.bfloat16)
    small = big[:2].clone().requires_grad_()
    for _ in range(3):
        moe(big.detach())
        moe(small)  # an input that needs grad goes through the op (forward-only error path)
    assert not moe.eager_graphs._graphs


def test_copies_and_pickles_start_empty(device):
    moe = FusedMoE.from_config(shrink("mixtral-8x7b"), device=device)
    moe.eager_graphs._sightings["key"] = 1
    for clone in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert not clone.eager_graphs._sightings and not clone.eager_graphs._graphs
    assert not moe.eager_graphs.usable(torch.randn(1, 8))  # CPU tensors never replay a graph
