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

fp8 checkpoints (``FineGrainedFP8Config``) hold the experts in transformers'
``FP8Experts``: float8_e4m3fn ``gate_up_proj`` / ``down_proj`` with float32
``*_scale_inv`` per 128x128 block, the op's "block" scheme (``moe_ops.fp8``), read as
they are. Only what the kernels reproduce converts: ``block_size`` (128, 128),
``activation_scheme="dynamic"`` (the kernels quantise activations per row per 128
columns, or keep them in the hidden dtype), float32 scales (not ``scale_fmt="ue8m0"``),
fp8 (not fp4) weights and a plain SwiGLU. A shared expert (or Qwen2's shared-expert
gate) quantised to ``FP8Linear`` is dequantised to the hidden dtype: it is one small MLP
beside the routed experts. The hidden dtype of fp8 experts is the router's (16-bit), or
the caller's ``hidden_dtype``. DeepSeek-V3's router computes its logits in float32;
transformers >= 5.2x keeps its weight in float32 even in a bf16 model, so a float32
DeepSeek router is cast to the hidden dtype (exact for checkpoints, which store it in bf16).
"""
from __future__ import annotations

import re
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .configs import MoEConfig
from .fp8 import BLOCK, FP8_DTYPE, dequantize_weight, scale_shape

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


def read_block(block: nn.Module, copy: bool = True, where: str | None = None,
               hidden_dtype: torch.dtype | None = None,
               ) -> tuple[MoEConfig, dict[str, torch.Tensor | None]]:
    """A supported block's config and weights in the op layout: (config, {router_weight,
    w_gate_up, w_down, w_gate_up_scale, w_down_scale, score_bias, shared_gate_up,
    shared_down, shared_gate}), absent ones None. With ``copy=False`` the tensors share the
    block's (contiguous) storage, except those converted (a float32 DeepSeek router, an
    fp8 shared expert). ``hidden_dtype``, the model's activation dtype, matters only for
    fp8 experts (float ones run in their own dtype); by default the router's."""
    kind = kind_of(block)
    name = f"{where} ({type(block).__name__})" if where else type(block).__name__
    if kind is None:
        raise TypeError(f"{name}: unsupported MoE block type; supported: {sorted(SUPPORTED)}")

    experts, router = block.experts, block.gate
    fp8 = is_fp8_experts(experts)
    if fp8:
        check_fp8_experts(name, experts)
    else:
        _check_experts(name, experts)
    num_experts, two_inter, hidden = experts.gate_up_proj.shape
    dtype = _hidden_dtype(name, kind, experts, router, fp8, hidden_dtype)
    router_weight = router.weight.detach()
    if router_weight.dtype != dtype:
        # transformers >= 5.2x keeps DeepSeek-V3's router in float32; it computes logits in
        # float32 from a bf16 checkpoint weight, so the cast to the hidden dtype is exact there.
        if not (kind == "deepseek_v3" and router_weight.dtype == torch.float32):
            raise ValueError(f"{name}: router weight dtype {router_weight.dtype} differs from the "
                             f"experts' {dtype}; the fused op needs one dtype")
        router_weight = router_weight.to(dtype)
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
        router_weight=take(router_weight), w_gate_up=take(experts.gate_up_proj),
        w_down=take(experts.down_proj),
        w_gate_up_scale=take(experts.gate_up_proj_scale_inv) if fp8 else None,
        w_down_scale=take(experts.down_proj_scale_inv) if fp8 else None,
        score_bias=take(router.e_score_correction_bias).float() if config.score_bias else None,
        shared_gate_up=None, shared_down=None,
        shared_gate=(take(_linear_weight(name, block.shared_expert_gate, dtype))
                     if shared_gated else None))
    if shared_mlp is not None:
        weights["shared_gate_up"] = torch.cat(
            [_linear_weight(name, shared_mlp.gate_proj, dtype),
             _linear_weight(name, shared_mlp.up_proj, dtype)], dim=0)
        weights["shared_down"] = take(_linear_weight(name, shared_mlp.down_proj, dtype))
    return config, weights


def is_fp8_experts(experts: nn.Module) -> bool:
    """Whether ``experts`` holds quantised weights with scales (transformers' ``FP8Experts``)."""
    return hasattr(experts, "gate_up_proj_scale_inv") or hasattr(experts, "down_proj_scale_inv")


