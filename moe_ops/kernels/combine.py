"""Combine kernel: out[t, :] = sum_k y[t*K + k, :], in a fixed order, fp32 accumulate.

Grid = (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H)). y [T*K, H] holds each slot's weighted
expert output (written by the down GEMM); slots whose id is outside [0, E) were never
computed and count as zero. With SKIP_UNROUTED (an expert-parallel receive buffer, rows
for its capacity and mostly unrouted) the grid is (cdiv(T, BLOCK_T), 1): a program whose
rows have no routed slot ends after reading their ids, the others loop over every
BLOCK_H columns, and rows with no routed slot are not written at all. With HAS_ROWS
(such a buffer whose filled rows, ``rows_ptr[0]``, are known on the device) the grid is
(row programs, cdiv(H, BLOCK_H)), as many row programs as the launcher expects row
blocks: each strides over the row blocks below the fill; rows at or past it are not
read, rows with no routed slot not written.
No atomics: the sum is bitwise reproducible.
"""
import triton
import triton.language as tl

from .casting import cast_rne


@triton.jit
def _combine_columns(y_ptr, topk_ids_ptr, out_ptr, offs_t, row_mask, offs_h, hidden,
                     NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_H: tl.constexpr, INTERPRETER: tl.constexpr):
    """out[offs_t, offs_h] for the rows in row_mask: the sum of the rows' routed slots."""
    mask = row_mask[:, None] & (offs_h[None, :] < hidden)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slots = offs_t.to(tl.int64) * TOP_K + k
        ids = tl.load(topk_ids_ptr + slots, mask=row_mask, other=-1)
        routed = (ids >= 0) & (ids < NUM_EXPERTS)
        y = tl.load(y_ptr + slots[:, None] * hidden + offs_h[None, :],
                    mask=mask & routed[:, None], other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + offs_t[:, None].to(tl.int64) * hidden + offs_h[None, :],
             cast_rne(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def _routed_rows(topk_ids_ptr, offs_t, row_mask, NUM_EXPERTS: tl.constexpr,
                 TOP_K: tl.constexpr, K_PAD: tl.constexpr):
    """Which rows of row_mask have at least one slot routed to an expert in [0, E)."""
    offs_k = tl.arange(0, K_PAD)
    ids = tl.load(topk_ids_ptr + offs_t[:, None].to(tl.int64) * TOP_K + offs_k[None, :],
                  mask=row_mask[:, None] & (offs_k < TOP_K)[None, :], other=-1)
    return tl.max(((ids >= 0) & (ids < NUM_EXPERTS)).to(tl.int32), axis=1) != 0


@triton.jit
def combine_kernel(
    y_ptr, topk_ids_ptr, out_ptr, num_tokens, hidden, rows_ptr,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, SKIP_UNROUTED: tl.constexpr,
    HAS_ROWS: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr, INTERPRETER: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = offs_t < num_tokens
    if HAS_ROWS:
        limit = tl.minimum(tl.load(rows_ptr), num_tokens)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        for r0 in range(tl.program_id(0) * BLOCK_T, limit, tl.num_programs(0) * BLOCK_T):
            rows = r0 + tl.arange(0, BLOCK_T)
            _combine_columns(y_ptr, topk_ids_ptr, out_ptr, rows,
                             _routed_rows(topk_ids_ptr, rows, rows < limit, NUM_EXPERTS, TOP_K,
                                          K_PAD),
                             offs_h, hidden, NUM_EXPERTS, TOP_K, BLOCK_T, BLOCK_H, INTERPRETER)
    elif SKIP_UNROUTED:
        routed_rows = _routed_rows(topk_ids_ptr, offs_t, token_mask, NUM_EXPERTS, TOP_K, K_PAD)
        if tl.max(routed_rows.to(tl.int32)) != 0:
            for h0 in range(0, hidden, BLOCK_H):
                _combine_columns(y_ptr, topk_ids_ptr, out_ptr, offs_t, routed_rows,
                                 h0 + tl.arange(0, BLOCK_H), hidden, NUM_EXPERTS, TOP_K,
                                 BLOCK_T, BLOCK_H, INTERPRETER)
    else:
        _combine_columns(y_ptr, topk_ids_ptr, out_ptr, offs_t, token_mask,
                         tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H), hidden,
                         NUM_EXPERTS, TOP_K, BLOCK_T, BLOCK_H, INTERPRETER)
