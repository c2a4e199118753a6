"""The two ops' pipelines, top to bottom: tiles -> route and align -> experts.

    fused_moe_impl      tiles, then ``routing.route`` (with alignment), then the experts
    fused_experts_impl  tiles, then ``routing.align_ids`` of the given ids, then the experts
    experts             gate_up -> down -> combine over an alignment

Every buffer is sized from shapes alone (the worst case over routings) and kernels
read the real counts from device memory, so nothing here synchronises with the host
and the whole forward can be captured in a CUDA graph. Arguments are validated by
the ops in ``moe_ops.ops``; these functions trust them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from .dtypes import TRITON
from .fp8 import (FP8_DTYPE, SCHEME_CODES, empty_activations, empty_scales, fast_accumulation,
                  scheme_of)
from .interpreter import BLOCKS, busy_programs, interpreter_active
from .kernels.combine import combine_kernel
from .kernels.grouped_gemm import grouped_gemm_kernel
from .kernels.quantize import quantize_kernel
from .profiling import stage_range
from .routing import (Alignment, BlockSwitch, Routing, align_ids, align_ids_switched,
                      max_blocks_for, route_and_quantize)
from .tiles import TileConfig, get_tile_config


class Landing(NamedTuple):
    """x's rows are still landing from other GPUs: gate_up's tiles wait for the flag of
    each source of their rows first (``kernels.landing``: row_source int32 [rows of x],
    flags int64 [sources], epoch, late and stop int64 [1], all on the device; the bound
    in ticks of the device clock, and whether that clock is AMD's)."""
    row_source: torch.Tensor
    flags: torch.Tensor
    epoch: torch.Tensor
    late: torch.Tensor
    stop: torch.Tensor
    timeout_ticks: int
    hip: bool


@dataclass(frozen=True)
class ExpertTiles:
    """The tiles of one call's two grouped GEMMs and the layout of h between them.

    down walks gate_up's alignment, so its BLOCK_M is gate_up's. ``h_block_order``: gate_up
    writes h in block order (max_blocks * BLOCK_M rows, padding rows zero) so that down
    reads its A tiles through a tensor descriptor; otherwise h rows are indexed by slot
    and down gathers them. The down tile asks for it (``A_DESC``); it is granted where
    h's rows are 16-byte aligned (h itself is a fresh, aligned allocation). ``h_fp8``:
    gate_up writes h in e4m3 with its block scales itself (block-fp8 weights, fp8
    activations for down, gate_up's BLOCK_N a multiple of 128), saving down's
    quantisation launch."""

    gate_up: TileConfig
    down: TileConfig
    h_block_order: bool
    h_fp8: bool = False

    @property
    def block_m(self) -> int:
        return self.gate_up.BLOCK_M


@functools.lru_cache(maxsize=4096)
def expert_tiles(num_tokens: int, num_experts: int, hidden: int, inter: int, top_k: int,
                 dtype: torch.dtype, device: torch.device, gate_up_tile: TileConfig | None = None,
                 down_tile: TileConfig | None = None, fp8: str | None = None) -> ExpertTiles:
    """The given tiles or the lookup's (``moe_ops.tiles``), for one shape and weight format
    (``fp8``: None, "block" or "channel"); cached, since nothing in it changes from call
    to call. ValueError for a given tile that the fp8 scheme cannot run."""
    lookup = (num_experts, hidden, inter, num_tokens, top_k, dtype, device, fp8)
    gate_up_tile = gate_up_tile or get_tile_config("gate_up", *lookup)
    down_tile = replace(down_tile or get_tile_config("down", *lookup), BLOCK_M=gate_up_tile.BLOCK_M)
    for stage, tile in (("gate_up", gate_up_tile), ("down", down_tile)):
        check_fp8_tile(stage, tile, fp8)
    h_elem = 1 if down_tile.A_FP8 else dtype.itemsize
    h_block_order = down_tile.A_DESC and inter * h_elem % 16 == 0
    h_fp8 = fp8 == "block" and down_tile.A_FP8 and gate_up_tile.BLOCK_N % 128 == 0
    return ExpertTiles(gate_up_tile, down_tile, h_block_order, h_fp8)


def check_fp8_tile(stage: str, tile: TileConfig, fp8: str | None) -> None:
    """fp8 activations need fp8 weights; block scales need a BLOCK_K dividing 128, and
    BLOCK_K = 128 with fp8 activations (one quantisation group per K step). Per-channel
    scales take any BLOCK_K."""
    if tile.A_FP8 and fp8 is None:
        raise ValueError(f"{stage} tile {tile}: A_FP8 needs fp8 weights")
    if fp8 == "block" and 128 % tile.BLOCK_K != 0:
        raise ValueError(f"{stage} tile {tile}: block-fp8 weights need a BLOCK_K dividing 128")
    if fp8 == "block" and tile.A_FP8 and tile.BLOCK_K != 128:
        raise ValueError(f"{stage} tile {tile}: A_FP8 with block-fp8 weights needs BLOCK_K=128")


def descriptor_ok(w: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address ``w``: last dim contiguous, the other
    strides and the base 16-byte aligned (the TMA rules)."""
    elem = w.element_size()
    return (w.stride(-1) == 1 and w.data_ptr() % 16 == 0
            and all(s * elem % 16 == 0 for s in w.stride()[:-1]))


def _weight_descriptor(gate_up: bool, w, tile: TileConfig):
    """gate_up views W [E, 2N, K] as [E, 2, N, K], so one box holds gate and up rows."""
    if gate_up:
        num_experts, two_n, k = w.shape
        return TensorDescriptor(w, [num_experts, 2, two_n // 2, k],
                                [w.stride(0), w.stride(1) * (two_n // 2), w.stride(1), 1],
                                [1, 2, tile.BLOCK_N, tile.BLOCK_K])
    return TensorDescriptor(w, list(w.shape), list(w.stride()), [1, tile.BLOCK_N, tile.BLOCK_K])


def quantize_input(a: torch.Tensor, scheme: str, count=None, rows_per_count: int = 0,
                   grid_rows: int | None = None, gate=None, landing: Landing | None = None,
                   routed: tuple[torch.Tensor, int, int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a8 e4m3 [R, K], scale): one scale per row for "channel" weights, one per row per
    128 columns for "block" ones (``kernels.quantize``, one launch). With ``count`` (int32
    [1] on the device) only the first count * rows_per_count rows are quantised, by
    programs sized for ``grid_rows`` of them (default all; at least ``busy_programs``)
    that stride over the rest; with ``gate`` (int32 [1] on the device) none where it
    holds 0; with ``routed`` (ids, ids per row, E) only the rows with an id in [0, E)
    (row r's ids: the int32 ids' r * ids_per_row ...); with ``landing`` a's rows are
    still landing (``Landing``): each block of rows is quantised once its sources' flags
    are up."""
    rows, k = a.shape
    a8, scale = empty_activations(rows, k, scheme, a.device)
    expected = rows if grid_rows is None else max(1, min(grid_rows, rows))
    # Fewer rows per program where rows are few, wider column steps to make up.
    spread = expected // BLOCKS.quantize_programs
    block_r = min(BLOCKS.quantize_rows, 1 << max(0, spread.bit_length() - 1))
    block_c = max(128, BLOCKS.quantize_tile // block_r)
    blocks = programs = triton.cdiv(rows, block_r)
    if expected < rows:  # for the rows expected, at least enough to busy the GPU
        programs = min(blocks, max(triton.cdiv(expected, block_r), busy_programs(a.device)))
    with stage_range("quantize"):
        quantize_kernel[(programs,)](
            a, a8, scale, rows, k, a.stride(0), count if count is not None else scale,
            gate if gate is not None else scale,  # unread without GATED
            routed[0] if routed else scale,  # unread without IDS_PER_ROW
            *(landing[:5] if landing else (scale,) * 5),  # unread without WAIT_ROWS
            landing.timeout_ticks if landing else 0,
            BLOCK_R=block_r, BLOCK_C=block_c, PER_ROW=scheme == "channel",
            ROWS_PER_COUNT=rows_per_count if count is not None else 0, GATED=gate is not None,
            STRIDE=programs < blocks, IDS_PER_ROW=routed[1] if routed else 0,
            IDS_PAD=triton.next_power_of_2(routed[1]) if routed else 1,
            NUM_EXPERTS=routed[2] if routed else 0, WAIT_ROWS=landing is not None,
            NUM_SOURCES=triton.next_power_of_2(landing.flags.numel()) if landing else 1,
            HIP=bool(landing and landing.hip))
    return a8, scale


def _grouped_gemm(gate_up: bool, a, a_scale, w, w_scale, out, topk_weights, alignment: Alignment,
                  num_slots, rows_per_slot_div, n, k, tile: TileConfig, h_block_order: bool,
                  out_scale=None, h_dtype=None, grid_blocks=None, landing: Landing | None = None):
    """One ``grouped_gemm_kernel`` launch (the gate_up stage or the down stage); ``w_scale``
    None for float weights, else fp8 ``w``'s scales (``moe_ops.fp8``); ``a_scale`` those of
    an e4m3 ``a`` (tiles with A_FP8), else None. ``out_scale``: gate_up writes e4m3 h
    and its block scales there, from h as ``h_dtype`` would hold it. ``grid_blocks``:
    blocks the grid covers (each program strides over the rest; at least enough for
    ``busy_programs``), default all; ``landing``
    (gate_up): the rows of ``a`` still landing."""
    sorted_slots, block_expert, num_blocks, max_blocks = alignment
    column_tiles = triton.cdiv(n, tile.BLOCK_N)
    if grid_blocks and grid_blocks < max_blocks:  # at least enough programs to busy the GPU
        grid_blocks = max(grid_blocks, triton.cdiv(busy_programs(a.device), column_tiles))
    grid_blocks = min(grid_blocks or max_blocks, max_blocks)
    grid = (grid_blocks * column_tiles,)
    use_desc = tile.B_DESC and descriptor_ok(w)
    w_desc = _weight_descriptor(gate_up, w, tile) if use_desc else None
    a_desc = (TensorDescriptor(a, list(a.shape), list(a.stride()), [tile.BLOCK_M, tile.BLOCK_K])
              if h_block_order and not gate_up else None)
    with stage_range("gate_up" if gate_up else "down"):
        grouped_gemm_kernel[grid](
            a, a_desc, a_scale, w, w_desc, w_scale, out, out_scale, topk_weights, sorted_slots,
            block_expert, num_blocks, n, k, num_slots, rows_per_slot_div, grid_blocks,
            a.stride(0), 0 if a_scale is None else a_scale.stride(0), w.stride(0), w.stride(1),
            0 if w_scale is None else w_scale.stride(0), 0 if w_scale is None else w_scale.stride(1),
            out.stride(0), 0 if out_scale is None else out_scale.stride(0),
            *(landing[:5] if landing else (sorted_slots,) + (num_blocks,) * 4),
            landing.timeout_ticks if landing else 0,  # unread without WAIT_ROWS
            GATE_UP=gate_up, OUT_FP8=out_scale is not None,
            H_DTYPE=None if h_dtype is None else TRITON[h_dtype],
            BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K,
            GROUP_M=tile.GROUP_M, EVEN_K=k % tile.BLOCK_K == 0, H_BLOCK_ORDER=h_block_order,
            B_DESC=use_desc, W_SCALE=SCHEME_CODES[scheme_of(w_scale)], A_FP8=tile.A_FP8,
            FAST_ACC=fast_accumulation(), LOOP_M=grid_blocks < max_blocks,
            WAIT_ROWS=landing is not None,
            NUM_SOURCES=triton.next_power_of_2(landing.flags.numel()) if landing else 1,
            HIP=bool(landing and landing.hip),
            INTERPRETER=interpreter_active(),
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )


class Crowded(NamedTuple):
    """A second tile set for a receive buffer filled past the rows its tiles were chosen
    for (``align_ids_switched``): its tiles, its view of the alignment, and the blocks its
    GEMM grids cover (programs stride over the rest)."""
    tiles: ExpertTiles
    alignment: Alignment
    grid_blocks: int


def experts(hidden_states, topk_weights, topk_ids, w_gate_up, w_down, tiles: ExpertTiles,
            alignment: Alignment, w_gate_up_scale=None, w_down_scale=None, x_quantized=None,
            skip_unrouted: bool = False, grid_blocks: int | None = None, out=None,
            num_rows=None, grid_rows: int | None = None, landing: Landing | None = None,
            crowded: Crowded | None = None):
    """gate_up -> down -> combine over an alignment: out [T, H]. A stage whose tile has
    A_FP8 reads its input quantised by one launch before it (``quantize_input``), except
    down's when gate_up writes h in e4m3 itself (``ExpertTiles.h_fp8``) and gate_up's when
    the router already quantised x (``x_quantized``: (x8, scale)). ``skip_unrouted``:
    rows of out whose ids are all outside [0, E) are left unwritten instead of zeroed;
    ``grid_blocks``: blocks the GEMM grids cover (``_grouped_gemm``); ``out``: a given
    [T, H] output buffer (contiguous) instead of a fresh one; ``num_rows`` (int32 [1] on
    the device, with ``skip_unrouted``): rows at or past it hold no routed id, and the
    combine does not read them, its programs sized for ``grid_rows`` rows (default all;
    at least ``busy_programs``) and striding over the rest (without ``num_rows``, the
    quantisations of a ``skip_unrouted`` call skip the rows without a routed id);
    ``landing``: the rows of hidden_states are still landing (``Landing``: gate_up's
    tiles wait for them where they read x in place, its quantisation's programs where x
    is quantised); ``crowded``: a second tile set and alignment, of which the alignment
    lets one compute: each set has its own chain of launches (x's quantisation where its
    gate_up tile reads e4m3, gate_up, h's quantisation where its down tile does, down),
    and the chain of the set not chosen finds no block and no row to quantise."""
    num_tokens, hidden = hidden_states.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    num_slots = topk_ids.numel()
    top_k = topk_ids.shape[1]
    dtype, device = hidden_states.dtype, hidden_states.device
    scheme = scheme_of(w_gate_up_scale)
    # (tiles, alignment, GEMM grid blocks, rows of x its grids expect: None for all)
    sets = [(tiles, alignment, grid_blocks, grid_rows)]
    if crowded:
        sets.append((crowded.tiles, crowded.alignment, crowded.grid_blocks, None))
    y = torch.empty(num_slots, hidden, dtype=dtype, device=device)

    def chain(stage_tiles: ExpertTiles, stage_alignment: Alignment, blocks, expected_rows,
              h, h_scale):
        # A set the alignment did not choose finds no block, and its quantisations no row.
        gate = stage_alignment.num_blocks if crowded else None
        # Quantisation grids sized for the rows expected where the rows in use are known
        # on the device; else all may be, and a sparse buffer's unrouted ones are skipped.
        x_rows = expected_rows if num_rows is not None else None
        sparse = skip_unrouted and num_rows is None
        x, x_scale, gate_up_landing = hidden_states, None, landing
        if stage_tiles.gate_up.A_FP8:  # quantised once landed: gate_up then waits for none
            x, x_scale = x_quantized or quantize_input(
                hidden_states, scheme, num_rows, 1, x_rows, gate, landing=landing,
                routed=(topk_ids, top_k, num_experts) if sparse else None)
            gate_up_landing = None
        _grouped_gemm(True, x, x_scale, w_gate_up, w_gate_up_scale, h, topk_weights,
                      stage_alignment, num_slots, top_k, inter, hidden, stage_tiles.gate_up,
                      stage_tiles.h_block_order, h_scale, dtype if stage_tiles.h_fp8 else None,
                      blocks, gate_up_landing)
        if stage_tiles.down.A_FP8 and not stage_tiles.h_fp8:  # h's rows in use only
            if stage_tiles.h_block_order:  # those of the blocks in use, where few may be
                block_m = stage_tiles.block_m
                used = stage_alignment.num_blocks if skip_unrouted or crowded else None
                h, h_scale = quantize_input(
                    h, scheme, used, block_m,
                    blocks * block_m if used is not None and expected_rows and blocks else None)
            else:
                h, h_scale = quantize_input(h, scheme, num_rows, top_k,
                                            x_rows and x_rows * top_k, gate,
                                            routed=(topk_ids, 1, num_experts) if sparse else None)
        _grouped_gemm(False, h, h_scale, w_down, w_down_scale, y, topk_weights, stage_alignment,
                      num_slots, 1, hidden, inter, stage_tiles.down, stage_tiles.h_block_order,
                      grid_blocks=blocks)

    h_buffers = _h_buffers(sets, num_slots, inter, scheme, dtype, device)
    for stage_set, (h, h_scale) in zip(sets, h_buffers):
        chain(*stage_set, h, h_scale)
    out = torch.empty_like(hidden_states) if out is None else out
    column_programs = (1 if skip_unrouted and num_rows is None
                       else triton.cdiv(hidden, BLOCKS.combine_h))
    row_programs = triton.cdiv(num_tokens, BLOCKS.combine_t)
    if num_rows is not None:  # for the rows expected, at least enough to busy the GPU
        row_programs = min(row_programs, max(
            triton.cdiv(grid_rows or num_tokens, BLOCKS.combine_t),
            triton.cdiv(busy_programs(device), column_programs)))
    with stage_range("combine"):
        combine_kernel[(row_programs, column_programs)](
            y, topk_ids, out, num_tokens, hidden,
            num_rows if num_rows is not None else topk_ids,  # unread without HAS_ROWS
            NUM_EXPERTS=num_experts, TOP_K=top_k, SKIP_UNROUTED=skip_unrouted,
            HAS_ROWS=num_rows is not None,
            K_PAD=triton.next_power_of_2(top_k), BLOCK_T=BLOCKS.combine_t,
            BLOCK_H=BLOCKS.combine_h, INTERPRETER=interpreter_active(),
        )
    return out


def _h_buffers(sets, num_slots: int, inter: int, scheme: str | None, dtype, device
               ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each tile set's h [rows, I] and its block scales (None unless the set's gate_up
    writes h in e4m3, ``ExpertTiles.h_fp8``): rows max_blocks * BLOCK_M in block order,
    else one per slot. The sets' h share one allocation: only the set the alignment
    chose writes and reads its h."""
    layouts = [(a.max_blocks * t.block_m if t.h_block_order else num_slots,
                FP8_DTYPE if t.h_fp8 else dtype) for t, a, *_ in sets]
    storage = torch.empty(max(rows * inter * d.itemsize for rows, d in layouts),
                          dtype=torch.uint8, device=device)
    return [(storage[:rows * inter * d.itemsize].view(d).view(rows, inter),
             empty_scales(rows, inter, scheme, device) if d == FP8_DTYPE else None)
            for rows, d in layouts]


def fused_experts_impl(hidden_states, topk_weights, topk_ids, w_gate_up, w_down,
                       gate_up_tile: TileConfig | None = None,
                       down_tile: TileConfig | None = None,
                       w_gate_up_scale=None, w_down_scale=None, tile_tokens: int | None = None,
                       skip_unrouted: bool = False, out=None, num_rows=None,
                       landing: Landing | None = None, second_tiles: bool = True):
    """align -> gate_up -> down -> combine of given routing (four or five launches).

    Contiguous hidden_states [T, H], fp32 topk_weights and int32 topk_ids [T, K]; fp8
    weights come with their scales. Tiles default to the lookup in ``moe_ops.tiles``
    for T tokens (the tuner passes its candidates). An expert-parallel rank's receive
    buffer has rows for its capacity, mostly unrouted: it passes the token count it
    expects (``tile_tokens``: tiles and GEMM grids sized for that many, any more still
    computed), ``skip_unrouted``, ``out`` and, where its filled rows are known on the
    device, ``num_rows`` (see ``experts``; the alignment then reads only those rows), and
    ``landing`` where its rows are still arriving (``Landing``). With ``second_tiles`` a
    buffer that may fill far past the tokens expected (peers with larger batches) also
    gets a second tile set, chosen on the device by the slots routed (``_crowded_tiles``:
    a second chain of launches beside the first, which finds no block unless chosen)."""
    num_tokens, hidden = hidden_states.shape
    if num_tokens == 0:
        return torch.empty_like(hidden_states)
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    top_k = topk_ids.shape[1]
    expected = max(1, min(num_tokens, tile_tokens or num_tokens))
    tiles = expert_tiles(expected, num_experts, hidden, inter, top_k, hidden_states.dtype,
                         hidden_states.device, gate_up_tile, down_tile, scheme_of(w_gate_up_scale))
    if num_rows is not None and not skip_unrouted:
        raise ValueError("num_rows leaves rows unwritten: it needs skip_unrouted=True")
    grid_blocks = max_blocks_for(expected * top_k, num_experts, tiles.block_m)
    crowded_tiles = _crowded_tiles(
        tiles, expected, num_tokens, w_gate_up_scale, num_experts, hidden, inter, top_k,
        hidden_states) if second_tiles else None
    crowded = None
    if crowded_tiles is None:
        alignment = align_ids(topk_ids, num_experts, tiles.block_m,
                              expected if expected < num_tokens else None, num_rows)
    else:
        switch = BlockSwitch(crowded_tiles.block_m, _switch_slots(expected, top_k))
        alignment, crowded_alignment = align_ids_switched(
            topk_ids, num_experts, tiles.block_m, expected, num_rows, switch)
        crowded = Crowded(crowded_tiles, crowded_alignment, 1)  # grid: busy_programs
    return experts(hidden_states, topk_weights, topk_ids, w_gate_up, w_down, tiles, alignment,
                   w_gate_up_scale, w_down_scale, skip_unrouted=skip_unrouted, out=out,
                   grid_blocks=grid_blocks, num_rows=num_rows, grid_rows=expected,
                   landing=landing, crowded=crowded)


CROWDED_TILE_TOKENS = 1024  # the second tile set of a receive buffer is chosen for this many


def _crowded_tiles(tiles: ExpertTiles, expected: int, num_tokens: int, w_scale, num_experts,
                   hidden, inter, top_k, x) -> ExpertTiles | None:
    """A receive buffer's second tile set, for when it fills far past the tokens its rank
    expects (peers with larger batches than its own, known on the device only): the
    tiles for CROWDED_TILE_TOKENS tokens (of the same weight format), where those align
    with another block size than ``tiles`` and the buffer can hold more slots than the
    switch point. None where one set serves."""
    if expected * 4 >= CROWDED_TILE_TOKENS:
        return None
    if num_tokens * top_k <= _switch_slots(expected, top_k):
        return None
    crowded = expert_tiles(min(num_tokens, CROWDED_TILE_TOKENS), num_experts, hidden, inter,
                           top_k, x.dtype, x.device, fp8=scheme_of(w_scale))
    return crowded if crowded.block_m != tiles.block_m else None


def _switch_slots(expected: int, top_k: int) -> int:
    """Routed slots past which a receive buffer takes its second tile set: those of 4x
    the tokens expected, at least of ``crowded_rows`` tokens."""
    return max(BLOCKS.crowded_rows, 4 * expected) * top_k


def fused_moe_impl(hidden_states, router_weight, w_gate_up, w_down, routing: Routing,
                   score_bias=None, w_gate_up_scale=None, w_down_scale=None):
    """route and align -> gate_up -> down -> combine, five launches (with fp8 activations
    the router kernel also quantises x, off the decode path)."""
    num_tokens, hidden = hidden_states.shape
    if num_tokens == 0:
        return torch.empty_like(hidden_states)
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    scheme = scheme_of(w_gate_up_scale)
    tiles = expert_tiles(num_tokens, num_experts, hidden, inter, routing.top_k,
                         hidden_states.dtype, hidden_states.device, fp8=scheme)
    routed, x_quantized = route_and_quantize(hidden_states, router_weight, routing, score_bias,
                                             tiles.block_m, scheme if tiles.gate_up.A_FP8 else None)
    return experts(hidden_states, routed.topk_weights, routed.topk_ids, w_gate_up, w_down, tiles,
                   routed.alignment, w_gate_up_scale, w_down_scale, x_quantized)
