"""Launchers of routing and alignment: who goes to which expert, and in which row block.

    route_impl        the router kernel, one program per token block (optionally with
                      the first alignment step, ``TokenBlockRanks``)
    rank / align      the alignment of given or routed ids (``kernels.align``)
    decode_*          T <= DECODE_MAX_T: the router GEMM split over ~128 programs, and
                      selection, ranks and alignment in one program (``kernels.decode_route``)

Buffers are sized from shapes alone; nothing synchronises with the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from .kernels.align import align_kernel, rank_kernel
from .kernels.decode_route import router_partials_kernel, select_align_kernel
from .kernels.route import route_kernel
from .profiling import stage_range
from .dtypes import TRITON
from .interpreter import BLOCKS, interpreter_active

DECODE_MAX_T = 16  # up to this many tokens, fused_moe and fused_experts take the decode path


class Alignment(NamedTuple):
    """Slots grouped by expert into BLOCK_M-row blocks (see ``kernels.align``)."""

    sorted_slots: torch.Tensor  # int32 [max_blocks * BLOCK_M]
    block_expert: torch.Tensor  # int32 [max_blocks]
    num_blocks: torch.Tensor  # int32 [1], on the device
    max_blocks: int


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
    if BLOCKS.rank_block_t is not None:
        return BLOCKS.rank_block_t
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
    first alignment step (``TokenBlockRanks``) when with_ranks.

    Without ranks, up to DECODE_MAX_T tokens route through the decode path (its
    alignment unused), so the ``route`` op picks the same experts as ``fused_moe``."""
    num_tokens, hidden = hidden_states.shape
    if not with_ranks and 0 < num_tokens <= DECODE_MAX_T:
        topk_weights, topk_ids, _ = decode_route_align(
            hidden_states, router_weight, top_k, scoring, renormalize, n_group, topk_group,
            score_bias, routed_scaling_factor, block_m=16, select_stage="route")
        return topk_weights, topk_ids
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
        block_h = BLOCKS.route_block_h or min(128, max(16, 32768 // (e_pad * router_weight.element_size())))
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


def rank(topk_ids, num_experts) -> TokenBlockRanks:
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


def align(topk_ids, ranks: TokenBlockRanks, num_experts, block_m):
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
    return Alignment(sorted_slots, block_expert, num_blocks, max_blocks)


def _router_partials(hidden_states, router_weight):
    """Launch ``router_partials_kernel``: fp32 [splits, DECODE_MAX_T, E] partial logits of
    T <= DECODE_MAX_T tokens, the router GEMM spread over ~128 programs."""
    num_tokens, hidden = hidden_states.shape
    num_experts = router_weight.shape[0]
    interpret = interpreter_active()
    block_e, block_h = 16, BLOCKS.router_partials_h
    chunks = triton.cdiv(num_experts, block_e)
    splits = max(1, min(triton.cdiv(hidden, block_h), 128 // chunks))
    h_per_split = triton.cdiv(triton.cdiv(hidden, splits), block_h) * block_h
    splits = triton.cdiv(hidden, h_per_split)
    partials = torch.empty(splits, DECODE_MAX_T, num_experts, dtype=torch.float32,
                           device=hidden_states.device)
    with stage_range("route"):
        router_partials_kernel[(chunks, splits)](
            hidden_states, router_weight, partials, num_tokens, hidden, h_per_split,
            NUM_EXPERTS=num_experts, BLOCK_T=DECODE_MAX_T, BLOCK_E=block_e, BLOCK_H=block_h,
            INTERPRETER=interpret, num_warps=4,
        )
    return partials


def _select_align(topk_ids, num_experts, block_m, stage="align", partials=None,
                  topk_weights=None, score_bias=None, routed_scaling_factor=1.0,
                  logit_dtype=torch.float32, scoring="softmax", renormalize=False, n_group=1,
                  topk_group=1) -> Alignment:
    """Launch ``select_align_kernel`` (NVTX range ``stage``). With router ``partials`` it
    first selects the experts (writing topk_ids and topk_weights); without, it reads the
    given topk_ids."""
    num_tokens, top_k = topk_ids.shape
    device = topk_ids.device
    num_slots = num_tokens * top_k
    max_blocks = max_blocks_for(num_slots, num_experts, block_m)
    block_counts = torch.empty(1, num_experts, dtype=torch.int32, device=device)
    ranks = torch.empty(num_slots, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=device)
    select = partials is not None
    e_pad = _pow2_at_least(num_experts, 16)
    with stage_range(stage):
        select_align_kernel[(1,)](
            partials if select else topk_ids,  # each placeholder is unread when its flag is off
            score_bias if score_bias is not None else topk_ids,
            topk_weights if select else topk_ids, topk_ids, block_counts, ranks,
            sorted_slots, block_expert, num_blocks,
            num_tokens, float(routed_scaling_factor), max_blocks,
            SELECT=select, LOGIT_DTYPE=TRITON[logit_dtype],
            H_SPLITS=partials.shape[0] if select else 1,
            NUM_EXPERTS=num_experts, TOP_K=top_k,
            SIGMOID=scoring == "sigmoid", RENORMALIZE=bool(renormalize),
            HAS_BIAS=score_bias is not None, N_GROUP=n_group, TOPK_GROUP=topk_group,
            E_PAD=e_pad, K_PAD=_pow2_at_least(top_k), G_PAD=_pow2_at_least(n_group),
            BLOCK_T=DECODE_MAX_T, BLOCK_M=block_m, BLOCK_CHUNK=max(16, 4096 // e_pad),
            CHUNK=1024, INTERPRETER=interpreter_active(), num_warps=8,
        )
    return Alignment(sorted_slots, block_expert, num_blocks, max_blocks)


def decode_align(topk_ids, num_experts, block_m) -> Alignment:
    """Ranks and alignment of given topk_ids [T <= DECODE_MAX_T, K] in one launch."""
    return _select_align(topk_ids, num_experts, block_m)


def decode_route_align(hidden_states, router_weight, top_k, scoring, renormalize, n_group,
                       topk_group, score_bias, routed_scaling_factor, block_m,
                       select_stage="align"):
    """Routing and alignment of T <= DECODE_MAX_T tokens in two launches:
    (topk_weights fp32 [T,K], topk_ids int32 [T,K], Alignment)."""
    num_tokens = hidden_states.shape[0]
    device = hidden_states.device
    topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    alignment = _select_align(
        topk_ids, router_weight.shape[0], block_m, select_stage,
        partials=_router_partials(hidden_states, router_weight), topk_weights=topk_weights,
        score_bias=score_bias, routed_scaling_factor=routed_scaling_factor,
        logit_dtype=hidden_states.dtype, scoring=scoring, renormalize=renormalize,
        n_group=n_group, topk_group=topk_group)
    return topk_weights, topk_ids, alignment
