"""Launchers of the expert stages (gate_up, down, combine) and the two ops' pipelines.

Routing and alignment launch from ``moe_ops.routing``; this module picks tiles, sizes
the expert buffers and launches the grouped GEMMs and the combine.

Every buffer is sized from shapes alone (the worst case over routings) and kernels
read the real counts from device memory, so nothing here synchronises with the host
and the whole forward can be captured in a CUDA graph. Arguments are validated by
the ops in ``moe_ops.ops``; these functions trust them.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from .kernels.combine import combine_kernel
from .kernels.grouped_gemm import grouped_gemm_kernel
from .profiling import stage_range
from .routing import (DECODE_MAX_T, Alignment, TokenBlockRanks, align, decode_align,
                      decode_route_align, rank, route_impl)
from .interpreter import BLOCKS, interpreter_active
from .tiles import TileConfig, get_tile_config


def descriptor_ok(w: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address ``w``: last dim contiguous, the other
    strides and the base 16-byte aligned (the TMA rules)."""
    elem = w.element_size()
    return (w.stride(-1) == 1 and w.data_ptr() % 16 == 0
            and all(s * elem % 16 == 0 for s in w.stride()[:-1]))


def _weight_descriptor(stage, w, tile: TileConfig):
    """gate_up views W [E, 2N, K] as [E, 2, N, K], so one box holds gate and up rows."""
    if stage == "gate_up":
        num_experts, two_n, k = w.shape
        return TensorDescriptor(w, [num_experts, 2, two_n // 2, k],
                                [w.stride(0), w.stride(1) * (two_n // 2), w.stride(1), 1],
                                [1, 2, tile.BLOCK_N, tile.BLOCK_K])
    return TensorDescriptor(w, list(w.shape), list(w.stride()), [1, tile.BLOCK_N, tile.BLOCK_K])


def _grouped_gemm(stage, a, w, out, topk_weights, alignment: Alignment, num_slots, rows_per_slot_div,
                  n, k, tile: TileConfig, sorted_h: bool):
    sorted_slots, block_expert, num_blocks, max_blocks = alignment
    grid = (max_blocks * triton.cdiv(n, tile.BLOCK_N),)
    use_desc = tile.B_DESC and descriptor_ok(w)
    w_desc = _weight_descriptor(stage, w, tile) if use_desc else None
    a_desc = (TensorDescriptor(a, list(a.shape), list(a.stride()), [tile.BLOCK_M, tile.BLOCK_K])
              if sorted_h and stage == "down" else None)
    with stage_range(stage):
        grouped_gemm_kernel[grid](
            a, a_desc, w, w_desc, out, topk_weights, sorted_slots, block_expert, num_blocks,
            n, k, num_slots, rows_per_slot_div, max_blocks,
            a.stride(0), w.stride(0), w.stride(1), out.stride(0),
            FUSE_GATE_UP=stage == "gate_up", MUL_ROUTING_WEIGHT=stage == "down",
            BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K,
            GROUP_M=tile.GROUP_M, EVEN_K=k % tile.BLOCK_K == 0, SORTED_H=sorted_h,
            B_DESC=use_desc, INTERPRETER=interpreter_active(),
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )


def _tiles(stage_tiles, num_tokens, num_experts, hidden, inter, top_k, dtype, device):
    """(gate_up, down) tiles: the given ones or the lookup; down walks gate_up's alignment,
    so it takes gate_up's BLOCK_M."""
    gate_up_tile, down_tile = stage_tiles
    if gate_up_tile is None:
        gate_up_tile = get_tile_config("gate_up", num_experts, hidden, inter, num_tokens,
                                       top_k, dtype, device)
    if down_tile is None:
        down_tile = get_tile_config("down", num_experts, hidden, inter, num_tokens,
                                    top_k, dtype, device)
    return gate_up_tile, replace(down_tile, BLOCK_M=gate_up_tile.BLOCK_M)


def _experts(hidden_states, topk_weights, topk_ids, w_gate_up, w_down, tiles, alignment):
    """gate_up -> down -> combine over an alignment."""
    num_tokens, hidden = hidden_states.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    num_slots = topk_ids.numel()
    top_k = topk_ids.shape[1]
    gate_up_tile, down_tile = tiles
    # h in block order (max_blocks * BLOCK_M rows) when down reads it through a descriptor,
    # which needs 16-byte rows (h itself is a fresh, aligned allocation).
    sorted_h = down_tile.A_DESC and inter * hidden_states.element_size() % 16 == 0
    h_rows = alignment.max_blocks * gate_up_tile.BLOCK_M if sorted_h else num_slots
    h = torch.empty(h_rows, inter, dtype=hidden_states.dtype, device=hidden_states.device)
    _grouped_gemm("gate_up", hidden_states, w_gate_up, h, topk_weights, alignment,
                  num_slots, top_k, inter, hidden, gate_up_tile, sorted_h)
    y = torch.empty(num_slots, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    _grouped_gemm("down", h, w_down, y, topk_weights, alignment,
                  num_slots, 1, hidden, inter, down_tile, sorted_h)
    out = torch.empty_like(hidden_states)
    block_t, block_h = BLOCKS.combine_t, BLOCKS.combine_h
    with stage_range("combine"):
        combine_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))](
            y, topk_ids, out, num_tokens, hidden,
            NUM_EXPERTS=num_experts, TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h,
            INTERPRETER=interpreter_active(),
        )
    return out


def fused_experts_impl(hidden_states, topk_weights, topk_ids, w_gate_up, w_down,
                       gate_up_tile: TileConfig | None = None,
                       down_tile: TileConfig | None = None,
                       ranks: TokenBlockRanks | None = None):
    """(rank) -> align -> gate_up -> down -> combine.

    ``ranks`` comes from the router (``route_impl(with_ranks=True)``); without it the
    rank kernel computes it from topk_ids, or for T <= DECODE_MAX_T the align launch
    does (four launches). Tiles default to the lookup in ``moe_ops.tiles``.
    """
    num_tokens, hidden = hidden_states.shape
    if num_tokens == 0:
        return torch.empty_like(hidden_states)
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    tiles = _tiles((gate_up_tile, down_tile), num_tokens, num_experts, hidden, inter,
                   topk_ids.shape[1], hidden_states.dtype, hidden_states.device)
    if ranks is None and num_tokens <= DECODE_MAX_T:
        alignment = decode_align(topk_ids, num_experts, tiles[0].BLOCK_M)
    else:
        if ranks is None:
            ranks = rank(topk_ids, num_experts)
        alignment = align(topk_ids, ranks, num_experts, tiles[0].BLOCK_M)
    return _experts(hidden_states, topk_weights, topk_ids, w_gate_up, w_down, tiles, alignment)


def fused_moe_impl(hidden_states, router_weight, w_gate_up, w_down, top_k, scoring,
                   renormalize, n_group, topk_group, score_bias, routed_scaling_factor):
    """route -> align -> gate_up -> down -> combine, five launches.

    Up to DECODE_MAX_T tokens the router GEMM is split over many programs and the
    selection runs with the alignment (``kernels.decode_route``); above, one router
    program per token block also does the first alignment step."""
    num_tokens, hidden = hidden_states.shape
    if not 0 < num_tokens <= DECODE_MAX_T:
        topk_weights, topk_ids, ranks = route_impl(
            hidden_states, router_weight, top_k, scoring, renormalize, n_group, topk_group,
            score_bias, routed_scaling_factor, with_ranks=True)
        return fused_experts_impl(hidden_states, topk_weights, topk_ids, w_gate_up, w_down,
                                  ranks=ranks)
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    tiles = _tiles((None, None), num_tokens, num_experts, hidden, inter, top_k,
                   hidden_states.dtype, hidden_states.device)
    topk_weights, topk_ids, alignment = decode_route_align(
        hidden_states, router_weight, top_k, scoring, renormalize, n_group, topk_group,
        score_bias, routed_scaling_factor, tiles[0].BLOCK_M)
    return _experts(hidden_states, topk_weights, topk_ids, w_gate_up, w_down, tiles, alignment)
