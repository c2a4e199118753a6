"""The tritonmoe ops against moe_ops.reference: every model config, dtype and edge case.

On CPU (interpreter) configs are shrunk; on GPU a few run at their real sizes too.
"""
import pytest
import torch

import moe_ops  # noqa: F401  (registers the ops)
from moe_ops.configs import CONFIGS, get_config, shrink
from moe_ops.reference import fused_experts_reference, moe_reference, route_reference

from conftest import ON_GPU
from helpers import ALLOW_NON_FINITE, TOLERANCE, assert_close_l2, assert_rows_unchanged

# Every torch.empty (outputs and the ops' internal buffers) starts as NaN.
pytestmark = pytest.mark.usefixtures("poison_allocations")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = [1, 7, 33] + ([300] if ON_GPU else [])


def make_layer(config, dtype, device):
    """Random router, expert weights and (for DeepSeek) score bias of one MoE layer."""
    c = config
    scale_in, scale_mid = c.hidden_size ** -0.5, c.intermediate_size ** -0.5
    router = (torch.randn(c.num_experts, c.hidden_size, device=device) * 2 * scale_in).to(dtype)
    w_gate_up = (torch.randn(c.num_experts, 2 * c.intermediate_size, c.hidden_size,
                             device=device) * scale_in).to(dtype)
    w_down = (torch.randn(c.num_experts, c.hidden_size, c.intermediate_size,
                          device=device) * scale_mid).to(dtype)
    bias = torch.randn(c.num_experts, device=device) * 0.1 if c.score_bias else None
    return router, w_gate_up, w_down, bias


def run_fused_moe(x, router, w_gate_up, w_down, bias, config):
    return torch.ops.tritonmoe.fused_moe(x, router, w_gate_up, w_down, score_bias=bias,
                                         **config.routing_kwargs())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_moe_matches_reference(name, dtype, device):
    config = shrink(name)
    layer = make_layer(config, dtype, device)
    for num_tokens in TOKENS:
        x = torch.randn(num_tokens, config.hidden_size, device=device).to(dtype)
        out = run_fused_moe(x, *layer, config)
        ref = moe_reference(x, *layer[:3], score_bias=layer[3], **config.routing_kwargs())
        assert_close_l2(out, ref, TOLERANCE[dtype])


@pytest.mark.parametrize("num_tokens", [3, 45])  # the decode router and the token-block router
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_route_matches_reference(name, num_tokens, device):
    config = shrink(name)
    router, _, _, bias = make_layer(config, torch.float32, device)
    x = torch.randn(num_tokens, config.hidden_size, device=device)
    weights, ids = torch.ops.tritonmoe.route(x, router, score_bias=bias, **config.routing_kwargs())
    ref_weights, ref_ids = route_reference(x, router, score_bias=bias, **config.routing_kwargs())
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    assert_close_l2(weights, ref_weights, 1e-5)


def test_route_ties_pick_lower_expert(device):
    # Identical router rows make exactly equal scores: ids must come out ascending.
    router = torch.randn(1, 64, device=device).repeat(16, 1)
    x = torch.randn(5, 64, device=device)
    weights, ids = torch.ops.tritonmoe.route(x, router, 4)
    assert torch.equal(ids.cpu(), torch.arange(4, dtype=torch.int32).repeat(5, 1))
    assert_close_l2(weights, torch.full_like(weights, 0.25), 1e-6)


def test_deepseek_grouped_routing_with_bias_and_scale(device):
    config = shrink("deepseek-v3")  # E=256, K=8, 8 groups keep 4, bias, scale 2.5
    assert (config.num_experts, config.top_k, config.n_group) == (256, 8, 8)
    router, w_gate_up, w_down, bias = make_layer(config, torch.float32, device)
    bias = bias * 10  # large enough to change which experts win
    x = torch.randn(19, config.hidden_size, device=device)
    weights, ids = torch.ops.tritonmoe.route(x, router, score_bias=bias, **config.routing_kwargs())
    ref_weights, ref_ids = route_reference(x, router, score_bias=bias, **config.routing_kwargs())
    assert torch.equal(ids, ref_ids)
    assert_close_l2(weights, ref_weights, 1e-5)
    # Renormalised then scaled: each row sums to the scaling factor.
    assert torch.allclose(weights.sum(-1), torch.full((19,), 2.5, device=device), rtol=1e-5)
    groups = ids.long() // (256 // 8)
    assert all(len(set(row.tolist())) <= 4 for row in groups)


