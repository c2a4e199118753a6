"""Routing and alignment: which expert each token goes to, and in which row block.

One entry point each way:

    route(x, router_weight, routing, score_bias, block_m)   routed ids and weights, and
                                                            (with block_m) their alignment
    align_ids(topk_ids, num_experts, block_m)               the alignment of given ids

(``route_and_quantize`` is ``route`` whose router kernel also writes x in e4m3 for
fp8-activation experts, past the decode path.)

Both pick the launches by token count in one place (``_is_decode``):

    T <= DECODE_MAX_T   the router GEMM split over ~128 programs, then selection, ranks
                        and alignment in one program (``kernels.decode_route``)
    T >  DECODE_MAX_T   one router program per token block that also ranks its slots
                        (``kernels.route``), then the alignment (``kernels.align``)

The route op and fused_moe take the same path for the same T, so they pick the same
experts. Buffers are sized from shapes alone; nothing synchronises with the host.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from .dtypes import TRITON
from .fp8 import SCHEME_CODES, empty_activations
from .interpreter import BLOCKS, busy_programs, interpreter_active
from .kernels.align import align_kernel, rank_align_kernel, rank_kernel
from .kernels.decode_route import router_partials_kernel, select_align_kernel
from .kernels.route import route_kernel
from .profiling import stage_range

DECODE_MAX_T = 16  # up to this many tokens, routing and alignment take the decode path
_DECODE_BLOCK_M = 16  # the decode path's alignment block when only the routing is wanted


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(n))


def _is_decode(num_tokens: int) -> bool:
    return 0 < num_tokens <= DECODE_MAX_T


@dataclass(frozen=True)
class Routing:
    """A model's routing settings (``MoEConfig.routing_kwargs()`` or the ops' arguments).

    softmax: softmax over the router logits rounded to the hidden dtype, top-k, optional
    renormalisation (Mixtral, Qwen). sigmoid: sigmoid scores, selection by score + bias
    among the best ``topk_group`` of ``n_group`` groups (group score = sum of its top-2),
    weights = unbiased scores, renormalised (+1e-20), times ``routed_scaling_factor``
    (DeepSeek-V3). The bias is a tensor and travels beside this object."""

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    @functools.lru_cache(maxsize=256)
    def selection_constexprs(self, num_experts: int, has_bias: bool) -> dict:
        """The constexprs of ``kernels.route.select_topk`` (shared by both router kernels);
        cached, so callers unpack the dict and never change it."""
        return dict(NUM_EXPERTS=num_experts, TOP_K=self.top_k, SIGMOID=self.scoring == "sigmoid",
                    RENORMALIZE=bool(self.renormalize), HAS_BIAS=has_bias, N_GROUP=self.n_group,
                    TOPK_GROUP=self.topk_group, E_PAD=_pow2_at_least(num_experts, 16),
                    K_PAD=_pow2_at_least(self.top_k), G_PAD=_pow2_at_least(self.n_group))


class Alignment(NamedTuple):
    """Slots grouped by expert into BLOCK_M-row blocks (see ``kernels.align``)."""

    sorted_slots: torch.Tensor  # int32 [max_blocks * BLOCK_M]
    block_expert: torch.Tensor  # int32 [max_blocks]
    num_blocks: torch.Tensor  # int32 [1], on the device
    max_blocks: int


class Routed(NamedTuple):
    """What ``route`` returns: fp32 weights [T, K], int32 ids [T, K], and the alignment
    when a block size was asked for (else None)."""

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    alignment: Alignment | None


@dataclass(frozen=True)
class _TokenBlockRanks:
    """Step 1 of the alignment: per-token-block expert counts and per-slot ranks."""

    block_counts: torch.Tensor  # int32 [cdiv(T, block_t), E]
    ranks: torch.Tensor  # int32 [T*K]
    block_t: int


def max_blocks_for(num_slots: int, num_experts: int, block_m: int) -> int:
    """Worst-case number of BLOCK_M-row blocks: every non-empty expert pads one block."""
    return (num_slots + min(num_experts, num_slots) * (block_m - 1)) // block_m


def route(hidden_states, router_weight, routing: Routing, score_bias=None,
          block_m: int | None = None) -> Routed:
    """Route T tokens (x [T, H], router [E, H]); with ``block_m`` also align them."""
    return route_and_quantize(hidden_states, router_weight, routing, score_bias, block_m)[0]


def route_and_quantize(hidden_states, router_weight, routing: Routing, score_bias=None,
                       block_m: int | None = None, quantize: str | None = None
                       ) -> tuple[Routed, tuple[torch.Tensor, torch.Tensor] | None]:
    """``route``, and with ``quantize`` (an fp8 scheme, "channel" or "block") x in e4m3
    with its scales for fp8-activation experts, written by the router kernel; None on
    the decode path (which quantises nothing) or without ``quantize``."""
    num_tokens = hidden_states.shape[0]
    if _is_decode(num_tokens):
        # Without an alignment wanted, its by-product is dropped: the launch is the routing.
        weights, ids, alignment = _decode_route_align(
            hidden_states, router_weight, routing, score_bias, block_m or _DECODE_BLOCK_M,
            stage="align" if block_m else "route")
        return Routed(weights, ids, alignment if block_m else None), None
    weights, ids, ranks, quantized = _route_blocks(hidden_states, router_weight, routing,
                                                   score_bias, block_m is not None, quantize)
    alignment = None if block_m is None else _align(ids, ranks, router_weight.shape[0], block_m)
    return Routed(weights, ids, alignment), quantized


def align_ids(topk_ids, num_experts: int, block_m: int,
              expected_tokens: int | None = None, num_rows=None) -> Alignment:
    """The alignment of given int32 topk_ids [T, K]. ``expected_tokens``: how many rows
    hold routed slots, when far fewer than T (a sparse expert-parallel receive buffer):
    the ranking step's token blocks are sized for that many. ``num_rows`` (int32 [1] on
    the device): the rows at or past it are treated as holding no routed id (above the
    decode sizes they are not even read); with at most ``DECODE_MAX_T`` expected, one
    launch ranks and aligns them (``rank_align_kernel``)."""
    if _is_decode(topk_ids.shape[0]):
        return _select_align(topk_ids, num_experts, block_m)
    if num_rows is not None and expected_tokens is not None and _is_decode(expected_tokens):
        return _rank_align(topk_ids, num_experts, block_m, expected_tokens, num_rows)
    return _align(topk_ids, _rank(topk_ids, num_experts, expected_tokens, num_rows),
                  num_experts, block_m, num_rows)


class BlockSwitch(NamedTuple):
    """Align with ``block_m`` instead where more than ``slots`` slots are routed."""
    block_m: int
    slots: int


def align_ids_switched(topk_ids, num_experts: int, block_m: int, expected_tokens: int,
                       num_rows, switch: BlockSwitch) -> tuple[Alignment, Alignment]:
    """``align_ids`` of a receive buffer (T above the decode sizes) whose block size is
    chosen on the device by the slots routed (``BlockSwitch``): one alignment, seen as
    two that share its arrays, each with its own blocks-in-use word, 0 in the one not
    chosen, so that GEMMs launched for each find blocks in one only."""
    if num_rows is not None and _is_decode(expected_tokens):
        both = _rank_align(topk_ids, num_experts, block_m, expected_tokens, num_rows, switch)
    else:
        both = _align(topk_ids, _rank(topk_ids, num_experts, expected_tokens, num_rows),
                      num_experts, block_m, num_rows, switch)
    return tuple(Alignment(both.sorted_slots, both.block_expert, both.num_blocks[i:i + 1],
                           max_blocks_for(topk_ids.numel(), num_experts, size))
                 for i, size in enumerate((block_m, switch.block_m)))


# ------------------------------------------------------------------ T > DECODE_MAX_T

def _rank_block_t(num_tokens: int, num_experts: int, top_k: int) -> int:
    """Tokens per program of the ranking step: its one-hot tile (rows x experts) stays
    near 32K elements; at least 16 rows for the router's dot."""
    if BLOCKS.rank_block_t is not None:
        return BLOCKS.rank_block_t
    budget = 32768 // (_pow2_at_least(top_k) * _pow2_at_least(num_experts, 16))
    return 16 if num_tokens <= 512 else max(16, min(64, _pow2_at_least(budget)))


