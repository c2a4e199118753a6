"""Hugging Face transformers (5.x) MoE blocks: recognise them and read their weights and routing.

Supported blocks and what each computes (read off transformers 5.23):

    MixtralSparseMoeBlock   softmax top-k, always renormalised; jitter only in training
    Qwen3MoeSparseMoeBlock  softmax top-k, renormalised iff norm_topk_prob
    Qwen2MoeSparseMoeBlock  as Qwen3, plus sigmoid(shared_expert_gate(x)) * shared_expert(x)
    DeepseekV3MoE           sigmoid + fp32 score-correction bias, grouped top-k,
                            renormalise (+1e-20), routed_scaling_factor, + shared_experts(x)

All four hold their experts as ``experts.gate_up_proj [E, 2I, H]`` and
``experts.down_proj [E, H, I]`` (the op layout) and return a plain tensor of the input's
shape; router logits reach ``output_router_logits`` through hooks on the router module,
which a patched model no longer has, so models configured to output them are refused.
Blocks are recognised by class name and defining module, so this file never imports
transformers.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .configs import MoEConfig

# Block class name -> (transformers module, kind). Matched on the exact type: a subclass
# may change the forward, so it is refused rather than silently converted.
SUPPORTED = {
    "MixtralSparseMoeBlock": ("transformers.models.mixtral.modeling_mixtral", "mixtral"),
    "Qwen2MoeSparseMoeBlock": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "qwen2_moe"),
    "Qwen3MoeSparseMoeBlock": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "qwen3_moe"),
    "DeepseekV3MoE": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "deepseek_v3"),
}
# Names that mark an MoE block we do not know (OlmoeSparseMoeBlock, Qwen3NextSparseMoeBlock, ...).
MOE_NAME = re.compile(r"Mo[Ee](Block)?$")


def read_block(block: nn.Module, copy: bool = True,
               where: str | None = None) -> tuple[MoEConfig, dict[str, torch.Tensor | None]]:
    """A supported block's config and weights in the op layout: (config, {router_weight,
    w_gate_up, w_down, score_bias, shared_gate_up, shared_down, shared_gate}), absent ones
    None. With ``copy=False`` the tensors share the block's (contiguous) storage."""
    kind = kind_of(block)
    name = f"{where} ({type(block).__name__})" if where else type(block).__name__
    if kind is None:
        raise TypeError(f"{name}: unsupported MoE block type; supported: {sorted(SUPPORTED)}")

    experts, router = block.experts, block.gate
    _check_experts(name, experts)
    num_experts, two_inter, hidden = experts.gate_up_proj.shape
    dtype = experts.gate_up_proj.dtype
    if router.weight.dtype != dtype:
        raise ValueError(f"{name}: router weight dtype {router.weight.dtype} differs from the "
                         f"experts' {dtype}; the fused op needs one dtype")
    routing = dict(top_k=int(router.top_k))
    shared_inter, shared_gated = 0, False

    if kind == "mixtral":
        jitter = getattr(block, "jitter_noise", 0.0) or 0.0
        if jitter > 0 and block.training:
            raise ValueError(f"{name}: router_jitter_noise={jitter} in training mode is not "
                             "supported; call .eval() first or set router_jitter_noise=0")
        routing.update(renormalize=True)
    elif kind in ("qwen2_moe", "qwen3_moe"):
        routing.update(renormalize=bool(router.norm_topk_prob))
    else:  # deepseek_v3
        routing.update(_deepseek_routing(name, block, num_experts))

    if kind == "qwen2_moe":
        shared_mlp = block.shared_expert
        shared_gated = True
        if block.shared_expert_gate.bias is not None:
            raise ValueError(f"{name}: shared_expert_gate with a bias is not supported")
    elif kind == "deepseek_v3":
        shared_mlp = block.shared_experts
    else:
        shared_mlp = None
    if shared_mlp is not None:
        _check_mlp(name, shared_mlp, dtype)
        shared_inter = shared_mlp.down_proj.weight.shape[1]

    config = MoEConfig(
        name=f"hf-{kind}", hidden_size=hidden, intermediate_size=two_inter // 2,
        num_experts=num_experts, shared_experts=1 if shared_mlp is not None else 0,
        shared_intermediate_size=shared_inter, shared_gated=shared_gated, **routing,
    )
    def take(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor.clone(memory_format=torch.contiguous_format) if copy else tensor.contiguous()

    weights = dict(
        router_weight=take(router.weight), w_gate_up=take(experts.gate_up_proj),
        w_down=take(experts.down_proj),
        score_bias=take(router.e_score_correction_bias).float() if config.score_bias else None,
        shared_gate_up=None, shared_down=None,
        shared_gate=take(block.shared_expert_gate.weight) if shared_gated else None)
    if shared_mlp is not None:
        weights["shared_gate_up"] = torch.cat(
            [shared_mlp.gate_proj.weight.detach(), shared_mlp.up_proj.weight.detach()], dim=0)
        weights["shared_down"] = take(shared_mlp.down_proj.weight)
    return config, weights


def _deepseek_routing(name: str, block: nn.Module, num_experts: int) -> dict:
    router, hf_config = block.gate, getattr(block, "config", None)
    # Checkpoints written for DeepSeek's own code may carry these; transformers' block
    # always computes noaux_tc with sigmoid scores, and so do we.
    topk_method = getattr(hf_config, "topk_method", "noaux_tc")
    if topk_method != "noaux_tc":
        raise ValueError(f"{name}: topk_method={topk_method!r} is not supported (only 'noaux_tc')")
    scoring_func = getattr(hf_config, "scoring_func", "sigmoid")
    if scoring_func != "sigmoid":
        raise ValueError(f"{name}: scoring_func={scoring_func!r} is not supported (only 'sigmoid')")
    n_group, topk_group = router.num_group, router.topk_group
    if not isinstance(n_group, int) or n_group < 1 or num_experts % n_group != 0:
        raise ValueError(f"{name}: n_group={n_group!r} must be a positive int dividing "
                         f"n_routed_experts={num_experts}")
    if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
        raise ValueError(
            f"{name}: topk_group={topk_group!r} must be an int in [1, n_group={n_group}]")
    if num_experts // n_group < 2:
        raise ValueError(f"{name}: groups of {num_experts // n_group} expert(s); the group score "
                         "is the sum of a group's top-2, so groups need >= 2 experts")
    return dict(scoring="sigmoid", renormalize=bool(router.norm_topk_prob), n_group=n_group,
                topk_group=topk_group, score_bias=True,
                routed_scaling_factor=float(router.routed_scaling_factor))


def _check_experts(name: str, experts: nn.Module) -> None:
    """The experts must be SwiGLU with concatenated [gate; up] rows, no bias, all local."""
    for attr, expected in (("has_gate", True), ("has_bias", False), ("is_transposed", False),
                           ("is_concatenated", True), ("_is_expert_parallel", False)):
        value = getattr(experts, attr, expected)
        if value != expected:
            raise ValueError(f"{name}: experts.{attr}={value} is not supported (need {expected})")
    _check_silu(name, "experts", experts.act_fn)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    num_experts, two_inter, hidden = gate_up.shape
    if tuple(down.shape) != (num_experts, hidden, two_inter // 2) or two_inter % 2:
        raise ValueError(f"{name}: expert weights gate_up_proj {tuple(gate_up.shape)} and "
                         f"down_proj {tuple(down.shape)} are not [E, 2I, H] and [E, H, I]")


def _check_mlp(name: str, mlp: nn.Module, dtype: torch.dtype) -> None:
    """A shared expert must be a bias-free SwiGLU MLP in the experts' dtype."""
    _check_silu(name, "shared expert", mlp.act_fn)
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if proj.bias is not None:
            raise ValueError(f"{name}: a shared expert with biases is not supported")
        if proj.weight.dtype != dtype:
            raise ValueError(f"{name}: shared expert dtype {proj.weight.dtype} differs from the "
                             f"experts' {dtype}")


def _check_silu(name: str, where: str, act_fn: nn.Module) -> None:
    # ACT2FN maps "silu" to SiLUActivation and "swish" to nn.SiLU: the same function.
    if not (isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"):
        raise ValueError(f"{name}: {where} activation {type(act_fn).__name__} is not supported "
                         "(the fused op computes SiLU; hidden_act must be 'silu')")


def kind_of(module: nn.Module) -> str | None:
    """The kind of a supported transformers MoE block ('mixtral', ...), else None."""
    entry = SUPPORTED.get(type(module).__name__)
    if entry is None or type(module).__module__ != entry[0]:
        return None
    return entry[1]