def expert_inputs(num_tokens, num_experts, top_k, hidden, inter, dtype, device):
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, device=device) * hidden ** -0.5).to(dtype)
    w_down = (torch.randn(num_experts, hidden, inter, device=device) * inter ** -0.5).to(dtype)
    weights = torch.rand(num_tokens, top_k, device=device)
    return x, weights, w_gate_up, w_down


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_tokens_on_one_expert_others_empty(dtype, device):
    x, weights, w_gate_up, w_down = expert_inputs(37, 8, 2, 64, 48, dtype, device)
    ids = torch.tensor([5, 2], device=device, dtype=torch.int32).repeat(37, 1)  # 6 experts idle
    ids[::3, 1] = 5 - 1
    out = torch.ops.tritonmoe.fused_experts(x, weights, ids, w_gate_up, w_down)
    ref = fused_experts_reference(x, weights, ids, w_gate_up, w_down)
    assert_close_l2(out, ref, TOLERANCE[dtype])


@pytest.mark.parametrize("inter", [48, 80, 40])  # 80 and 40 leave partial BLOCK_N/BLOCK_K tiles
def test_fused_experts_int64_ids_and_uneven_sizes(inter, device):
    x, weights, w_gate_up, w_down = expert_inputs(21, 60, 4, 72, inter, torch.float32, device)
    ids = torch.stack([torch.randperm(60, device=device)[:4] for _ in range(21)])  # int64
    out = torch.ops.tritonmoe.fused_experts(x, weights, ids, w_gate_up, w_down)
    assert_close_l2(out, fused_experts_reference(x, weights, ids, w_gate_up, w_down), 1e-4)


def test_zero_tokens_return_empty(device):
    config = shrink("mixtral-8x7b")
    layer = make_layer(config, torch.float32, device)
    x = torch.empty(0, config.hidden_size, device=device)
    out = run_fused_moe(x, *layer, config)
    assert out.shape == (0, config.hidden_size)
    weights, ids = torch.ops.tritonmoe.route(x, layer[0], 2)
    assert weights.shape == ids.shape == (0, 2)


def test_non_contiguous_hidden_states_are_accepted(device):
    config = shrink("qwen3-30b-a3b")
    layer = make_layer(config, torch.float32, device)
    x = torch.randn(config.hidden_size, 9, device=device).t()  # a transposed view
    assert not x.is_contiguous()
    out = run_fused_moe(x, *layer, config)
    ref = moe_reference(x, *layer[:3], **config.routing_kwargs())
    assert_close_l2(out, ref, 1e-4)


def test_output_is_bitwise_reproducible(device):
    config = shrink("deepseek-v3")
    layer = make_layer(config, torch.float32, device)
    x = torch.randn(29, config.hidden_size, device=device)
    first = run_fused_moe(x, *layer, config)
    assert torch.equal(first, run_fused_moe(x, *layer, config))


@pytest.mark.parametrize("num_tokens", [1, 16, 17, 70])  # both sides of DECODE_MAX_T
def test_route_then_fused_experts_equals_fused_moe_bitwise(num_tokens, device):
    """The split ops pick the same experts as fused_moe and sum in the same order."""
    config = shrink("deepseek-v3")
    router, w_gate_up, w_down, bias = make_layer(config, torch.bfloat16 if ON_GPU else torch.float32, device)
    x = torch.randn(num_tokens, config.hidden_size, device=device).to(router.dtype)
    weights, ids = torch.ops.tritonmoe.route(x, router, score_bias=bias, **config.routing_kwargs())
    split = torch.ops.tritonmoe.fused_experts(x, weights, ids, w_gate_up, w_down)
    assert torch.equal(split, run_fused_moe(x, router, w_gate_up, w_down, bias, config))


@pytest.mark.parametrize("num_tokens, id_dtype", [(6, torch.int32), (40, torch.int32),
                                                  (6, torch.int64)])
