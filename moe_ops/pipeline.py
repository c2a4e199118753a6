"""Launchers of the MoE stages: size buffers from shapes, pick tiles, launch kernels.

Every buffer is sized from shapes alone (the worst case over routings) and kernels
read the real counts from device memory, so nothing here synchronises with the host
and the whole forward can be captured in a CUDA graph. Arguments are validated by
the ops in ``moe_ops.ops``; these functions trust them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .kernels.align import align_kernel, rank_kernel
from .kernels.combine import combine_kernel
from .kernels.decode_route import router_partials_kernel, select_align_kernel
from .kernels.grouped_gemm import grouped_gemm_kernel
from .kernels.route import route_kernel
from .profiling import stage_range
from .tiles import TileConfig, get_tile_config, interpreter_active


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


@dataclass(frozen=True)
class TokenBlockRanks:
    """Step 1 of the alignment: per-token-block expert counts and per-slot ranks."""

    block_counts: torch.Tensor  # int32 [cdiv(T, block_t), E]
    ranks: torch.Tensor  # int32 [T*K]
    block_t: int


def _rank_block_t(num_tokens: int, num_experts: int, top_k: int) -> int:
    """Tokens per program of the ranking step: its one-hot tile (rows x experts) stays
    near 32K elements; at least 16 rows for the router's dot."""
    if interpreter_active():
        return 64
    budget = 32768 // (_pow2_at_least(top_k) * _pow2_at_least(num_experts, 16))
    return 16 if num_tokens <= 512 else max(16, min(64, _pow2_at_least(budget)))


def _empty_ranks(num_tokens, num_experts, top_k, device) -> TokenBlockRanks:
    block_t = _rank_block_t(num_tokens, num_experts, top_k)
    return TokenBlockRanks(
        torch.empty(triton.cdiv(num_tokens, block_t), num_experts, dtype=torch.int32, device=device),
        torch.empty(num_tokens * top_k, dtype=torch.int32, device=device),
        block_t)


