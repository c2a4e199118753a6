"""The ``tritonmoe::`` ops: each real implementation beside its fake one.

    tritonmoe::route(hidden_states, router_weight, top_k, scoring, renormalize, n_group,
                     topk_group, score_bias, routed_scaling_factor) -> (weights, ids)
    tritonmoe::fused_experts(hidden_states, topk_weights, topk_ids, w_gate_up, w_down)
    tritonmoe::fused_moe(hidden_states, router_weight, w_gate_up, w_down, top_k, ...)

The real implementations validate (``moe_ops.validation``) and launch
(``moe_ops.pipeline``); the fakes validate the same metadata and describe the output,
so ``torch.compile(fullgraph=True)`` captures each op as one node, static or dynamic.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .pipeline import fused_experts_impl, fused_moe_impl
from .routing import route_impl
from .validation import (check_experts_args, check_moe_args, check_route_args,
                         check_topk_ids_in_range)


def _prepare_experts_inputs(hidden_states, topk_weights, topk_ids):
    # Activations are small: copying a strided view costs little, unlike weights.
    return (hidden_states.contiguous(), topk_weights.contiguous(),
            topk_ids.to(torch.int32).contiguous())


def _contiguous_bias(score_bias):
    return None if score_bias is None else score_bias.contiguous()


@torch.library.custom_op("tritonmoe::route", mutates_args=())
def route(
    hidden_states: Tensor, router_weight: Tensor, top_k: int, scoring: str = "softmax",
    renormalize: bool = True, n_group: int = 1, topk_group: int = 1,
    score_bias: Optional[Tensor] = None, routed_scaling_factor: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Router logits -> scores -> (grouped) top-k: fp32 weights [T,K], int32 ids [T,K]."""
    check_route_args(hidden_states, router_weight, top_k, scoring, n_group, topk_group, score_bias)
    return route_impl(hidden_states.contiguous(), router_weight, top_k, scoring, renormalize,
                      n_group, topk_group, _contiguous_bias(score_bias), routed_scaling_factor)


@route.register_fake
def _route_fake(hidden_states, router_weight, top_k, scoring="softmax", renormalize=True,
                n_group=1, topk_group=1, score_bias=None, routed_scaling_factor=1.0):
    check_route_args(hidden_states, router_weight, top_k, scoring, n_group, topk_group, score_bias)
    num_tokens = hidden_states.shape[0]
    return (hidden_states.new_empty(num_tokens, top_k, dtype=torch.float32),
            hidden_states.new_empty(num_tokens, top_k, dtype=torch.int32))


@torch.library.custom_op("tritonmoe::fused_experts", mutates_args=())
def fused_experts(
    hidden_states: Tensor, topk_weights: Tensor, topk_ids: Tensor, w_gate_up: Tensor,
    w_down: Tensor,
) -> Tensor:
    """sum_k topk_weights[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_ids[t,k]."""
    check_experts_args(hidden_states, topk_weights, topk_ids, w_gate_up, w_down)
    check_topk_ids_in_range(topk_ids, w_gate_up.shape[0])
    hidden_states, topk_weights, topk_ids = _prepare_experts_inputs(
        hidden_states, topk_weights, topk_ids)
    return fused_experts_impl(hidden_states, topk_weights, topk_ids, w_gate_up, w_down)


@fused_experts.register_fake
def _fused_experts_fake(hidden_states, topk_weights, topk_ids, w_gate_up, w_down):
    check_experts_args(hidden_states, topk_weights, topk_ids, w_gate_up, w_down)
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


@torch.library.custom_op("tritonmoe::fused_moe", mutates_args=())
def fused_moe(
    hidden_states: Tensor, router_weight: Tensor, w_gate_up: Tensor, w_down: Tensor,
    top_k: int, scoring: str = "softmax", renormalize: bool = True, n_group: int = 1,
    topk_group: int = 1, score_bias: Optional[Tensor] = None,
    routed_scaling_factor: float = 1.0,
) -> Tensor:
    """route + fused_experts in five launches; our router's ids are trusted (no data check)."""
    check_moe_args(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring, n_group,
                    topk_group, score_bias)
    return fused_moe_impl(hidden_states.contiguous(), router_weight, w_gate_up, w_down, top_k,
                          scoring, renormalize, n_group, topk_group,
                          _contiguous_bias(score_bias), routed_scaling_factor)


@fused_moe.register_fake
def _fused_moe_fake(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring="softmax",
                    renormalize=True, n_group=1, topk_group=1, score_bias=None,
                    routed_scaling_factor=1.0):
    check_moe_args(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring, n_group,
                    topk_group, score_bias)
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


_WEIGHTS = ("router_weight", "w_gate_up", "w_down", "score_bias")


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


for _op in (route, fused_experts, fused_moe):
    register_forward_only(_op)
