"""The ``tritonmoe::`` ops, each real implementation beside its fake one, and the
documented Python functions ``route``, ``fused_experts`` and ``fused_moe`` that call them.

    tritonmoe::route(hidden_states, router_weight, top_k, scoring, renormalize, n_group,
                     topk_group, score_bias, routed_scaling_factor) -> (weights, ids)
    tritonmoe::fused_experts(hidden_states, topk_weights, topk_ids, w_gate_up, w_down,
                             w_gate_up_scale, w_down_scale)
    tritonmoe::fused_moe(hidden_states, router_weight, w_gate_up, w_down, top_k, ...,
                         w_gate_up_scale, w_down_scale)

The scales are None for float expert weights and float32 tensors for float8_e4m3fn ones
(``moe_ops.fp8``: 128x128 blocks or per output channel).

The real implementations validate (``moe_ops.validation``) and launch
(``moe_ops.pipeline``); the fakes validate the same metadata and describe the output,
so ``torch.compile(fullgraph=True)`` captures each op as one node, static or dynamic.
The Python functions call the op; in plain eager mode, where the dispatcher would only
add host time, they call the real implementation directly (``plain_eager``).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .pipeline import fused_experts_impl, fused_moe_impl
from .routing import Routing, route as route_tokens
from .validation import (check_experts_args, check_moe_args, check_route_args,
                         check_topk_ids_in_range)


@functools.lru_cache(maxsize=256)
def _routing(top_k, scoring, renormalize, n_group, topk_group, routed_scaling_factor) -> Routing:
    # Plain Python numbers for the kernels (a config may hold numpy ones).
    return Routing(int(top_k), scoring, bool(renormalize), int(n_group), int(topk_group),
                   float(routed_scaling_factor))


def _contiguous_bias(score_bias):
    return None if score_bias is None else score_bias.contiguous()


# ----------------------------------------------------------------------------- route

def _route_real(hidden_states, router_weight, top_k, scoring, renormalize, n_group, topk_group,
                score_bias, routed_scaling_factor):
    check_route_args(hidden_states, router_weight, top_k, scoring, n_group, topk_group, score_bias,
                     routed_scaling_factor)
    routing = _routing(top_k, scoring, renormalize, n_group, topk_group, routed_scaling_factor)
    weights, ids, _ = route_tokens(hidden_states.contiguous(), router_weight, routing,
                                   _contiguous_bias(score_bias))
    return weights, ids


@torch.library.custom_op("tritonmoe::route", mutates_args=())
def _route_op(
    hidden_states: Tensor, router_weight: Tensor, top_k: int, scoring: str = "softmax",
    renormalize: bool = True, n_group: int = 1, topk_group: int = 1,
    score_bias: Optional[Tensor] = None, routed_scaling_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    return _route_real(hidden_states, router_weight, top_k, scoring, renormalize, n_group,
                       topk_group, score_bias, routed_scaling_factor)


@_route_op.register_fake
def _route_fake(hidden_states, router_weight, top_k, scoring="softmax", renormalize=True,
                n_group=1, topk_group=1, score_bias=None, routed_scaling_factor=1.0):
    check_route_args(hidden_states, router_weight, top_k, scoring, n_group, topk_group, score_bias,
                     routed_scaling_factor)
    num_tokens = hidden_states.shape[0]
    return (hidden_states.new_empty(num_tokens, top_k, dtype=torch.float32),
            hidden_states.new_empty(num_tokens, top_k, dtype=torch.int32))


# --------------------------------------------------------------------- fused_experts

def _fused_experts_real(hidden_states, topk_weights, topk_ids, w_gate_up, w_down,
                        w_gate_up_scale=None, w_down_scale=None):
    check_experts_args(hidden_states, topk_weights, topk_ids, w_gate_up, w_down, w_gate_up_scale,
                       w_down_scale)
    num_experts = w_gate_up.shape[0]
    check_topk_ids_in_range(topk_ids, num_experts)
    if topk_ids.dtype == torch.int64:
        # Out-of-range ids are dropped (the check off); int32 must not wrap one into range.
        topk_ids = topk_ids.clamp(-1, num_experts)
    # Activations are small: copying a strided view costs little, unlike weights.
    return fused_experts_impl(hidden_states.contiguous(), topk_weights.contiguous(),
                              topk_ids.to(torch.int32).contiguous(), w_gate_up, w_down,
                              w_gate_up_scale=w_gate_up_scale, w_down_scale=w_down_scale)


@torch.library.custom_op("tritonmoe::fused_experts", mutates_args=())
def _fused_experts_op(
    hidden_states: Tensor, topk_weights: Tensor, topk_ids: Tensor, w_gate_up: Tensor,
    w_down: Tensor, w_gate_up_scale: Optional[Tensor] = None,
    w_down_scale: Optional[Tensor] = None,
) -> Tensor:
    return _fused_experts_real(hidden_states, topk_weights, topk_ids, w_gate_up, w_down,
                               w_gate_up_scale, w_down_scale)


@_fused_experts_op.register_fake
def _fused_experts_fake(hidden_states, topk_weights, topk_ids, w_gate_up, w_down,
                        w_gate_up_scale=None, w_down_scale=None):
    check_experts_args(hidden_states, topk_weights, topk_ids, w_gate_up, w_down, w_gate_up_scale,
                       w_down_scale)
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------- fused_moe

def _fused_moe_real(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring, renormalize,
                    n_group, topk_group, score_bias, routed_scaling_factor, w_gate_up_scale=None,
                    w_down_scale=None):
    check_moe_args(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring, n_group,
                   topk_group, score_bias, w_gate_up_scale, w_down_scale, routed_scaling_factor)
    routing = _routing(top_k, scoring, renormalize, n_group, topk_group, routed_scaling_factor)
    # Our router's ids are in range by construction: no data check.
    return fused_moe_impl(hidden_states.contiguous(), router_weight, w_gate_up, w_down, routing,
                          _contiguous_bias(score_bias), w_gate_up_scale, w_down_scale)


@torch.library.custom_op("tritonmoe::fused_moe", mutates_args=())
def _fused_moe_op(
    hidden_states: Tensor, router_weight: Tensor, w_gate_up: Tensor, w_down: Tensor,
    top_k: int, scoring: str = "softmax", renormalize: bool = True, n_group: int = 1,
    topk_group: int = 1, score_bias: Optional[Tensor] = None,
    routed_scaling_factor: float = 1.0, w_gate_up_scale: Optional[Tensor] = None,
    w_down_scale: Optional[Tensor] = None,
) -> Tensor:
    return _fused_moe_real(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring,
                           renormalize, n_group, topk_group, score_bias, routed_scaling_factor,
                           w_gate_up_scale, w_down_scale)


@_fused_moe_op.register_fake
def _fused_moe_fake(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring="softmax",
                    renormalize=True, n_group=1, topk_group=1, score_bias=None,
                    routed_scaling_factor=1.0, w_gate_up_scale=None, w_down_scale=None):
    check_moe_args(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring, n_group,
                   topk_group, score_bias, w_gate_up_scale, w_down_scale, routed_scaling_factor)
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


# ---------------------------------------------------------- the documented functions

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors) -> bool:
    """Whether the real implementation may run without the dispatcher: plain eager mode
    (not tracing, no dispatch mode such as FakeTensorMode or make_fx active), plain
    tensors or parameters (no other subclass) holding data (meta tensors go to the fake
    implementation), and no autograd graph to record (so that the op's forward-only error
    still fires where a backward would be wanted)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for tensor in tensors:
        if tensor is not None and (type(tensor) not in _PLAIN_TYPES or tensor.is_meta
                                   or (grad and tensor.requires_grad)):
            return False
    return True


