"""Random inputs the tuner, the probe and the benchmarks time: expert weights and routing.

Routing skew is one model everywhere: each expert has a log popularity, zero for uniform
routing and ``-s * log(rank)`` for Zipf(s) over a random ranking of the experts, added to
N(0, 1) logits. Either the ids are drawn directly (``random_routing``), or a router's
column 0 carries the popularity and every token's hidden column 0 is 1 (``bias_column``
and ``tokens_with_bias_input``), so that a real router computes the same skew.
"""
from __future__ import annotations

import torch

from moe_ops.configs import get_config, shrink


def random_expert_weights(cfg, dtype: torch.dtype, device, gen: torch.Generator | None = None):
    """(w_gate_up [E, 2I, H], w_down [E, H, I]) of N(0, 1/fan_in) entries for a MoE config."""
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    w_gate_up = torch.randn(e, 2 * i, h, dtype=dtype, device=device, generator=gen).mul_(h**-0.5)
    w_down = torch.randn(e, h, i, dtype=dtype, device=device, generator=gen).mul_(i**-0.5)
    return w_gate_up, w_down


def log_popularity(num_experts: int, zipf_s: float, device, gen: torch.Generator | None = None):
    """[E] fp32: zeros for uniform routing (zipf_s = 0, nothing drawn), else -zipf_s * log(rank)
    with ranks 1..E a random permutation of the experts."""
    if zipf_s <= 0:
        return torch.zeros(num_experts, device=device)
    rank = torch.randperm(num_experts, device=device, generator=gen).float() + 1
    return -zipf_s * rank.log()


def random_routing(num_tokens: int, num_experts: int, top_k: int, zipf_s: float, device,
                   gen: torch.Generator | None = None):
    """(topk_weights fp32 [T, K], topk_ids int32 [T, K]): the top-k of N(0, 1) logits plus
    the log popularity, and softmax weights of separate N(0, 1) draws."""
    logits = torch.randn(num_tokens, num_experts, device=device, generator=gen)
    logits += log_popularity(num_experts, zipf_s, device, gen)
    topk_ids = logits.topk(top_k, dim=1).indices.to(torch.int32).contiguous()
    topk_weights = torch.softmax(torch.randn(num_tokens, top_k, device=device, generator=gen), dim=1)
    return topk_weights, topk_ids


def bias_column(router: torch.Tensor, log_pop: torch.Tensor) -> None:
    """Make router [E, H] column 0 the per-expert logit bias ``log_pop`` (in place)."""
    router[:, 0] = log_pop.to(router.dtype)


def tokens_with_bias_input(num_tokens: int, hidden: int, dtype: torch.dtype, device,
                           gen: torch.Generator | None = None) -> torch.Tensor:
    """x [T, H] of N(0, 1) entries with column 0 set to 1, the input of ``bias_column``."""
    x = torch.randn(num_tokens, hidden, device=device, generator=gen)
    x[:, 0] = 1.0
    return x.to(dtype)


# The cells every GPU table covers: four real models, decode to large prefill.
MODELS = ["mixtral-8x7b", "deepseek-v3", "qwen2-57b-a14b", "qwen3-30b-a3b"]
TOKEN_COUNTS = [1, 8, 32, 128, 512, 2048, 8192]


def layer_config(name: str, gpu: bool):
    """The named model's MoE config: full size on a GPU, ``shrink``-ed for the interpreter."""
    return get_config(name) if gpu else shrink(name)
