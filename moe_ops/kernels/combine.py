"""Combine kernel: out[t, :] = sum_k y[t*K + k, :], in a fixed order, fp32 accumulate.

Grid = (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H)). y [T*K, H] holds each slot's weighted
expert output (written by the down GEMM); slots whose id is outside [0, E) were never
computed and count as zero. No atomics: the sum is bitwise reproducible.
"""
import triton
import triton.language as tl

from .casting import cast_rne


@triton.jit
def combine_kernel(
    y_ptr, topk_ids_ptr, out_ptr, num_tokens, hidden,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRETER: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = offs_t < num_tokens
    mask = token_mask[:, None] & (offs_h[None, :] < hidden)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slots = offs_t.to(tl.int64) * TOP_K + k
        ids = tl.load(topk_ids_ptr + slots, mask=token_mask, other=-1)
        routed = (ids >= 0) & (ids < NUM_EXPERTS)
        y = tl.load(y_ptr + slots[:, None] * hidden + offs_h[None, :],
                    mask=mask & routed[:, None], other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + offs_t[:, None].to(tl.int64) * hidden + offs_h[None, :],
             cast_rne(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=mask)
