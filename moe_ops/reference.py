"""The plain PyTorch MoE forward that every kernel is tested against.

A loop over experts with float32 accumulation. Routing follows the real models:
softmax models (Mixtral, Qwen) take router logits rounded to the hidden dtype (their
router is an ``nn.Linear`` in that dtype) and soft-max them in float32; DeepSeek-V3
computes logits in float32, scores with a sigmoid, selects by score + bias among the
best ``topk_group`` groups (group score = sum of its top-2) and weights by the
unbiased score.
Ties break toward the lower expert index (a stable sort; ``torch.topk`` itself does
not promise an order among equal values).
"""
from __future__ import annotations

import math

import torch

from .fp8 import dequantize_weight, quantize_activations, scheme_of


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (||out - ref|| when ref is zero); NaN when either
    holds a NaN or an Inf, so that ``rel_l2(...) <= tol`` never passes on non-finite output."""
    out, ref = out.double(), ref.double()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return math.nan
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def _topk_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row; equal values keep the lower index first."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def route_reference(
    hidden_states: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    n_group: int = 1,
    topk_group: int = 1,
    score_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(topk_weights fp32 [T,K], topk_ids int32 [T,K])``."""
    logits = hidden_states.float() @ router_weight.float().t()
    num_experts = router_weight.shape[0]
    if scoring == "softmax":
        scores = torch.softmax(logits.to(hidden_states.dtype).float(), dim=-1)
        choice = scores
    else:
        scores = torch.sigmoid(logits)
        choice = scores if score_bias is None else scores + score_bias.float()
    if n_group > 1:
        grouped = choice.view(-1, n_group, num_experts // n_group)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        group_idx = _topk_indices(group_scores, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask.repeat_interleave(num_experts // n_group, dim=1)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    topk_ids = _topk_indices(choice, top_k)
    topk_weights = scores.gather(1, topk_ids)
    if renormalize:
        eps = 1e-20 if scoring == "sigmoid" else 0.0
        topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + eps)
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights.float(), topk_ids.to(torch.int32)


def fused_experts_reference(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    w_gate_up_scale: torch.Tensor | None = None,
    w_down_scale: torch.Tensor | None = None,
    fp8_activations: tuple[bool, bool] = (False, False),
) -> torch.Tensor:
    """sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t,k].

    fp8 weights come with their scales (``moe_ops.fp8``) and are dequantised;
    ``fp8_activations`` (gate_up, down) quantises that stage's input rows the way the
    kernels' fp8-activation tiles do (``TileConfig.A_FP8``: per row with channel scales,
    per row per 128 columns with block scales)."""
    per_row = scheme_of(w_gate_up_scale) == "channel"
    num_tokens, hidden = hidden_states.shape
    inter = w_down.shape[2]
    if w_gate_up_scale is not None:
        w_gate_up = dequantize_weight(w_gate_up, w_gate_up_scale)
        w_down = dequantize_weight(w_down, w_down_scale)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=hidden_states.device)
    x = hidden_states.float()
    for expert in range(w_gate_up.shape[0]):
        token_idx, k_idx = torch.where(topk_ids == expert)
        if token_idx.numel() == 0:
            continue
        rows = x[token_idx]
        if fp8_activations[0]:
            rows = quantize_activations(rows, per_row)
        gate_up = rows @ w_gate_up[expert].float().t()
        h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        # The kernels hand h to the down projection in the hidden dtype.
        h = h.to(hidden_states.dtype).float()
        if fp8_activations[1]:
            h = quantize_activations(h, per_row)
        y = (h @ w_down[expert].float().t()) * topk_weights[token_idx, k_idx, None].float()
        out.index_add_(0, token_idx, y)
    return out.to(hidden_states.dtype)


def moe_reference(hidden_states: torch.Tensor, router_weight: torch.Tensor,
                  w_gate_up: torch.Tensor, w_down: torch.Tensor, *routing_args,
                  **routing_kwargs) -> torch.Tensor:
    """Routing followed by the expert loop: the truth for ``tritonmoe::fused_moe``. The
    routing arguments (top_k, scoring, ...) are ``route_reference``'s."""
    topk_weights, topk_ids = route_reference(hidden_states, router_weight, *routing_args,
                                             **routing_kwargs)
    return fused_experts_reference(hidden_states, topk_weights, topk_ids, w_gate_up, w_down)


def swiglu_mlp_reference(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU MLP (a shared expert): w_gate_up [2I, H], w_down [H, I]."""
    inter = w_down.shape[1]
    gate_up = x.float() @ w_gate_up.float().t()
    h = torch.nn.functional.silu(gate_up[..., :inter]) * gate_up[..., inter:]
    return (h @ w_down.float().t()).to(x.dtype)