def test_out_of_range_ids_are_dropped_when_unchecked(num_tokens, id_dtype, device):
    """The decode alignment and the rank kernel; int64 ids that int32 would wrap into range."""
    x, weights, w_gate_up, w_down = expert_inputs(num_tokens, 8, 2, 64, 48, torch.float32, device)
    ids = torch.randint(0, 8, (num_tokens, 2), device=device, dtype=id_dtype)
    bad = ids.clone()
    bad[1, 0], bad[4, 1] = (8, -3) if id_dtype == torch.int32 else (2**32 + 1, -2**32 + 2)
    moe_ops.set_topk_ids_check(False)
    try:
        out = torch.ops.tritonmoe.fused_experts(x, weights, bad, w_gate_up, w_down)
    finally:
        moe_ops.set_topk_ids_check(True)
    dropped = weights.clone()
    dropped[1, 0] = dropped[4, 1] = 0.0
    assert_close_l2(out, fused_experts_reference(x, dropped, ids, w_gate_up, w_down), 1e-4)


@pytest.mark.parametrize("op", ["route", "fused_experts", "fused_moe"])
def test_backward_raises_a_forward_only_error(op, device):
    """Eager forward works on weights that require grad; backward says what to do."""
    config = shrink("mixtral-8x7b")
    router, w_gate_up, w_down = (t.requires_grad_() for t in make_layer(config, torch.float32, device)[:3])
    x = torch.randn(4, config.hidden_size, device=device)
    if op == "route":
        out = torch.ops.tritonmoe.route(x, router, config.top_k)[0]
    elif op == "fused_experts":
        weights, ids = route_reference(x, router.detach(), config.top_k)
        out = torch.ops.tritonmoe.fused_experts(x, weights, ids, w_gate_up, w_down)
    else:
        out = torch.ops.tritonmoe.fused_moe(x, router, w_gate_up, w_down, config.top_k)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="forward-only.*requires_grad=False.*torch.no_grad"):
        out.sum().backward()


@pytest.mark.parametrize("op", ["route", "fused_experts", "fused_moe"])
def test_backward_to_the_input_says_input_gradients_are_missing(op, device):
    """Frozen weights, an input that requires grad (layers before the MoE train): the
    error says input gradients are not implemented, not to freeze the weights."""
    config = shrink("mixtral-8x7b")
    router, w_gate_up, w_down, _ = make_layer(config, torch.float32, device)
    x = torch.randn(4, config.hidden_size, device=device, requires_grad=True)
    if op == "route":
        out = torch.ops.tritonmoe.route(x, router, config.top_k)[0]
    elif op == "fused_experts":
        weights, ids = route_reference(x.detach(), router, config.top_k)
        out = torch.ops.tritonmoe.fused_experts(x, weights, ids, w_gate_up, w_down)
    else:
        out = torch.ops.tritonmoe.fused_moe(x, router, w_gate_up, w_down, config.top_k)
    with pytest.raises(RuntimeError) as error:
        out.sum().backward()
    message = str(error.value)
    assert f"tritonmoe::{op}" in message and "forward-only" in message
    assert "with respect to its input hidden_states are not implemented" in message
    assert "requires_grad=False" not in message


@pytest.mark.skipif(not ON_GPU, reason="real model sizes need a GPU")
@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "qwen1.5-moe-a2.7b"])
def test_fused_moe_real_sizes_bf16(name, device):
    config = get_config(name)
    layer = make_layer(config, torch.bfloat16, device)
    for num_tokens in (1, 16, 33, 300):  # 1 and 16: the decode routing path
        x = torch.randn(num_tokens, config.hidden_size, device=device).to(torch.bfloat16)
        out = run_fused_moe(x, *layer, config)
        ref = moe_reference(x, *layer[:3], score_bias=layer[3], **config.routing_kwargs())
        assert_close_l2(out, ref, 1e-2)
    del layer
    torch.cuda.empty_cache()


def _opcheck_samples(device):
    config = shrink("deepseek-v3")
    router, w_gate_up, w_down, bias = make_layer(config, torch.float32, device)
    x = torch.randn(11, config.hidden_size, device=device)
    kwargs = config.routing_kwargs()
    weights, ids = torch.ops.tritonmoe.route(x, router, score_bias=bias, **kwargs)
    return {
        "route": (x, router, kwargs["top_k"], "sigmoid", True, 8, 4, bias, 2.5),
        "fused_experts": (x, weights, ids, w_gate_up, w_down),
        "fused_moe": (x, router, w_gate_up, w_down, kwargs["top_k"], "sigmoid", True, 8, 4,
                      bias, 2.5),
    }


@pytest.mark.parametrize("op_name", ["route", "fused_experts", "fused_moe"])
def test_opcheck(op_name, device):
    args = _opcheck_samples(device)[op_name]
    torch.library.opcheck(getattr(torch.ops.tritonmoe, op_name).default, args)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3"])
