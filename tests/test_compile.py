"""torch.compile(fullgraph=True) captures the ops without a graph break, static or dynamic."""
import pytest
import torch

import moe_ops  # noqa: F401
from moe_ops.configs import shrink
from moe_ops.reference import moe_reference

from helpers import ALLOW_NON_FINITE, assert_close_l2
from test_ops import make_layer

CONFIG = shrink("deepseek-v3")


def moe_block(x, router, w_gate_up, w_down, bias):
    """A user's function: a residual around the fused MoE op."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.tritonmoe.fused_moe(flat, router, w_gate_up, w_down, score_bias=bias,
                                        **CONFIG.routing_kwargs())
    return x + out.view_as(x)


def split_block(x, router, w_gate_up, w_down, bias):
    """The same through route + fused_experts."""
    weights, ids = torch.ops.tritonmoe.route(x, router, score_bias=bias, **CONFIG.routing_kwargs())
    return torch.ops.tritonmoe.fused_experts(x, weights, ids, w_gate_up, w_down)


@pytest.fixture
def layer(device):
    return make_layer(CONFIG, torch.float32, device)


def test_explain_shows_no_graph_break(layer, device):
    x = torch.randn(2, 5, CONFIG.hidden_size, device=device)
    explanation = torch._dynamo.explain(moe_block)(x, *layer)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.parametrize("fn", [moe_block, split_block])
def test_static_compile_matches_eager(fn, layer, device):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    x = torch.randn(9, CONFIG.hidden_size, device=device)
    assert_close_l2(compiled(x, *layer), fn(x, *layer), 1e-6)


def test_dynamic_compile_over_token_counts_without_recompiling(layer, device):
    torch._dynamo.reset()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = torch.compile(moe_block, fullgraph=True, dynamic=True, backend=counting_backend)
    for num_tokens in (3, 8, 17, 30):
        x = torch.randn(num_tokens, CONFIG.hidden_size, device=device)
        ref = x + moe_reference(x, *layer[:3], score_bias=layer[3], **CONFIG.routing_kwargs())
        assert_close_l2(compiled(x, *layer), ref, 1e-4)
    assert len(compiles) == 1


def test_dynamic_compile_inductor(layer, device):
    torch._dynamo.reset()
    compiled = torch.compile(moe_block, fullgraph=True, dynamic=True)
    for num_tokens in (4, 11):
        x = torch.randn(num_tokens, CONFIG.hidden_size, device=device)
        assert_close_l2(compiled(x, *layer), moe_block(x, *layer), 1e-6)


@pytest.mark.filterwarnings("ignore:Error detected in:UserWarning")  # torch echoes our error
def test_compiling_with_weights_that_require_grad_names_the_fix(layer, device):
    router, w_gate_up, w_down, bias = layer
    x = torch.randn(5, CONFIG.hidden_size, device=device)
    compiled = torch.compile(moe_block, fullgraph=True)
    with pytest.raises(Exception, match="forward-only.*torch.no_grad"):
        compiled(x, router, w_gate_up.requires_grad_(), w_down, bias)


MIXTRAL = shrink("mixtral-8x7b")


def mixtral_block(x, router, w_gate_up, w_down):
    """A residual around softmax routing, whose NaN once became a silent zero."""
    return x + torch.ops.tritonmoe.fused_moe(x, router, w_gate_up, w_down,
                                             **MIXTRAL.routing_kwargs())


@ALLOW_NON_FINITE
def test_compiled_non_finite_token_matches_eager(device):
    """Compiled (dynamic: one graph for both routing paths), a NaN token's row is NaN as
    in eager mode, and the other rows stay finite."""
    torch._dynamo.reset()
    layer = make_layer(MIXTRAL, torch.float32, device)[:3]
    compiled = torch.compile(mixtral_block, fullgraph=True, dynamic=True)
    for num_tokens in (5, 40):  # the decode path and the token-block path
        x = torch.randn(num_tokens, MIXTRAL.hidden_size, device=device)
        x[2, 3] = float("nan")
        out = compiled(x, *layer)
        others = torch.arange(num_tokens, device=device) != 2
        assert torch.isnan(out[2]).all() and torch.isfinite(out[others]).all()
        torch.testing.assert_close(out, mixtral_block(x, *layer), rtol=0, atol=0, equal_nan=True)