def check_fp8_experts(name: str, experts: nn.Module) -> None:
    """fp8 experts must be what the kernels compute: float8_e4m3fn weights with float32
    128x128 block scales, dynamic activations, a plain SwiGLU ([gate; up], no bias)."""
    _check_expert_flags(name, experts)
    block_size = getattr(experts, "block_size", None)
    if block_size is None or tuple(block_size) != (BLOCK, BLOCK):
        raise ValueError(f"{name}: experts.block_size={block_size!r} is not supported: the fp8 "
                         f"kernels take weight scales per ({BLOCK}, {BLOCK}) block "
                         f"(FineGrainedFP8Config(weight_block_size=({BLOCK}, {BLOCK})))")
    scheme = getattr(experts, "activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(f"{name}: experts.activation_scheme={scheme!r} is not supported: the "
                         "kernels quantise activations dynamically (per row per 128 columns) or "
                         "not at all, never with static scales")
    for attr in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, attr, None)
        scale = getattr(experts, f"{attr}_scale_inv", None)
        if weight is None or weight.dtype != FP8_DTYPE:
            raise ValueError(f"{name}: experts.{attr} is {getattr(weight, 'dtype', None)}; only "
                             "float8_e4m3fn experts are supported (not expert_dtype='fp4')")
        if scale is None or scale.dtype != torch.float32:
            raise ValueError(f"{name}: experts.{attr}_scale_inv is {getattr(scale, 'dtype', None)}; "
                             "the kernels take float32 scales (not scale_fmt='ue8m0')")
        expected = scale_shape("block", weight.shape)
        if tuple(scale.shape) != expected:
            raise ValueError(f"{name}: experts.{attr}_scale_inv has shape {tuple(scale.shape)}, "
                             f"expected {expected} for a weight {tuple(weight.shape)} in "
                             f"{BLOCK}x{BLOCK} blocks")
    for attr in ("swiglu_alpha", "swiglu_limit", "limit", "gate_softcap"):
        if getattr(experts, attr, None) is not None:
            raise ValueError(f"{name}: experts.{attr}={getattr(experts, attr)} is not supported "
                             "(the fused op computes a plain SwiGLU)")
    # FP8Experts' own _apply_gate is the plain SwiGLU once those four are None.
    _check_swiglu_experts(name, experts)


def _hidden_dtype(name: str, kind: str, experts: nn.Module, router: nn.Module, fp8: bool,
                  hidden_dtype: torch.dtype | None) -> torch.dtype:
    if not fp8:
        return experts.gate_up_proj.dtype  # float experts run in their own dtype
    if hidden_dtype is None and router.weight.dtype in (torch.bfloat16, torch.float16):
        hidden_dtype = router.weight.dtype
    if hidden_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: fp8 experts run with bfloat16 or float16 hidden states; "
                         f"the router is {router.weight.dtype} and hidden_dtype={hidden_dtype}: "
                         "pass hidden_dtype=torch.bfloat16 (or cast the model)")
    return hidden_dtype


