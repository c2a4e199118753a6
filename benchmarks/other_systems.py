"""Other projects' MoE forwards, timed beside ours where they are installed.

Neither is a dependency: each import is tried when a model's layer is prepared, and
``Unavailable`` says why a system is skipped (not installed, no CUDA, a failed setup).
No code of these projects is copied here; they are called through their public entry
points.

    vLLM        ``vllm.model_executor.layers.fused_moe.fused_experts(hidden_states, w1, w2,
                topk_weights, topk_ids)``: its Triton fused-MoE path given the routing.
                ``w1`` is [E, 2I, H] with the gate rows first and ``w2`` is [E, H, I], our
                layout, so the layer's weights are passed as they are; SiLU is its default.
    Megablocks  ``megablocks.layers.dmoe.dMoE``: dropless MoE with its own router and its
                own random weights of the layer's shapes (grouped GEMM, GLU experts).
"""
from __future__ import annotations

import functools

import torch


class Unavailable(Exception):
    """A system that cannot run here; the message says why."""


def vllm_fused_experts(layer):
    """``prepare`` of vLLM's fused_experts (see the module docstring)."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception as exc:  # ImportError, or an install broken against this torch
        raise Unavailable(f"vllm not installed ({type(exc).__name__}: {str(exc)[:120]})") from None
    if layer.w_gate_up.device.type != "cuda":
        raise Unavailable("vLLM's Triton fused_experts needs CUDA")
    return lambda cell: functools.partial(fused_experts, cell.x, layer.w_gate_up, layer.w_down,
                                          cell.topk_weights, cell.topk_ids)


def megablocks_dmoe(layer):
    """``prepare`` of Megablocks' dMoE with the layer's shapes (see the module docstring)."""
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as exc:  # ImportError, or an install broken against this torch
        raise Unavailable(f"megablocks not installed ({type(exc).__name__})") from None
    cfg, w = layer.cfg, layer.w_gate_up
    try:
        args = Arguments(
            hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
            moe_num_experts=cfg.num_experts, moe_top_k=cfg.top_k, mlp_type="glu",
            mlp_impl="grouped", bf16=w.dtype == torch.bfloat16, fp16=w.dtype == torch.float16,
            device=w.device, return_bias=False)
        dmoe = dMoE(args).eval()
    except Exception as exc:  # an unsupported shape, dtype or device
        raise Unavailable(f"megablocks setup failed: {type(exc).__name__}: {str(exc)[:160]}") from None
    return lambda cell: functools.partial(dmoe, cell.x.unsqueeze(1))
