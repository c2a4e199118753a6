"""FusedMoE: every real model config (shrunk) against the reference, shapes, compile."""
import pytest
import torch

from helpers import (ALLOW_NON_FINITE, TOLERANCE, assert_close_l2, assert_rows_unchanged,
                     drop_routing_near_ties, skip_bf16_on_cpu)
from moe_ops.configs import CONFIGS, shrink
from moe_ops.module import FusedMoE
from moe_ops.reference import moe_reference, swiglu_mlp_reference

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def module_reference(moe: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    """moe_reference on the routed experts plus the (gated) shared SwiGLU MLP."""
    config = moe.config
    flat = x.reshape(-1, x.shape[-1])
    out = moe_reference(flat, moe.router_weight, moe.w_gate_up, moe.w_down,
                        score_bias=moe.score_bias, **config.routing_kwargs())
    if moe.shared_gate_up is not None:
        shared = swiglu_mlp_reference(flat, moe.shared_gate_up, moe.shared_down).float()
        if moe.shared_gate is not None:
            shared = torch.sigmoid(flat.float() @ moe.shared_gate.float().t()) * shared
        out = (out.float() + shared).to(x.dtype)
    return out.reshape(x.shape)


def test_construction_initialises_the_weights(device):
    """FusedMoE(config) draws its weights as nn.Linear would: the output is finite."""
    moe = FusedMoE(shrink("deepseek-v3"), device=device)
    with torch.no_grad():
        out = moe(torch.randn(5, moe.config.hidden_size, device=device))
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert moe.score_bias.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_from_config_matches_reference(name, dtype, device):
    skip_bf16_on_cpu(dtype, device)
    moe = FusedMoE.from_config(shrink(name), dtype=dtype, device=device)
    x = torch.randn(3, 5, moe.config.hidden_size, device=device, dtype=dtype)
    if dtype != torch.float32 and moe.config.scoring == "softmax":
        x = torch.randn(256, moe.config.hidden_size, device=device, dtype=dtype)
        x = drop_routing_near_ties(x, moe.router_weight, moe.config.top_k)[:15].reshape(3, 5, -1)
    with torch.no_grad():
        out = moe(x)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_l2(out, module_reference(moe, x), TOLERANCE[dtype])


def test_parameters_follow_config(device):
    config = shrink("deepseek-v3")
    moe = FusedMoE.from_config(config, dtype=torch.bfloat16, device=device)
    E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
    Is = config.shared_intermediate_size
    assert moe.router_weight.shape == (E, H)
    assert moe.w_gate_up.shape == (E, 2 * I, H) and moe.w_down.shape == (E, H, I)
    assert moe.shared_gate_up.shape == (2 * Is, H) and moe.shared_down.shape == (H, Is)
    assert moe.shared_gate is None
    assert moe.w_gate_up.dtype == torch.bfloat16 and moe.w_gate_up.device.type == device.type
    # The bias stays float32 under a bf16 module, is drawn nonzero, and is saved.
    assert moe.score_bias.dtype == torch.float32 and moe.score_bias.abs().sum() > 0
    assert "score_bias" in moe.state_dict()
    moe.to(torch.float16)  # casts the bias buffer too; forward still hands the op fp32
    with torch.no_grad():
        assert moe(torch.randn(1, H, device=device, dtype=torch.float16)).shape == (1, H)

    qwen2 = FusedMoE.from_config(shrink("qwen2-57b-a14b"), device=device)
    assert qwen2.shared_gate.shape == (1, H) and qwen2.score_bias is None
    mixtral = FusedMoE.from_config("mixtral-8x7b", device="meta")  # real size, no memory
    assert mixtral.w_gate_up.shape == (8, 2 * 14336, 4096) and mixtral.shared_gate_up is None


def test_unknown_config_is_refused():
    with pytest.raises(ValueError, match="unknown model config 'gpt-moe'"):
        FusedMoE.from_config("gpt-moe")


@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3), (2, 1, 3)], ids=str)
def test_leading_dims(lead, device):
    moe = FusedMoE.from_config(shrink("qwen1.5-moe-a2.7b"), device=device)
    x = torch.randn(*lead, moe.config.hidden_size, device=device)
    with torch.no_grad():
        out = moe(x)
    assert out.shape == x.shape
    assert_close_l2(out, module_reference(moe, x), TOLERANCE[torch.float32])


def test_non_contiguous_input(device):
    moe = FusedMoE.from_config(shrink("mixtral-8x7b"), device=device)
    x = torch.randn(6, 4, moe.config.hidden_size, device=device).transpose(0, 1)
    with torch.no_grad():
        out = moe(x)
    assert_close_l2(out, module_reference(moe, x.contiguous()), TOLERANCE[torch.float32])


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
@pytest.mark.parametrize("name", ["deepseek-v3", "qwen2-57b-a14b"])
def test_zero_tokens(name, lead, device):
    moe = FusedMoE.from_config(shrink(name), device=device)
    x = torch.randn(*lead, moe.config.hidden_size, device=device)
    with torch.no_grad():
        out = moe(x)
    assert out.shape == x.shape


def test_input_requiring_grad_runs_eagerly(device):
    moe = FusedMoE.from_config(shrink("qwen3-30b-a3b"), device=device)
    x = torch.randn(4, moe.config.hidden_size, device=device, requires_grad=True)
    out = moe(x)
    assert_close_l2(out.detach(), module_reference(moe, x.detach()), TOLERANCE[torch.float32])


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    moe = FusedMoE.from_config(shrink("deepseek-v3"), device=device)
    compiled = torch.compile(moe, fullgraph=True)
    with torch.no_grad():
        for lead in [(2, 5), (3, 4)]:  # a second shape: recompiled or dynamic, not broken
            x = torch.randn(*lead, moe.config.hidden_size, device=device)
            assert_close_l2(compiled(x), module_reference(moe, x), TOLERANCE[torch.float32])


@ALLOW_NON_FINITE
@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen2-57b-a14b", "deepseek-v3"])
def test_non_finite_token_poisons_only_its_own_output(name, device):
    """As the reference: that token's row is non-finite, every other row bit-for-bit as
    without it (decode and token-block routing paths, shared experts included)."""
    moe = FusedMoE.from_config(shrink(name), device=device)
    for lead in [(1, 5), (2, 20)]:
        clean = torch.randn(*lead, moe.config.hidden_size, device=device)
        x = clean.clone()
        x[0, 2, 3] = float("nan")
        with torch.no_grad():
            out, expected = moe(x), moe(clean)
        assert not torch.isfinite(module_reference(moe, x)[0, 2]).any()
        assert not torch.isfinite(out[0, 2]).any()
        others = torch.ones(lead, dtype=torch.bool, device=device)
        others[0, 2] = False
        assert_rows_unchanged(out[others], expected[others])