def test_many_token_blocks(name, device):
    # Enough tokens for several programs of the router/rank step on every device.
    config = shrink(name, hidden_size=32, intermediate_size=16)
    layer = make_layer(config, torch.float32, device)
    x = torch.randn(300, config.hidden_size, device=device)
    ref = moe_reference(x, *layer[:3], score_bias=layer[3], **config.routing_kwargs())
    assert_close_l2(run_fused_moe(x, *layer, config), ref, 1e-4)
    weights, ids = route_reference(x, layer[0], score_bias=layer[3], **config.routing_kwargs())
    out = torch.ops.tritonmoe.fused_experts(x, weights, ids, layer[1], layer[2])
    assert_close_l2(out, ref, 1e-4)


def test_strided_score_bias_is_read_correctly(device):
    config = shrink("deepseek-v3")
    router, w_gate_up, w_down, bias = make_layer(config, torch.float32, device)
    strided = torch.stack([bias * 10, torch.randn_like(bias)], dim=1)[:, 0]  # stride 2
    assert not strided.is_contiguous()
    x = torch.randn(13, config.hidden_size, device=device)
    out = run_fused_moe(x, router, w_gate_up, w_down, strided, config)
    ref = moe_reference(x, router, w_gate_up, w_down, score_bias=strided.contiguous(),
                        **config.routing_kwargs())
    assert_close_l2(out, ref, 1e-4)
    _, ids = torch.ops.tritonmoe.route(x, router, score_bias=strided, **config.routing_kwargs())
    _, ref_ids = route_reference(x, router, score_bias=strided.contiguous(), **config.routing_kwargs())
    assert torch.equal(ids, ref_ids)


def assert_equal_with_nan(out, ref):
    """Bitwise equal, NaN where ref has NaN."""
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


NON_FINITE = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf"),
              pytest.param(float("-inf"), id="-inf")]


@ALLOW_NON_FINITE
@pytest.mark.parametrize("bad", NON_FINITE)
@pytest.mark.parametrize("num_tokens", [5, 24])  # the decode path and the token-block path
@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3"])  # softmax; sigmoid, grouped
def test_non_finite_token_poisons_only_its_own_output(name, num_tokens, bad, device):
    """As moe_reference: in-range ids (NaN ranks above every number, as in torch.topk),
    a non-finite output row for that token, every other row bit-for-bit unchanged."""
    config = shrink(name)
    router, w_gate_up, w_down, bias = layer = make_layer(config, torch.float32, device)
    kwargs = dict(score_bias=bias, **config.routing_kwargs())
    clean = torch.randn(num_tokens, config.hidden_size, device=device)
    x = clean.clone()
    x[2, 3] = bad
    weights, ids = torch.ops.tritonmoe.route(x, router, **kwargs)
    ref_weights, ref_ids = route_reference(x, router, **kwargs)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=0, equal_nan=True)

    out = run_fused_moe(x, *layer, config)
    ref = moe_reference(x, router, w_gate_up, w_down, **kwargs)
    assert not torch.isfinite(ref[2]).any()
    assert not torch.isfinite(out[2]).any()
    others = torch.arange(num_tokens, device=device) != 2
    assert_rows_unchanged(out[others], run_fused_moe(clean, *layer, config)[others])
    assert_close_l2(out[others], ref[others], 1e-4)
    # fused_experts takes the router's ids as they are (none out of range).
    assert_equal_with_nan(torch.ops.tritonmoe.fused_experts(x, weights, ids, w_gate_up, w_down), out)


@ALLOW_NON_FINITE
def test_nan_scores_rank_first_among_finite_ones(device):
    """A router row of NaN gives that one expert a NaN score (sigmoid): torch.topk's order
    puts it first; the other experts follow by score, groups by their top-2 sum."""
    config = shrink("deepseek-v3")
    router, _, _, bias = make_layer(config, torch.float32, device)
    router[37] = float("nan")
    kwargs = dict(score_bias=bias, **config.routing_kwargs())
    for num_tokens in (3, 30):
        x = torch.randn(num_tokens, config.hidden_size, device=device)
        weights, ids = torch.ops.tritonmoe.route(x, router, **kwargs)
        ref_weights, ref_ids = route_reference(x, router, **kwargs)
        assert torch.equal(ids, ref_ids) and bool((ids[:, 0] == 37).all())
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=0, equal_nan=True)