def route_impl(hidden_states, router_weight, top_k, scoring, renormalize, n_group,
               topk_group, score_bias, routed_scaling_factor, with_ranks=False):
    """Launch the router kernel: (topk_weights fp32 [T,K], topk_ids int32 [T,K]), plus the
    first alignment step (``TokenBlockRanks``) when with_ranks."""
    num_tokens, hidden = hidden_states.shape
    num_experts = router_weight.shape[0]
    device = hidden_states.device
    topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    ranks = _empty_ranks(num_tokens, num_experts, top_k, device) if with_ranks else None
    if num_tokens > 0:
        interpret = interpreter_active()
        block_t = _rank_block_t(num_tokens, num_experts, top_k)  # the ranks' token blocks
        e_pad = _pow2_at_least(num_experts, 16)
        # Keep one pipeline stage of router weights near 32 KB of shared memory.
        block_h = 64 if interpret else min(128, max(16, 32768 // (e_pad * router_weight.element_size())))
        with stage_range("route"):
            route_kernel[(triton.cdiv(num_tokens, block_t),)](
                hidden_states, router_weight,
                score_bias if score_bias is not None else topk_weights,  # unread without bias
                topk_weights, topk_ids,
                ranks.block_counts if with_ranks else topk_ids,  # unread without ranks
                ranks.ranks if with_ranks else topk_ids,
                num_tokens, hidden, float(routed_scaling_factor),
                NUM_EXPERTS=num_experts, TOP_K=top_k,
                SIGMOID=scoring == "sigmoid", RENORMALIZE=bool(renormalize),
                HAS_BIAS=score_bias is not None,
                N_GROUP=n_group, TOPK_GROUP=topk_group,
                E_PAD=e_pad, K_PAD=_pow2_at_least(top_k),
                G_PAD=_pow2_at_least(n_group), BLOCK_T=block_t, BLOCK_H=block_h,
                WRITE_RANKS=with_ranks, INTERPRETER=interpret,
                num_warps=8 if block_t >= 32 else 4,
            )
    return (topk_weights, topk_ids, ranks) if with_ranks else (topk_weights, topk_ids)


def _rank(topk_ids, num_experts) -> TokenBlockRanks:
    num_tokens, top_k = topk_ids.shape
    ranks = _empty_ranks(num_tokens, num_experts, top_k, topk_ids.device)
    with stage_range("rank"):
        rank_kernel[(triton.cdiv(num_tokens, ranks.block_t),)](
            topk_ids, ranks.block_counts, ranks.ranks, num_tokens,
            NUM_EXPERTS=num_experts, TOP_K=top_k, E_PAD=_pow2_at_least(num_experts, 16),
            K_PAD=_pow2_at_least(top_k), BLOCK_T=ranks.block_t, num_warps=4,
        )
    return ranks


def max_blocks_for(num_slots: int, num_experts: int, block_m: int) -> int:
    """Worst-case number of BLOCK_M-row blocks: every non-empty expert pads one block."""
    return (num_slots + min(num_experts, num_slots) * (block_m - 1)) // block_m


def _align(topk_ids, ranks: TokenBlockRanks, num_experts, block_m):
    num_slots = topk_ids.numel()
    max_blocks = max_blocks_for(num_slots, num_experts, block_m)
    device = topk_ids.device
    sorted_slots = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=device)
    e_pad = _pow2_at_least(num_experts, 16)
    with stage_range("align"):
        align_kernel[(1,)](
            topk_ids, ranks.block_counts, ranks.ranks, sorted_slots, block_expert, num_blocks,
            num_slots, ranks.block_counts.shape[0], max_blocks,
            NUM_EXPERTS=num_experts, TOP_K=topk_ids.shape[1], RANK_BLOCK_T=ranks.block_t,
            E_PAD=e_pad, BLOCK_M=block_m, TB_CHUNK=max(1, 4096 // e_pad),
            BLOCK_CHUNK=max(16, 4096 // e_pad), CHUNK=1024, num_warps=8,
        )
    return sorted_slots, block_expert, num_blocks, max_blocks


def descriptor_ok(w: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address ``w``: last dim contiguous, the other
    strides and the base 16-byte aligned (the TMA rules)."""
    elem = w.element_size()
    return (w.stride(-1) == 1 and w.data_ptr() % 16 == 0
            and all(s * elem % 16 == 0 for s in w.stride()[:-1]))


def _grouped_gemm(stage, a, w, out, topk_weights, align_out, num_slots, rows_per_slot_div,
                  n, k, tile: TileConfig):
    sorted_slots, block_expert, num_blocks, max_blocks = align_out
    grid = (max_blocks * triton.cdiv(n, tile.BLOCK_N),)
    use_desc = tile.B_DESC and descriptor_ok(w)
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()),
                              [1, tile.BLOCK_N, tile.BLOCK_K]) if use_desc else None
    with stage_range(stage):
        grouped_gemm_kernel[grid](
            a, w, w_desc, out, topk_weights, sorted_slots, block_expert, num_blocks,
            n, k, num_slots, rows_per_slot_div, max_blocks,
            a.stride(0), w.stride(0), w.stride(1), out.stride(0),
            FUSE_GATE_UP=stage == "gate_up", MUL_ROUTING_WEIGHT=stage == "down",
            BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K,
            GROUP_M=tile.GROUP_M, EVEN_K=k % tile.BLOCK_K == 0, B_DESC=use_desc,
            INTERPRETER=interpreter_active(),
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


def _experts(hidden_states, topk_weights, topk_ids, w_gate_up, w_down, tiles, align_out):
    """gate_up -> down -> combine over an alignment."""
    num_tokens, hidden = hidden_states.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    num_slots = topk_ids.numel()
    top_k = topk_ids.shape[1]
    gate_up_tile, down_tile = tiles
    h = torch.empty(num_slots, inter, dtype=hidden_states.dtype, device=hidden_states.device)
    _grouped_gemm("gate_up", hidden_states, w_gate_up, h, topk_weights, align_out,
                  num_slots, top_k, inter, hidden, gate_up_tile)
    y = torch.empty(num_slots, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    _grouped_gemm("down", h, w_down, y, topk_weights, align_out,
                  num_slots, 1, hidden, inter, down_tile)
    out = torch.empty_like(hidden_states)
    block_t, block_h = (16, 256) if interpreter_active() else (4, 512)
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
    rank kernel computes it from topk_ids. Tiles default to the lookup in
    ``moe_ops.tiles``.
    """
    num_tokens, hidden = hidden_states.shape
    if num_tokens == 0:
        return torch.empty_like(hidden_states)
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    tiles = _tiles((gate_up_tile, down_tile), num_tokens, num_experts, hidden, inter,
                   topk_ids.shape[1], hidden_states.dtype, hidden_states.device)
    if ranks is None:
        ranks = _rank(topk_ids, num_experts)
    align_out = _align(topk_ids, ranks, num_experts, tiles[0].BLOCK_M)
    return _experts(hidden_states, topk_weights, topk_ids, w_gate_up, w_down, tiles, align_out)


DECODE_MAX_T = 16  # fused_moe routes up to this many tokens with the split router GEMM
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _route_align_decode(hidden_states, router_weight, top_k, scoring, renormalize, n_group,
                        topk_group, score_bias, routed_scaling_factor, block_m):
    """Routing and alignment of T <= DECODE_MAX_T tokens in two launches, the router GEMM
    spread over ~128 programs: (topk_weights, topk_ids, alignment)."""
    num_tokens, hidden = hidden_states.shape
    num_experts = router_weight.shape[0]
    device = hidden_states.device
    interpret = interpreter_active()
    block_e, block_h = 16, (64 if interpret else 128)
    chunks = triton.cdiv(num_experts, block_e)
    splits = max(1, min(triton.cdiv(hidden, block_h), 128 // chunks))
    h_per_split = triton.cdiv(triton.cdiv(hidden, splits), block_h) * block_h
    splits = triton.cdiv(hidden, h_per_split)
    partials = torch.empty(splits, DECODE_MAX_T, num_experts, dtype=torch.float32, device=device)
    with stage_range("route"):
        router_partials_kernel[(chunks, splits)](
            hidden_states, router_weight, partials, num_tokens, hidden, h_per_split,
            NUM_EXPERTS=num_experts, BLOCK_T=DECODE_MAX_T, BLOCK_E=block_e, BLOCK_H=block_h,
            INTERPRETER=interpret, num_warps=4,
        )

    num_slots = num_tokens * top_k
    max_blocks = max_blocks_for(num_slots, num_experts, block_m)
    topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    block_counts = torch.empty(1, num_experts, dtype=torch.int32, device=device)
    ranks = torch.empty(num_slots, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=device)
    e_pad = _pow2_at_least(num_experts, 16)
    with stage_range("align"):
        select_align_kernel[(1,)](
            partials, score_bias if score_bias is not None else partials,  # unread without bias
            topk_weights, topk_ids, block_counts, ranks, sorted_slots, block_expert, num_blocks,
            num_tokens, float(routed_scaling_factor), max_blocks,
            LOGIT_DTYPE=_TL_DTYPES[hidden_states.dtype], H_SPLITS=splits,
            NUM_EXPERTS=num_experts, TOP_K=top_k,
            SIGMOID=scoring == "sigmoid", RENORMALIZE=bool(renormalize),
            HAS_BIAS=score_bias is not None, N_GROUP=n_group, TOPK_GROUP=topk_group,
            E_PAD=e_pad, K_PAD=_pow2_at_least(top_k), G_PAD=_pow2_at_least(n_group),
            BLOCK_T=DECODE_MAX_T, BLOCK_M=block_m, BLOCK_CHUNK=max(16, 4096 // e_pad),
            CHUNK=1024, INTERPRETER=interpret, num_warps=8,
        )
    return topk_weights, topk_ids, (sorted_slots, block_expert, num_blocks, max_blocks)


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
    topk_weights, topk_ids, align_out = _route_align_decode(
        hidden_states, router_weight, top_k, scoring, renormalize, n_group, topk_group,
        score_bias, routed_scaling_factor, tiles[0].BLOCK_M)
    return _experts(hidden_states, topk_weights, topk_ids, w_gate_up, w_down, tiles, align_out)
