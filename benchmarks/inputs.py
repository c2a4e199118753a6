"""What one benchmark cell runs on: a model's random MoE layer and T tokens routed by it.

The router's column 0 carries a per-expert logit bias and every token's column 0 is 1
(``tools.workloads``), so logits = N(0, 1) noise + log popularity: zero for uniform
routing, -s*log(rank) for Zipf(s). Routing is computed once per cell by the reference
router, outside every timing; systems that route themselves see the same router.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_ops.configs import MoEConfig
from moe_ops.reference import route_reference
from tools.workloads import bias_column, log_popularity, random_expert_weights, tokens_with_bias_input


@dataclass
class Layer:
    """One model's MoE layer with random weights (what every system of a model shares)."""

    cfg: MoEConfig
    w_gate_up: torch.Tensor  # [E, 2I, H]
    w_down: torch.Tensor  # [E, H, I]
    router: torch.Tensor  # [E, H]
    score_bias: torch.Tensor | None  # [E] fp32, DeepSeek-V3 only

    @property
    def moe_kwargs(self) -> dict:
        """Routing keyword arguments of ``fused_moe`` / ``moe_reference`` for this layer."""
        return dict(self.cfg.routing_kwargs(), score_bias=self.score_bias)


@dataclass
class Cell:
    """One (model, T): the tokens and their routing."""

    layer: Layer
    x: torch.Tensor  # [T, H]
    topk_weights: torch.Tensor  # [T, K] fp32
    topk_ids: torch.Tensor  # [T, K] int32

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]


def random_layer(cfg: MoEConfig, dtype: torch.dtype, device, zipf_s: float,
                 gen: torch.Generator) -> Layer:
    """Random experts, a router with the popularity bias (zipf_s = 0: uniform) and, for
    DeepSeek-V3, a zero score bias."""
    e, h = cfg.num_experts, cfg.hidden_size
    w_gate_up, w_down = random_expert_weights(cfg, dtype, device, gen)
    router = torch.randn(e, h, device=device, generator=gen) * (h - 1) ** -0.5
    bias_column(router, log_popularity(e, zipf_s, device, gen))
    score_bias = torch.zeros(e, dtype=torch.float32, device=device) if cfg.score_bias else None
    return Layer(cfg, w_gate_up, w_down, router.to(dtype), score_bias)


def routed_cell(layer: Layer, num_tokens: int, gen: torch.Generator) -> Cell:
    """``num_tokens`` random tokens and the reference router's top-k of them."""
    w = layer.w_gate_up
    x = tokens_with_bias_input(num_tokens, layer.cfg.hidden_size, w.dtype, w.device, gen)
    topk_weights, topk_ids = route_reference(x, layer.router, **layer.moe_kwargs)
    return Cell(layer, x, topk_weights, topk_ids)