def _empty_ranks(num_tokens, num_experts, top_k, device, sizing_tokens=None) -> _TokenBlockRanks:
    """Token blocks for ``sizing_tokens`` (default all) routed tokens; a sparse buffer
    still gets at most ~256 blocks, which the align kernel walks in one program."""
    block_t = _rank_block_t(sizing_tokens or num_tokens, num_experts, top_k)
    if sizing_tokens:
        block_t = max(block_t, min(64, _pow2_at_least(triton.cdiv(num_tokens, 256))))
    return _TokenBlockRanks(
        torch.empty(triton.cdiv(num_tokens, block_t), num_experts, dtype=torch.int32, device=device),
        torch.empty(num_tokens * top_k, dtype=torch.int32, device=device),
        block_t)


def _route_blocks(hidden_states, router_weight, routing: Routing, score_bias, with_ranks: bool,
                  quantize: str | None = None):
    """``route_kernel``: (weights, ids, the first alignment step or None, (x8, scale) or
    None)."""
    num_tokens, hidden = hidden_states.shape
    num_experts = router_weight.shape[0]
    top_k = routing.top_k
    device = hidden_states.device
    topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    ranks = _empty_ranks(num_tokens, num_experts, top_k, device) if with_ranks else None
    quantized = (None if quantize is None
                 else empty_activations(num_tokens, hidden, quantize, device))
    if num_tokens == 0:
        return topk_weights, topk_ids, ranks, quantized
    block_t = _rank_block_t(num_tokens, num_experts, top_k)  # the ranks' token blocks
    selection = routing.selection_constexprs(num_experts, score_bias is not None)
    # Keep one pipeline stage of router weights near 32 KB of shared memory.
    block_h = BLOCKS.route_block_h or min(
        128, max(16, 32768 // (selection["E_PAD"] * router_weight.element_size())))
    with stage_range("route"):
        route_kernel[(triton.cdiv(num_tokens, block_t),)](
            hidden_states, router_weight,
            score_bias if score_bias is not None else topk_weights,  # unread without bias
            topk_weights, topk_ids,
            ranks.block_counts if with_ranks else topk_ids,  # unread without ranks
            ranks.ranks if with_ranks else topk_ids,
            *(quantized or (topk_ids, topk_weights)),  # unread without quantisation
            num_tokens, hidden, float(routing.routed_scaling_factor),
            **selection, BLOCK_T=block_t, BLOCK_H=block_h, WRITE_RANKS=with_ranks,
            QUANTIZE=SCHEME_CODES[quantize],
            QUANT_C=max(128, BLOCKS.quantize_tile // block_t),
            INTERPRETER=interpreter_active(), num_warps=8 if block_t >= 32 else 4,
        )
    return topk_weights, topk_ids, ranks, quantized


def _rank(topk_ids, num_experts, sizing_tokens=None, num_rows=None) -> _TokenBlockRanks:
    num_tokens, top_k = topk_ids.shape
    ranks = _empty_ranks(num_tokens, num_experts, top_k, topk_ids.device, sizing_tokens)
    # With the filled rows known on the device, programs for the rows expected, at least
    # enough to busy the GPU (they stride over any more); else one per token block.
    programs = triton.cdiv(num_tokens, ranks.block_t)
    if num_rows is not None:
        programs = min(programs, max(triton.cdiv(sizing_tokens or num_tokens, ranks.block_t),
                                     busy_programs(topk_ids.device)))
    with stage_range("rank"):
        rank_kernel[(programs,)](
            topk_ids, ranks.block_counts, ranks.ranks, num_tokens,
            num_rows if num_rows is not None else topk_ids,  # unread without HAS_ROWS
            NUM_EXPERTS=num_experts, TOP_K=top_k, E_PAD=_pow2_at_least(num_experts, 16),
            K_PAD=_pow2_at_least(top_k), BLOCK_T=ranks.block_t, HAS_ROWS=num_rows is not None,
            num_warps=4,
        )
    return ranks


def _empty_alignment(num_slots, num_experts, block_m, device,
                     switch: BlockSwitch | None = None) -> Alignment:
    """Arrays for the alignment; with ``switch`` large enough for either block size (and
    two blocks-in-use words), max_blocks the larger."""
    sizes = (block_m,) if switch is None else (block_m, switch.block_m)
    blocks = [max_blocks_for(num_slots, num_experts, size) for size in sizes]
    rows = max(b * size for b, size in zip(blocks, sizes))
    return Alignment(torch.empty(rows, dtype=torch.int32, device=device),
                     torch.empty(max(blocks), dtype=torch.int32, device=device),
                     torch.empty(len(sizes), dtype=torch.int32, device=device), max(blocks))


def _switch_args(switch: BlockSwitch | None) -> tuple[int, int]:
    """(switch_slots, BIG_BLOCK_M) of the align kernels; (0, 0): no switch."""
    return (0, 0) if switch is None else (switch.slots, switch.block_m)


def _align(topk_ids, ranks: _TokenBlockRanks, num_experts, block_m, num_rows=None,
           switch: BlockSwitch | None = None) -> Alignment:
    alignment = _empty_alignment(topk_ids.numel(), num_experts, block_m, topk_ids.device, switch)
    e_pad = _pow2_at_least(num_experts, 16)
    switch_slots, big_block_m = _switch_args(switch)
    with stage_range("align"):
        align_kernel[(1,)](
            topk_ids, ranks.block_counts, ranks.ranks, alignment.sorted_slots,
            alignment.block_expert, alignment.num_blocks,
            topk_ids.numel(), ranks.block_counts.shape[0], alignment.max_blocks,
            num_rows if num_rows is not None else topk_ids,  # unread without HAS_ROWS
            switch_slots, NUM_EXPERTS=num_experts, TOP_K=topk_ids.shape[1],
            RANK_BLOCK_T=ranks.block_t, E_PAD=e_pad, BLOCK_M=block_m, BIG_BLOCK_M=big_block_m,
            TB_CHUNK=max(1, 4096 // e_pad), BLOCK_CHUNK=max(16, 4096 // e_pad), CHUNK=4096,
            HAS_ROWS=num_rows is not None, num_warps=8,
        )
    return alignment


def _rank_align(topk_ids, num_experts, block_m, sizing_tokens, num_rows,
                switch: BlockSwitch | None = None) -> Alignment:
    """``rank_align_kernel``: both steps in one launch over the filled rows."""
    num_tokens, top_k = topk_ids.shape
    ranks = _empty_ranks(num_tokens, num_experts, top_k, topk_ids.device, sizing_tokens)
    alignment = _empty_alignment(topk_ids.numel(), num_experts, block_m, topk_ids.device, switch)
    e_pad = _pow2_at_least(num_experts, 16)
    switch_slots, big_block_m = _switch_args(switch)
    with stage_range("align"):
        rank_align_kernel[(1,)](
            topk_ids, ranks.block_counts, ranks.ranks, alignment.sorted_slots,
            alignment.block_expert, alignment.num_blocks, num_tokens,
            ranks.block_counts.shape[0], alignment.max_blocks, num_rows, switch_slots,
            NUM_EXPERTS=num_experts, TOP_K=top_k, E_PAD=e_pad, K_PAD=_pow2_at_least(top_k),
            RANK_BLOCK_T=ranks.block_t, ONE_HOT_ROWS=BLOCKS.one_hot_rows,
            ALL_ROWS=_pow2_at_least(num_tokens), BLOCK_M=block_m, BIG_BLOCK_M=big_block_m,
            TB_CHUNK=max(1, 4096 // e_pad), BLOCK_CHUNK=max(16, 4096 // e_pad), CHUNK=4096,
            num_warps=8,
        )
    return alignment


# ----------------------------------------------------------------- T <= DECODE_MAX_T

def _router_partials(hidden_states, router_weight):
    """``router_partials_kernel``: fp32 [splits, DECODE_MAX_T, E] partial logits of
    T <= DECODE_MAX_T tokens, the router GEMM spread over ~128 programs."""
    num_tokens, hidden = hidden_states.shape
    num_experts = router_weight.shape[0]
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
            INTERPRETER=interpreter_active(), num_warps=4,
        )
    return partials


def _select_align(topk_ids, num_experts, block_m, partials=None, topk_weights=None,
                  routing: Routing | None = None, score_bias=None,
                  logit_dtype=torch.float32, stage="align") -> Alignment:
    """``select_align_kernel`` (NVTX range ``stage``). With router ``partials`` (and ``routing``) it first selects
    the experts, writing topk_ids and topk_weights; without, it reads the given topk_ids."""
    num_tokens, top_k = topk_ids.shape
    device = topk_ids.device
    alignment = _empty_alignment(num_tokens * top_k, num_experts, block_m, device)
    block_counts = torch.empty(1, num_experts, dtype=torch.int32, device=device)
    ranks = torch.empty(num_tokens * top_k, dtype=torch.int32, device=device)
    select = partials is not None
    selection = (routing or Routing(top_k, renormalize=False)).selection_constexprs(
        num_experts, score_bias is not None)
    with stage_range(stage):
        select_align_kernel[(1,)](
            partials if select else topk_ids,  # each placeholder is unread when its flag is off
            score_bias if score_bias is not None else topk_ids,
            topk_weights if select else topk_ids, topk_ids, block_counts, ranks,
            alignment.sorted_slots, alignment.block_expert, alignment.num_blocks,
            num_tokens, float(routing.routed_scaling_factor if select else 1.0), alignment.max_blocks,
            SELECT=select, LOGIT_DTYPE=TRITON[logit_dtype],
            H_SPLITS=partials.shape[0] if select else 1, **selection,
            BLOCK_T=DECODE_MAX_T, BLOCK_M=block_m,
            BLOCK_CHUNK=max(16, 4096 // selection["E_PAD"]), CHUNK=1024,
            INTERPRETER=interpreter_active(), num_warps=8,
        )
    return alignment


def _decode_route_align(hidden_states, router_weight, routing: Routing, score_bias, block_m,
                        stage):
    """Routing and alignment of T <= DECODE_MAX_T tokens in two launches."""
    num_tokens = hidden_states.shape[0]
    device = hidden_states.device
    topk_weights = torch.empty(num_tokens, routing.top_k, dtype=torch.float32, device=device)
    topk_ids = torch.empty(num_tokens, routing.top_k, dtype=torch.int32, device=device)
    alignment = _select_align(
        topk_ids, router_weight.shape[0], block_m,
        partials=_router_partials(hidden_states, router_weight), topk_weights=topk_weights,
        routing=routing, score_bias=score_bias, logit_dtype=hidden_states.dtype, stage=stage)
    return topk_weights, topk_ids, alignment