def route(hidden_states: Tensor, router_weight: Tensor, top_k: int, scoring: str = "softmax",
          renormalize: bool = True, n_group: int = 1, topk_group: int = 1,
          score_bias: Optional[Tensor] = None,
          routed_scaling_factor: float = 1.0) -> tuple[Tensor, Tensor]:
    """Route tokens to experts: ``(topk_weights, topk_ids)`` (op ``tritonmoe::route``).

    Args:
        hidden_states: [T, H] float32, float16 or bfloat16.
        router_weight: [E, H], the hidden states' dtype, contiguous.
        top_k: experts per token, 1 <= top_k <= E.
        scoring: ``"softmax"`` (Mixtral, Qwen: softmax of the logits rounded to the
            hidden dtype) or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: divide the k weights by their sum (+1e-20 under sigmoid).
        n_group, topk_group: DeepSeek-V3's grouped selection (sigmoid only): keep the
            ``topk_group`` of ``n_group`` expert groups with the largest sum of their
            top-2 scores, then pick top_k among their experts.
        score_bias: [E] float32 score-correction bias (sigmoid only), added for the
            selection, not to the weights.
        routed_scaling_factor: multiplies the final weights.

    Returns:
        topk_weights [T, top_k] float32 and topk_ids [T, top_k] int32, the experts in
        descending score order, ties toward the lower expert index.
    """
    if plain_eager(hidden_states, router_weight, score_bias):
        return _route_real(hidden_states, router_weight, top_k, scoring, renormalize, n_group,
                           topk_group, score_bias, routed_scaling_factor)
    return torch.ops.tritonmoe.route(hidden_states, router_weight, top_k, scoring, renormalize,
                                     n_group, topk_group, score_bias, routed_scaling_factor)


