"""Launchers of the MoE stages: size buffers from shapes, pick tiles, launch kernels.

Every buffer is sized from shapes alone (the worst case over routings) and kernels
read the real counts from device memory, so nothing here synchronises with the host
and the whole forward can be captured in a CUDA graph. Arguments are validated by
the ops in ``moe_ops.ops``; these functions trust them.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton

from .kernels.align import align_kernel
from .kernels.combine import combine_kernel
from .kernels.grouped_gemm import grouped_gemm_kernel
from .kernels.route import route_kernel
from .profiling import stage_range
from .tiles import TileConfig, get_tile_config, interpreter_active


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


def route_impl(hidden_states, router_weight, top_k, scoring, renormalize, n_group,
               topk_group, score_bias, routed_scaling_factor):
    """Launch the router kernel; returns (topk_weights fp32 [T,K], topk_ids int32 [T,K])."""
    num_tokens, hidden = hidden_states.shape
    num_experts = router_weight.shape[0]
    device = hidden_states.device
    topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    if num_tokens == 0:
        return topk_weights, topk_ids
    interpret = interpreter_active()
    block_t = 64 if (num_tokens > 512 or interpret) else 16
    e_pad = _pow2_at_least(num_experts, 16)
    # Keep one pipeline stage of router weights near 32 KB of shared memory.
    block_h = 64 if interpret else min(128, max(16, 32768 // (e_pad * router_weight.element_size())))
    with stage_range("route"):
        route_kernel[(triton.cdiv(num_tokens, block_t),)](
            hidden_states, router_weight,
            score_bias if score_bias is not None else topk_weights,  # unread without bias
            topk_weights, topk_ids,
            num_tokens, hidden, float(routed_scaling_factor),
            NUM_EXPERTS=num_experts, TOP_K=top_k,
            SIGMOID=scoring == "sigmoid", RENORMALIZE=bool(renormalize),
            HAS_BIAS=score_bias is not None,
            N_GROUP=n_group, TOPK_GROUP=topk_group,
            E_PAD=e_pad, K_PAD=_pow2_at_least(top_k),
            G_PAD=_pow2_at_least(n_group), BLOCK_T=block_t, BLOCK_H=block_h,
            INTERPRETER=interpret, num_warps=8 if block_t == 64 else 4,
        )
    return topk_weights, topk_ids


def max_blocks_for(num_slots: int, num_experts: int, block_m: int) -> int:
    """Worst-case number of BLOCK_M-row blocks: every non-empty expert pads one block."""
    return (num_slots + min(num_experts, num_slots) * (block_m - 1)) // block_m


def _align(topk_ids, num_experts, block_m):
    num_slots = topk_ids.numel()
    max_blocks = max_blocks_for(num_slots, num_experts, block_m)
    device = topk_ids.device
    sorted_slots = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=device)
    e_pad = _pow2_at_least(num_experts, 16)
    with stage_range("align"):
        align_kernel[(1,)](
            topk_ids, sorted_slots, block_expert, num_blocks, num_slots, max_blocks,
            NUM_EXPERTS=num_experts, E_PAD=e_pad, BLOCK_M=block_m,
            CHUNK=max(16, min(1024, 8192 // e_pad)), num_warps=8,
        )
    return sorted_slots, block_expert, num_blocks, max_blocks


def _grouped_gemm(stage, a, w, out, topk_weights, align_out, num_slots, rows_per_slot_div,
                  n, k, tile: TileConfig):
    sorted_slots, block_expert, num_blocks, max_blocks = align_out
    grid = (max_blocks * triton.cdiv(n, tile.BLOCK_N),)
    with stage_range(stage):
        grouped_gemm_kernel[grid](
            a, w, out, topk_weights, sorted_slots, block_expert, num_blocks,
            n, k, num_slots, rows_per_slot_div, max_blocks,
            a.stride(0), w.stride(0), w.stride(1), out.stride(0),
            FUSE_GATE_UP=stage == "gate_up", MUL_ROUTING_WEIGHT=stage == "down",
            BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K,
            GROUP_M=tile.GROUP_M, EVEN_K=k % tile.BLOCK_K == 0,
            INTERPRETER=interpreter_active(),
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )


def fused_experts_impl(hidden_states, topk_weights, topk_ids, w_gate_up, w_down,
                       gate_up_tile: TileConfig | None = None,
                       down_tile: TileConfig | None = None):
    """align -> gate_up -> down -> combine. Tiles default to the lookup in ``moe_ops.tiles``.

    The down tile's BLOCK_M is replaced by gate_up's: both walk one alignment.
    """
    num_tokens, hidden = hidden_states.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    top_k = topk_ids.shape[1]
    out = torch.empty_like(hidden_states)
    if num_tokens == 0:
        return out
    dtype, device = hidden_states.dtype, hidden_states.device
    if gate_up_tile is None:
        gate_up_tile = get_tile_config("gate_up", num_experts, hidden, inter, num_tokens,
                                       top_k, dtype, device)
    if down_tile is None:
        down_tile = get_tile_config("down", num_experts, hidden, inter, num_tokens,
                                    top_k, dtype, device)
    down_tile = replace(down_tile, BLOCK_M=gate_up_tile.BLOCK_M)

    num_slots = num_tokens * top_k
    align_out = _align(topk_ids, num_experts, gate_up_tile.BLOCK_M)
    h = torch.empty(num_slots, inter, dtype=dtype, device=device)
    _grouped_gemm("gate_up", hidden_states, w_gate_up, h, topk_weights, align_out,
                  num_slots, top_k, inter, hidden, gate_up_tile)
    y = torch.empty(num_slots, hidden, dtype=dtype, device=device)
    _grouped_gemm("down", h, w_down, y, topk_weights, align_out,
                  num_slots, 1, hidden, inter, down_tile)
    block_t, block_h = (16, 256) if interpreter_active() else (4, 512)
    with stage_range("combine"):
        combine_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))](
            y, topk_ids, out, num_tokens, hidden,
            NUM_EXPERTS=num_experts, TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h,
            INTERPRETER=interpreter_active(),
        )
    return out
