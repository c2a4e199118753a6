"""The real models' MoE layer settings, one table keyed by model name.

Values are read off each model's published ``config.json``: hidden size, the routed
experts' intermediate size, routing (scoring, top-k, renormalisation, groups, bias,
scaling) and the shared experts. ``shrink`` makes a CPU-sized copy that keeps the
routing (E, K, groups, scoring) and only narrows the matrices.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class MoEConfig:
    """Shapes and routing of one MoE layer."""

    name: str
    hidden_size: int
    intermediate_size: int  # per routed expert
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    renormalize: bool = True  # norm_topk_prob
    n_group: int = 1
    topk_group: int = 1
    score_bias: bool = False  # DeepSeek-V3's e_score_correction_bias
    routed_scaling_factor: float = 1.0
    shared_experts: int = 0
    shared_intermediate_size: int = 0  # total width of the shared MLP
    shared_gated: bool = False  # Qwen2-MoE: sigmoid(x . w_shared_gate) scales it

    def routing_kwargs(self) -> dict:
        """Keyword arguments of ``tritonmoe::route`` / ``fused_moe`` for this config."""
        return dict(
            top_k=self.top_k,
            scoring=self.scoring,
            renormalize=self.renormalize,
            n_group=self.n_group,
            topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor,
        )


CONFIGS: dict[str, MoEConfig] = {
    c.name: c
    for c in [
        MoEConfig("mixtral-8x7b", 4096, 14336, 8, 2),
        MoEConfig("mixtral-8x22b", 6144, 16384, 8, 2),
        MoEConfig(
            "deepseek-v3", 7168, 2048, 256, 8, scoring="sigmoid", renormalize=True,
            n_group=8, topk_group=4, score_bias=True, routed_scaling_factor=2.5,
            shared_experts=1, shared_intermediate_size=2048,
        ),
        MoEConfig(
            "qwen2-57b-a14b", 3584, 2560, 64, 8, renormalize=False,
            shared_experts=1, shared_intermediate_size=20480, shared_gated=True,
        ),
        MoEConfig(
            "qwen1.5-moe-a2.7b", 2048, 1408, 60, 4, renormalize=False,
            shared_experts=1, shared_intermediate_size=5632, shared_gated=True,
        ),
        MoEConfig("qwen3-30b-a3b", 2048, 768, 128, 8, renormalize=True),
        MoEConfig("qwen3-235b-a22b", 4096, 1536, 128, 8, renormalize=True),
    ]
}


def get_config(name_or_config: str | MoEConfig) -> MoEConfig:
    """Look a config up by name (or pass one through)."""
    if isinstance(name_or_config, MoEConfig):
        return name_or_config
    try:
        return CONFIGS[name_or_config]
    except KeyError:
        raise ValueError(
            f"unknown model config {name_or_config!r}; expected one of {sorted(CONFIGS)}"
        ) from None


def shrink(config: str | MoEConfig, hidden_size: int = 64, intermediate_size: int = 48) -> MoEConfig:
    """A CPU-sized copy: same experts, top-k and routing; narrow matrices.

    The shared expert keeps its width ratio to the routed experts.
    """
    config = get_config(config)
    ratio = config.shared_intermediate_size / config.intermediate_size
    return replace(
        config,
        name=f"{config.name}-shrunk",
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        shared_intermediate_size=int(round(ratio * intermediate_size)),
    )