def fused_experts(hidden_states: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                  w_gate_up: Tensor, w_down: Tensor, w_gate_up_scale: Optional[Tensor] = None,
                  w_down_scale: Optional[Tensor] = None) -> Tensor:
    """The routed experts of given routing (op ``tritonmoe::fused_experts``):
    ``out[t] = sum_k topk_weights[t, k] * W_down[e] (silu(W_gate[e] x_t) * W_up[e] x_t)``
    with ``e = topk_ids[t, k]``.

    Args:
        hidden_states: [T, H] float32, float16 or bfloat16.
        topk_weights: [T, K] float32.
        topk_ids: [T, K] int32 or int64, each in [0, E): checked in eager mode (not
            during CUDA-graph capture; ``moe_ops.set_topk_ids_check(False)`` turns it off,
            and an out-of-range id is then dropped, never read or written out of bounds).
        w_gate_up: [E, 2I, H], rows 0:I gate and I:2I up (Hugging Face's
            ``experts.gate_up_proj``), the hidden dtype (or float8_e4m3fn), contiguous.
        w_down: [E, H, I], the same dtype, contiguous.
        w_gate_up_scale, w_down_scale: with float8_e4m3fn weights (bfloat16 or float16
            hidden states), their float32 dequantisation multipliers (transformers'
            ``*_scale_inv``): [E, cdiv(N, 128), cdiv(K, 128)] for 128x128 blocks or [E, N]
            per output row, for a weight [E, N, K]. None for float weights.

    Returns:
        out [T, H] in the hidden dtype.
    """
    if plain_eager(hidden_states, topk_weights, topk_ids, w_gate_up, w_down):
        return _fused_experts_real(hidden_states, topk_weights, topk_ids, w_gate_up, w_down,
                                   w_gate_up_scale, w_down_scale)
    return torch.ops.tritonmoe.fused_experts(hidden_states, topk_weights, topk_ids, w_gate_up,
                                             w_down, w_gate_up_scale, w_down_scale)


def fused_moe(hidden_states: Tensor, router_weight: Tensor, w_gate_up: Tensor, w_down: Tensor,
              top_k: int, scoring: str = "softmax", renormalize: bool = True, n_group: int = 1,
              topk_group: int = 1, score_bias: Optional[Tensor] = None,
              routed_scaling_factor: float = 1.0, w_gate_up_scale: Optional[Tensor] = None,
              w_down_scale: Optional[Tensor] = None) -> Tensor:
    """One MoE layer's routed experts in five launches (op ``tritonmoe::fused_moe``):
    ``route`` then ``fused_experts``, with the same arguments as those two (shapes:
    hidden_states [T, H], router_weight [E, H], w_gate_up [E, 2I, H], w_down [E, H, I],
    all one dtype, or fp8 experts with their scales and a router in the hidden dtype;
    score_bias [E] float32). The router's ids are trusted (no data check).

    Returns:
        out [T, H] in the hidden dtype (without any shared expert: see ``FusedMoE``).
    """
    if plain_eager(hidden_states, router_weight, w_gate_up, w_down, score_bias):
        return _fused_moe_real(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring,
                               renormalize, n_group, topk_group, score_bias,
                               routed_scaling_factor, w_gate_up_scale, w_down_scale)
    return torch.ops.tritonmoe.fused_moe(hidden_states, router_weight, w_gate_up, w_down, top_k,
                                         scoring, renormalize, n_group, topk_group, score_bias,
                                         routed_scaling_factor, w_gate_up_scale, w_down_scale)


# ------------------------------------------------------------------- forward only

_WEIGHTS = ("router_weight", "w_gate_up", "w_down", "score_bias", "w_gate_up_scale",
            "w_down_scale")


def _forward_only_message(op_name: str, needs_grad: list[str]) -> str:
    """The error of a backward through ``tritonmoe::op_name``, whose arguments
    ``needs_grad`` require grad: what is missing and the ways out that apply."""
    weights = [name for name in needs_grad if name in _WEIGHTS]
    inputs = [name for name in needs_grad if name not in _WEIGHTS]
    text = f"tritonmoe::{op_name}: the tritonmoe ops are forward-only (no backward is implemented). "
    if weights:
        text += (f"Its weights {', '.join(weights)} require grad: give them requires_grad=False "
                 "(FusedMoE and patched blocks do). ")
    if inputs:
        text += (f"Gradients with respect to its input {', '.join(inputs)} are not implemented, "
                 "so nothing before this MoE layer (attention, LoRA adapters) can train through "
                 "it: to train, use the model's original MoE blocks. ")
    return text + "For inference, run under torch.no_grad() or torch.inference_mode()."


def register_forward_only(op) -> None:
    """A backward for ``op`` that raises, naming the inputs that wanted a gradient."""
    names = [argument.name for argument in op._opoverload._schema.arguments]

    def backward(ctx, *grads):
        needs_grad = [name for name, needed in zip(names, ctx.needs_input_grad) if needed]
        raise RuntimeError(_forward_only_message(op._name.split("::")[-1], needs_grad))

    op.register_autograd(backward, setup_context=_no_context)


def _no_context(ctx, inputs, output):
    return None


for _op in (_route_op, _fused_experts_op, _fused_moe_op):
    register_forward_only(_op)
