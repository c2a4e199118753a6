"""Argument checks of every tritonmoe op, in one place.

Shape, dtype, device (a CPU tensor needs Triton's interpreter) and option checks read
metadata only: they are free and run in both the real and the fake implementations, so
``torch.compile`` reports bad input at trace time. The one check that reads data (every ``topk_id`` in range) runs in
eager mode only, outside CUDA-graph capture, and can be switched off with
``set_topk_ids_check(False)``. Errors name the argument and what was expected.
"""
from __future__ import annotations

import numbers

import torch

from .dtypes import FLOAT_DTYPES
from .fp8 import FP8_DTYPE, scale_shape, scheme_of
from .interpreter import interpreter_active

ID_DTYPES = (torch.int32, torch.int64)
SCORINGS = ("softmax", "sigmoid")

_check_topk_ids = True


def set_topk_ids_check(enabled: bool) -> None:
    """Turn the data-reading range check of user-given ``topk_ids`` on or off."""
    global _check_topk_ids
    _check_topk_ids = bool(enabled)


def _expect_rank(name: str, tensor: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}")
    if tensor.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(tensor.shape)}")


def _expect_dim(name: str, tensor: torch.Tensor, dim: int, size, what: str) -> None:
    if tensor.shape[dim] != size:
        raise ValueError(
            f"{name} has size {tensor.shape[dim]} in dim {dim}, expected {size} ({what}); "
            f"shape {tuple(tensor.shape)}")


def _expect_same_device(reference: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"{name} is on {tensor.device}, expected hidden_states' device {reference.device}")


def _expect_kernel_device(name: str, tensor: torch.Tensor) -> None:
    # Triton's own error here is "0 active drivers ([]). There should only be one."
    if tensor.device.type == "cpu" and not interpreter_active():
        raise ValueError(
            f"{name} is on {tensor.device}: the tritonmoe kernels run on a CUDA or ROCm device; "
            "to run them on CPU through Triton's interpreter, set TRITON_INTERPRET=1 before "
            "triton or moe_ops is imported")


def _expect_contiguous(**tensors: torch.Tensor) -> None:
    # A silent per-call copy of expert weights would cost more than the layer itself.
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(
                f"{name} must be contiguous (weights are read in place); "
                f"call .contiguous() once when loading, got strides {tensor.stride()}")


def _expect_weight_dtypes(hidden_states: torch.Tensor, first_name: str, first: torch.Tensor,
                          **others: torch.Tensor) -> None:
    """The weights share one float dtype (``first``'s), and the input has it too: a
    mismatch names the input when the weights agree among themselves."""
    if first.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{first_name} must be float32, float16 or bfloat16 (or float8_e4m3fn "
                        f"with its scale, for expert weights), got {first.dtype}")
    for name, tensor in others.items():
        if tensor.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype}, expected {first_name}'s dtype "
                            f"{first.dtype} (the weights share one dtype)")
    if hidden_states.dtype != first.dtype:
        raise TypeError(
            f"hidden_states must be float32, float16 or bfloat16 and have the weights' dtype "
            f"{first.dtype}, got {hidden_states.dtype}")


def _expect_hidden_size(hidden_states: torch.Tensor, weight_name: str, hidden: int) -> None:
    if hidden_states.shape[1] != hidden:
        raise ValueError(
            f"hidden_states has hidden size {hidden_states.shape[1]} (dim 1 of shape "
            f"{tuple(hidden_states.shape)}), expected {hidden}, the hidden size of {weight_name}")


def _expect_int(name: str, value, what: str) -> None:
    # A SymInt where torch.compile(dynamic=True) traces an int from a closure.
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int ({what}), got {value!r}")