def _linear_weight(name: str, linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A bias-free linear layer's weight [N, K] in ``dtype``: a float one as it is (its dtype
    must be ``dtype``), transformers' ``FP8Linear`` (128x128 blocks, dynamic activations)
    dequantised."""
    weight = linear.weight.detach()
    if getattr(linear, "bias", None) is not None:
        raise ValueError(f"{name}: a shared expert with biases is not supported")
    if weight.dtype != FP8_DTYPE:
        if weight.dtype != dtype:
            raise ValueError(f"{name}: shared expert dtype {weight.dtype} differs from the "
                             f"experts' {dtype}")
        return weight
    block_size = getattr(linear, "block_size", None)
    if block_size is None or tuple(block_size) != (BLOCK, BLOCK):
        raise ValueError(f"{name}: shared expert FP8Linear block_size={block_size!r} is not "
                         f"supported (only ({BLOCK}, {BLOCK}))")
    if getattr(linear, "activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{name}: shared expert FP8Linear activation_scheme="
                         f"{linear.activation_scheme!r} is not supported (only 'dynamic')")
    scale = linear.weight_scale_inv.detach()
    if scale.dtype != torch.float32 or tuple(scale.shape) != scale_shape("block", (1, *weight.shape))[1:]:
        raise ValueError(f"{name}: shared expert FP8Linear weight_scale_inv {scale.dtype} "
                         f"{tuple(scale.shape)} is not float32 per {BLOCK}x{BLOCK} block")
    return dequantize_weight(weight[None], scale[None])[0].to(dtype)


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
    """Float experts must be SwiGLU, gated by transformers' default, with concatenated
    [gate; up] rows, no bias, all local."""
    _check_gate(name, experts)
    _check_swiglu_experts(name, experts)


def _check_swiglu_experts(name: str, experts: nn.Module) -> None:
    """SiLU experts with concatenated [gate; up] rows [E, 2I, H] and [E, H, I], no bias,
    all local (their gating checked by the caller)."""
    _check_expert_flags(name, experts)
    if getattr(experts, "act_fn", None) is None:
        raise ValueError(f"{name}: the experts have no act_fn; the fused op computes "
                         "SiLU(gate) * up")
    _check_silu(name, "experts", experts.act_fn)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    num_experts, two_inter, hidden = gate_up.shape
    if tuple(down.shape) != (num_experts, hidden, two_inter // 2) or two_inter % 2:
        raise ValueError(f"{name}: expert weights gate_up_proj {tuple(gate_up.shape)} and "
                         f"down_proj {tuple(down.shape)} are not [E, 2I, H] and [E, H, I]")


def _check_expert_flags(name: str, experts: nn.Module) -> None:
    # The flags transformers' @use_experts_implementation sets (5.17 lacks the last two).
    for attr, expected in (("has_gate", True), ("has_bias", False), ("is_transposed", False),
                           ("is_concatenated", True), ("has_post_expert_norm", False),
                           ("_is_expert_parallel", False)):
        value = getattr(experts, attr, expected)
        if value != expected:
            raise ValueError(f"{name}: experts.{attr}={value} is not supported (need {expected})")


def _check_gate(name: str, experts: nn.Module) -> None:
    # transformers >= 5.2x computes act_fn(gate) * up in the class's _apply_gate: its own
    # default, or the model's (clamped SwiGLU of DeepSeek-V4, gpt-oss's alpha form, ...).
    apply_gate = getattr(type(experts), "_apply_gate", None)
    default = getattr(sys.modules.get("transformers.integrations.moe"), "_default_apply_gate", None)
    if apply_gate is not None and apply_gate is not default:
        raise ValueError(f"{name}: {type(experts).__name__}._apply_gate (the model's own gating, "
                         "e.g. a clamped SwiGLU) is not supported: the fused op computes "
                         "SiLU(gate) * up, transformers' default")


def _check_mlp(name: str, mlp: nn.Module, dtype: torch.dtype) -> None:
    """A shared expert must be a bias-free SwiGLU MLP in the hidden dtype (or fp8, whose
    weights ``_linear_weight`` checks as it reads them)."""
    _check_silu(name, "shared expert", mlp.act_fn)
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if getattr(proj, "bias", None) is not None:
            raise ValueError(f"{name}: a shared expert with biases is not supported")
        if proj.weight.dtype not in (dtype, FP8_DTYPE):
            raise ValueError(f"{name}: shared expert dtype {proj.weight.dtype} differs from the "
                             f"experts' {dtype}")


def _check_silu(name: str, where: str, act_fn) -> None:
    # ACT2FN maps "silu" to SiLUActivation and "swish" to nn.SiLU: the same function; some
    # models hold torch's function itself.
    if not (isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"
            or act_fn is F.silu):
        what = getattr(act_fn, "__name__", None) if callable(act_fn) else None
        raise ValueError(f"{name}: {where} activation {what or type(act_fn).__name__} is not "
                         "supported (the fused op computes SiLU; hidden_act must be 'silu')")


def kind_of(module: nn.Module) -> str | None:
    """The kind of a supported transformers MoE block ('mixtral', ...), else None."""
    entry = SUPPORTED.get(type(module).__name__)
    if entry is None or type(module).__module__ != entry[0]:
        return None
    return entry[1]
