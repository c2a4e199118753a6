"""Activation quantisation to e4m3 for the fp8-activation GEMMs: one launch per GEMM input.

    dst[r, c] = e4m3(src[r, c] / s),   src ~= dst * s
    PER_ROW      s = scale[r]                 one scale per row (per-channel weights)
    otherwise    s = scale[r, c // 128]       one per row per 128 columns (block weights)

with ``s = max(amax, 1e-10) / 448`` over the row or the group (``moe_ops.kernels.fp8``).
Grid: cdiv(rows, BLOCK_R) programs of BLOCK_R rows; each walks K in 128-column steps
(twice per row with PER_ROW: the amax, then the values). Layouts: src [rows, K] with
row stride ``stride_src``, dst [rows, K] contiguous, scale [rows] or [rows, cdiv(K, 128)].
"""
import triton
import triton.language as tl

from .fp8 import AMAX_FLOOR, FP8_MAX, quantize_rows, round_e4m3


@triton.jit
def _to_e4m3(q):
    """float32 q (|q| <= 448) as e4m3, rounded on the bits first: the interpreter's own
    cast rounds wrongly (that of an exact e4m3 value is right)."""
    return round_e4m3(q).to(tl.float8e4nv)


@triton.jit
def quantize_kernel(src_ptr, dst_ptr, scale_ptr, num_rows, K, stride_src,
                    BLOCK_R: tl.constexpr, PER_ROW: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    cols = tl.arange(0, 128)
    src = src_ptr + rows.to(tl.int64)[:, None] * stride_src + cols[None, :]
    dst = dst_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    groups = tl.cdiv(K, 128)
    if PER_ROW:
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, 128):
            mask = row_mask[:, None] & ((k0 + cols) < K)[None, :]
            a = tl.load(src + k0, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1))
        s = tl.maximum(amax, AMAX_FLOOR) / FP8_MAX
        tl.store(scale_ptr + rows, s, mask=row_mask)
        for k0 in range(0, K, 128):
            mask = row_mask[:, None] & ((k0 + cols) < K)[None, :]
            a = tl.load(src + k0, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(a / s[:, None], -FP8_MAX), FP8_MAX)
            tl.store(dst + k0, _to_e4m3(q), mask=mask)
    else:
        for k0 in range(0, K, 128):
            mask = row_mask[:, None] & ((k0 + cols) < K)[None, :]
            a = tl.load(src + k0, mask=mask, other=0.0)
            q, s = quantize_rows(a)
            tl.store(dst + k0, q.to(tl.float8e4nv), mask=mask)
            tl.store(scale_ptr + rows.to(tl.int64) * groups + k0 // 128, s, mask=row_mask)