def check_route_args(hidden_states, router_weight, top_k, scoring, n_group, topk_group,
                     score_bias, routed_scaling_factor=1.0) -> None:
    """Checks of ``tritonmoe::route``'s arguments."""
    _expect_rank("hidden_states", hidden_states, 2, "[num_tokens, hidden]")
    _expect_rank("router_weight", router_weight, 2, "[num_experts, hidden]")
    _expect_weight_dtypes(hidden_states, "router_weight", router_weight)
    if router_weight.shape[1] == 0:
        raise ValueError(f"router_weight has hidden size 0 (shape {tuple(router_weight.shape)}): "
                         "routing needs a hidden size >= 1")
    _expect_same_device(hidden_states, router_weight=router_weight, score_bias=score_bias)
    _expect_kernel_device("hidden_states", hidden_states)
    _expect_hidden_size(hidden_states, "router_weight", router_weight.shape[1])
    _expect_contiguous(router_weight=router_weight)
    num_experts = router_weight.shape[0]
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    if (isinstance(top_k, bool) or not isinstance(top_k, (numbers.Integral, torch.SymInt))
            or not 1 <= top_k <= num_experts):
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    _expect_int("n_group", n_group, "expert groups, dividing num_experts")
    _expect_int("topk_group", topk_group, "groups kept per token")
    if isinstance(routed_scaling_factor, bool) or not isinstance(
            routed_scaling_factor, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"routed_scaling_factor must be a float (the routing weights' "
                        f"multiplier), got {routed_scaling_factor!r}")
    if n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"n_group must be >= 1 and divide num_experts={num_experts}, got {n_group}")
    if n_group > 1 and scoring != "sigmoid":
        raise ValueError(
            f"n_group={n_group} selects DeepSeek-V3's grouped routing (group score = sum of "
            f"its top-2), which needs scoring='sigmoid'; got scoring={scoring!r}")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if top_k > topk_group * (num_experts // n_group):
        raise ValueError(
            f"top_k={top_k} exceeds the experts of the topk_group={topk_group} kept groups "
            f"({topk_group} x {num_experts // n_group})")
    if score_bias is not None:
        if scoring != "sigmoid":
            raise ValueError("score_bias is only used with scoring='sigmoid' (DeepSeek-V3 routing)")
        _expect_rank("score_bias", score_bias, 1, "[num_experts]")
        _expect_dim("score_bias", score_bias, 0, num_experts, "num_experts")
        if score_bias.dtype != torch.float32:
            raise TypeError(f"score_bias must be float32, got {score_bias.dtype}")


def _expect_fp8_experts(hidden_states, w_gate_up, w_down, w_gate_up_scale, w_down_scale) -> None:
    """fp8 expert weights: both e4m3fn, both scales given in one scheme (float32,
    contiguous, the scheme's shape), 16-bit hidden states; float weights take no scale."""
    fp8 = [name for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down))
           if w.dtype == FP8_DTYPE]
    scales = {"w_gate_up_scale": w_gate_up_scale, "w_down_scale": w_down_scale}
    if not fp8:
        for name, scale in scales.items():
            if scale is not None:
                raise ValueError(f"{name} is given but the expert weights are {w_gate_up.dtype}; "
                                 "scales go with float8_e4m3fn weights only")
        return
    if len(fp8) == 1:
        raise TypeError(f"{fp8[0]} is float8_e4m3fn but the other expert weight is not: both "
                        "expert weights must be float8_e4m3fn (with their scales) or neither")
    if hidden_states.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"hidden_states must be bfloat16 or float16 with float8_e4m3fn expert "
                        f"weights, got {hidden_states.dtype}")
    for (name, scale), weight in zip(scales.items(), (w_gate_up, w_down)):
        if scale is None:
            raise ValueError(f"{name} is required with float8_e4m3fn expert weights: [E, N/128, "
                             "K/128] for 128x128 blocks or [E, N] per output channel")
        if not isinstance(scale, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(scale).__name__}")
        if scale.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {scale.dtype}")
        if scale.dim() not in (2, 3):
            raise ValueError(f"{name} must be 3-D [E, cdiv(N, 128), cdiv(K, 128)] (128x128 "
                             f"blocks) or 2-D [E, N] (per channel), got shape {tuple(scale.shape)}")
        expected = scale_shape(scheme_of(scale), weight.shape)
        if tuple(scale.shape) != expected:
            blocks = (" (128x128 blocks, the only block size supported)"
                      if scale.dim() == 3 else " (one per output row)")
            raise ValueError(f"{name} has shape {tuple(scale.shape)}, expected {expected} for "
                             f"weight shape {tuple(weight.shape)}{blocks}")
    if scheme_of(w_gate_up_scale) != scheme_of(w_down_scale):
        raise ValueError(f"w_gate_up_scale is {scheme_of(w_gate_up_scale)}-scaled but "
                         f"w_down_scale is {scheme_of(w_down_scale)}-scaled; use one scheme")
    _expect_same_device(hidden_states, **scales)
    _expect_contiguous(**scales)


