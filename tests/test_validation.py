"""Bad input gets a clear error naming the argument: one test per case."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_ops

E, H, I, T, K = 8, 64, 48, 5, 2


@pytest.fixture
def args(device):
    """Valid fused_moe arguments; each test breaks exactly one thing."""
    return dict(
        hidden_states=torch.randn(T, H, device=device),
        router_weight=torch.randn(E, H, device=device),
        w_gate_up=torch.randn(E, 2 * I, H, device=device),
        w_down=torch.randn(E, H, I, device=device),
        top_k=K,
    )


def fused_moe(**kwargs):
    return torch.ops.tritonmoe.fused_moe(**kwargs)


def fused_experts(args, topk_weights=None, topk_ids=None):
    device = args["hidden_states"].device
    if topk_weights is None:
        topk_weights = torch.rand(T, K, device=device)
    if topk_ids is None:
        topk_ids = torch.randint(0, E, (T, K), device=device, dtype=torch.int32)
    return torch.ops.tritonmoe.fused_experts(
        args["hidden_states"], topk_weights, topk_ids, args["w_gate_up"], args["w_down"])


def test_valid_arguments_pass(args):
    assert fused_moe(**args).shape == (T, H)


def test_hidden_states_wrong_rank(args):
    args["hidden_states"] = args["hidden_states"][None]
    with pytest.raises(ValueError, match=r"hidden_states must be 2-D"):
        fused_moe(**args)


def test_router_hidden_size_mismatch(args):
    args["router_weight"] = args["router_weight"][:, :32].contiguous()
    with pytest.raises(ValueError, match=r"router_weight .* expected 64 \(hidden size of w_gate_up\)"):
        fused_moe(**args)


def test_input_hidden_size_mismatch_names_the_input(args):
    args["hidden_states"] = torch.randn(T, H + 8, device=args["hidden_states"].device)
    with pytest.raises(ValueError, match=rf"hidden_states has hidden size {H + 8} .* expected {H}"):
        fused_moe(**args)
    with pytest.raises(ValueError, match=rf"hidden_states has hidden size {H + 8} .* router_weight"):
        moe_ops.route(args["hidden_states"], args["router_weight"], top_k=2)


def test_input_dtype_mismatch_names_the_input(args):
    args["hidden_states"] = args["hidden_states"].half()
    with pytest.raises(TypeError, match=r"hidden_states must be .* weights' dtype torch.float32, "
                                        r"got torch.float16"):
        fused_moe(**args)


def test_w_down_shape_mismatch(args):
    args["w_down"] = args["w_down"][:, :, :40].contiguous()
    with pytest.raises(ValueError, match=r"w_down has size 40 in dim 2, expected 48 \(intermediate size"):
        fused_moe(**args)


def test_expert_count_mismatch_between_router_and_weights(args):
    args["router_weight"] = torch.cat([args["router_weight"]] * 2)
    with pytest.raises(ValueError, match=r"router_weight has 16 experts, w_gate_up has 8"):
        fused_moe(**args)


@pytest.mark.parametrize("top_k", [0, -1, E + 1])
def test_top_k_out_of_range(args, top_k):
    args["top_k"] = top_k
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_experts=8\]"):
        fused_moe(**args)


def test_n_group_not_dividing_experts(args):
    with pytest.raises(ValueError, match=r"n_group must be >= 1 and divide num_experts=8"):
        fused_moe(**args, scoring="sigmoid", n_group=3, topk_group=1)


def test_topk_group_above_n_group(args):
    with pytest.raises(ValueError, match=r"topk_group must be in \[1, n_group=4\]"):
        fused_moe(**args, scoring="sigmoid", n_group=4, topk_group=5)


def test_top_k_above_experts_of_kept_groups(args):
    args["top_k"] = 3  # one kept group of 2 experts cannot supply 3
    with pytest.raises(ValueError, match=r"top_k=3 exceeds the experts"):
        fused_moe(**args, scoring="sigmoid", n_group=4, topk_group=1)


def test_groups_need_sigmoid_scoring(args):
    with pytest.raises(ValueError, match=r"n_group=4 selects DeepSeek-V3's grouped routing"):
        fused_moe(**args, n_group=4, topk_group=2)


def test_unknown_scoring(args):
    with pytest.raises(ValueError, match=r"scoring must be one of \('softmax', 'sigmoid'\)"):
        fused_moe(**args, scoring="relu")


def test_mixed_dtypes(args):
    args["w_down"] = args["w_down"].half()
    with pytest.raises(TypeError, match=r"w_down has dtype torch.float16, expected"):
        fused_moe(**args)


def test_router_dtype_mismatch_names_the_router(args):
    args["router_weight"] = args["router_weight"].half()
    with pytest.raises(TypeError, match=r"router_weight has dtype torch.float16, expected "
                                        r"w_gate_up's dtype torch.float32"):
        fused_moe(**args)


def test_unsupported_dtype(args):
    args["hidden_states"] = args["hidden_states"].double()
    with pytest.raises(TypeError, match=r"hidden_states must be float32, float16 or bfloat16"):
        fused_moe(**args)


def test_score_bias_wrong_dtype(args):
    bias = torch.zeros(E, dtype=torch.float16, device=args["hidden_states"].device)
    with pytest.raises(TypeError, match=r"score_bias must be float32"):
        fused_moe(**args, scoring="sigmoid", score_bias=bias)


def test_mixed_devices(args):
    args["w_gate_up"] = args["w_gate_up"].to("meta")
    with pytest.raises(ValueError, match=r"w_gate_up is on meta, expected hidden_states' device"):
        fused_moe(**args)


def test_non_contiguous_weights_refused(args):
    args["w_gate_up"] = args["w_gate_up"].transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match=r"w_gate_up must be contiguous"):
        fused_moe(**args)


def test_topk_ids_not_integer(args):
    ids = torch.zeros(T, K, device=args["hidden_states"].device)
    with pytest.raises(TypeError, match=r"topk_ids must be int32 or int64"):
        fused_experts(args, topk_ids=ids)


def test_topk_weights_not_float32(args):
    weights = torch.rand(T, K, device=args["hidden_states"].device).half()
    with pytest.raises(TypeError, match=r"topk_weights must be float32"):
        fused_experts(args, topk_weights=weights)


@pytest.mark.parametrize("bad_id", [E, -1])
def test_topk_ids_out_of_range(args, bad_id):
    ids = torch.randint(0, E, (T, K), device=args["hidden_states"].device, dtype=torch.int32)
    ids[2, 1] = bad_id
    with pytest.raises(ValueError, match=rf"topk_ids must lie in \[0, num_experts=8\); "
                                         rf"topk_ids\[2, 1\] = {bad_id}"):
        fused_experts(args, topk_ids=ids)


@pytest.mark.parametrize("name, value", [("n_group", 2.0), ("topk_group", 2.0), ("n_group", None),
                                         ("routed_scaling_factor", None), ("top_k", True)])
@pytest.mark.parametrize("entry", ["fused_moe", "route"])
def test_routing_options_of_another_type_are_named(args, name, value, entry):
    """Through the Python functions too (they skip the op's schema in eager mode)."""
    options = dict(top_k=K, scoring="sigmoid", n_group=4, topk_group=2)
    options[name] = value
    with pytest.raises((TypeError, ValueError), match=rf"{name} must be"):
        if entry == "route":
            moe_ops.route(args["hidden_states"], args["router_weight"], **options)
        else:
            moe_ops.fused_moe(args["hidden_states"], args["router_weight"], args["w_gate_up"],
                              args["w_down"], **options)


def test_numpy_routing_options_route_as_python_numbers(args):
    """Options read from a config may be numpy numbers: accepted, and the same routing."""
    import numpy as np
    options = dict(top_k=K, scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)
    as_numpy = dict(options, top_k=np.int64(K), n_group=np.int64(4), topk_group=np.int32(2),
                    routed_scaling_factor=np.float32(2.5))
    x, router = args["hidden_states"], args["router_weight"]
    for got, want in zip(moe_ops.route(x, router, **as_numpy), moe_ops.route(x, router, **options)):
        assert torch.equal(got, want)


def test_router_of_hidden_size_zero(args):
    args["hidden_states"] = args["hidden_states"][:, :0].contiguous()
    args["router_weight"] = args["router_weight"][:, :0].contiguous()
    args["w_gate_up"] = args["w_gate_up"][:, :, :0].contiguous()
    args["w_down"] = args["w_down"][:, :0].contiguous()
    with pytest.raises(ValueError, match=r"router_weight has hidden size 0"):
        fused_moe(**args)


def test_fp8_experts_name_a_router_of_another_dtype(device):
    from moe_ops.fp8 import quantize_weight
    x = torch.randn(T, H, device=device).half()
    w_gate_up, gate_up_scale = quantize_weight(torch.randn(E, 2 * I, H, device=device), "channel")
    w_down, down_scale = quantize_weight(torch.randn(E, H, I, device=device), "channel")
    with pytest.raises(TypeError, match=r"router_weight has dtype torch.float32, expected "
                                        r"hidden_states' dtype torch.float16"):
        moe_ops.fused_moe(x, torch.randn(E, H, device=device), w_gate_up, w_down, K,
                          w_gate_up_scale=gate_up_scale, w_down_scale=down_scale)


def test_meta_tensors_get_meta_outputs():
    """The Python functions and FusedMoE describe meta inputs (the fake), as the ops do."""
    x, router = torch.randn(T, H, device="meta"), torch.randn(E, H, device="meta")
    w_gate_up, w_down = torch.randn(E, 2 * I, H, device="meta"), torch.randn(E, H, I, device="meta")
    weights, ids = moe_ops.route(x, router, K)
    assert ids.is_meta and ids.shape == (T, K) and ids.dtype == torch.int32
    experts = moe_ops.fused_experts(x, weights, ids, w_gate_up, w_down)
    out = moe_ops.fused_moe(x, router, w_gate_up, w_down, K)
    assert experts.is_meta and out.is_meta and out.shape == experts.shape == (T, H)
    layer = moe_ops.FusedMoE.from_config("mixtral-8x7b", device="meta")
    hidden = layer.config.hidden_size
    out = layer(torch.randn(2, 3, hidden, device="meta"))
    assert out.is_meta and out.shape == (2, 3, hidden)


def test_topk_shape_mismatch(args):
    ids = torch.randint(0, E, (T + 1, K), device=args["hidden_states"].device, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"topk_ids .* expected 5 \(num_tokens\)"):
        fused_experts(args, topk_ids=ids)


def test_cpu_tensors_without_the_interpreter_name_the_fix():
    """Without TRITON_INTERPRET (and so no Triton driver for CPU tensors), the op says
    where its tensors must be, instead of Triton's "0 active drivers"."""
    script = (
        "import torch, moe_ops\n"
        "x, router = torch.randn(3, 64), torch.randn(8, 64)\n"
        "w_gate_up, w_down = torch.randn(8, 96, 64), torch.randn(8, 64, 48)\n"
        "for call in (lambda: torch.ops.tritonmoe.fused_moe(x, router, w_gate_up, w_down, 2),\n"
        "             lambda: torch.ops.tritonmoe.route(x, router, 2),\n"
        "             lambda: torch.ops.tritonmoe.fused_experts(\n"
        "                 x, torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32), w_gate_up, w_down)):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as error:\n"
        "        print(error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout + done.stderr[-3000:]
    for line in lines:
        assert line.startswith("hidden_states is on cpu: the tritonmoe kernels run on a CUDA or ROCm")
        assert "set TRITON_INTERPRET=1 before triton or moe_ops is imported" in line