def check_expert_weights(hidden_states, w_gate_up, w_down, w_gate_up_scale=None,
                         w_down_scale=None) -> None:
    """Checks of the expert weights (and fp8 scales) against the hidden states (metadata only)."""
    _expect_rank("hidden_states", hidden_states, 2, "[num_tokens, hidden]")
    _expect_rank("w_gate_up", w_gate_up, 3, "[num_experts, 2 * intermediate, hidden]")
    _expect_rank("w_down", w_down, 3, "[num_experts, hidden, intermediate]")
    _expect_fp8_experts(hidden_states, w_gate_up, w_down, w_gate_up_scale, w_down_scale)
    if w_gate_up.dtype != FP8_DTYPE:
        _expect_weight_dtypes(hidden_states, "w_gate_up", w_gate_up, w_down=w_down)
    _expect_same_device(hidden_states, w_gate_up=w_gate_up, w_down=w_down)
    _expect_kernel_device("hidden_states", hidden_states)
    num_experts, hidden = w_gate_up.shape[0], w_gate_up.shape[2]
    if w_gate_up.shape[1] % 2 != 0:
        raise ValueError(f"w_gate_up dim 1 must be 2 * intermediate (gate rows then up rows), "
                         f"got {w_gate_up.shape[1]}")
    _expect_dim("w_down", w_down, 0, num_experts, "num_experts of w_gate_up")
    _expect_dim("w_down", w_down, 1, hidden, "hidden size of w_gate_up")
    _expect_dim("w_down", w_down, 2, w_gate_up.shape[1] // 2, "intermediate size of w_gate_up")
    _expect_contiguous(w_gate_up=w_gate_up, w_down=w_down)
    _expect_hidden_size(hidden_states, "w_gate_up", hidden)


def check_experts_args(hidden_states, topk_weights, topk_ids, w_gate_up, w_down,
                       w_gate_up_scale=None, w_down_scale=None) -> None:
    """Checks of ``tritonmoe::fused_experts``' arguments (metadata only)."""
    check_expert_weights(hidden_states, w_gate_up, w_down, w_gate_up_scale, w_down_scale)
    _expect_rank("topk_weights", topk_weights, 2, "[num_tokens, top_k]")
    _expect_rank("topk_ids", topk_ids, 2, "[num_tokens, top_k]")
    _expect_same_device(hidden_states, topk_weights=topk_weights, topk_ids=topk_ids)
    num_experts = w_gate_up.shape[0]
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}")
    if topk_ids.dtype not in ID_DTYPES:
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    _expect_dim("topk_weights", topk_weights, 0, hidden_states.shape[0], "num_tokens")
    _expect_dim("topk_ids", topk_ids, 0, hidden_states.shape[0], "num_tokens")
    _expect_dim("topk_ids", topk_ids, 1, topk_weights.shape[1], "top_k of topk_weights")
    top_k = topk_ids.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k (dim 1 of topk_ids) must be in [1, num_experts={num_experts}], "
                         f"got {top_k}")


def check_topk_ids_in_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Data check: every id in [0, num_experts). Eager only; skipped while capturing."""
    if not _check_topk_ids or topk_ids.numel() == 0:
        return
    if topk_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bad = (topk_ids < 0) | (topk_ids >= num_experts)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"topk_ids must lie in [0, num_experts={num_experts}); topk_ids{list(first)} = "
            f"{int(topk_ids[first])} (switch this check off with "
            f"moe_ops.set_topk_ids_check(False); out-of-range ids are then dropped)")


def check_moe_args(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring, n_group,
                   topk_group, score_bias, w_gate_up_scale=None, w_down_scale=None,
                   routed_scaling_factor=1.0) -> None:
    """Checks of ``tritonmoe::fused_moe``: the experts' weights and the input, the router
    against the experts, then the routing options. With fp8 experts the router has the
    hidden states' dtype."""
    check_expert_weights(hidden_states, w_gate_up, w_down, w_gate_up_scale, w_down_scale)
    _expect_rank("router_weight", router_weight, 2, "[num_experts, hidden]")
    if w_gate_up.dtype != FP8_DTYPE:
        # Against the experts first, so that a router of another dtype is named, not the input.
        _expect_weight_dtypes(hidden_states, "w_gate_up", w_gate_up, router_weight=router_weight)
    elif router_weight.dtype != hidden_states.dtype:
        raise TypeError(f"router_weight has dtype {router_weight.dtype}, expected hidden_states' "
                        f"dtype {hidden_states.dtype} (with float8_e4m3fn experts the router "
                        "has the hidden states' dtype)")
    _expect_dim("router_weight", router_weight, 1, w_gate_up.shape[2], "hidden size of w_gate_up")
    if router_weight.shape[0] != w_gate_up.shape[0]:
        raise ValueError(f"router_weight has {router_weight.shape[0]} experts, w_gate_up has "
                         f"{w_gate_up.shape[0]}; expected the same num_experts")
    check_route_args(hidden_states, router_weight, top_k, scoring, n_group, topk_group, score_bias,
                     routed_scaling_factor)
