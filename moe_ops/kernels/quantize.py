"""Activation quantisation to e4m3 for the fp8-activation GEMMs: one launch per GEMM input,
except x when the router kernel quantises it (``quantize_rows``) and h under block
scales, which gate_up can write in e4m3 itself.

    dst[r, c] = e4m3(src[r, c] / s),   src ~= dst * s
    PER_ROW      s = scale[r]                 one scale per row (per-channel weights)
    otherwise    s = scale[r, c // 128]       one per row per 128 columns (block weights)

with ``s = max(amax, 1e-10) / 448`` over the row or the group (``moe_ops.fp8`` does the
same in torch). The float32 -> e4m3 rounding is done on the bits (``round_e4m3``): the
Triton interpreter's own cast rounds wrongly, while its cast of an exact e4m3 value is
right. ``quantize_groups`` also serves the grouped GEMM's gate_up epilogue when it
writes h in e4m3 itself (block scales). Grid: up to cdiv(rows, BLOCK_R) programs of
BLOCK_R rows; each walks K in BLOCK_C-column steps (a multiple of 128; twice per row with
PER_ROW: the amax, then the values). The launcher trades rows for columns, so that a few
wide rows (h of a large-I model, or the few filled rows of a receive buffer) still
spread over many programs. Layouts: src [rows, K] with row stride ``stride_src``, dst
[rows, K] contiguous, scale [rows] or [rows, cdiv(K, 128)].
"""
import triton
import triton.language as tl

from .. import fp8
from .landing import wait_landed

FP8_MAX = tl.constexpr(fp8.FP8_MAX)
AMAX_FLOOR = tl.constexpr(fp8.AMAX_FLOOR)


@triton.jit
def round_e4m3(x):
    """float32 x (|x| <= 448) rounded to the nearest even e4m3fn value, kept in float32."""
    ax = tl.abs(x)
    bits = ax.to(tl.uint32, bitcast=True)
    # Normal range: keep 3 of the 23 mantissa bits, rounding to nearest even.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    # Subnormals (below 2^-6) are multiples of 2^-9: adding 2^14 rounds there in float32.
    subnormal = (ax + 16384.0) - 16384.0
    r = tl.where(ax < 0.015625, subnormal, normal)
    return tl.where(x < 0, -r, r)


@triton.jit
def scale_of_amax(amax):
    """The scale of rows whose largest magnitude is amax."""
    return tl.maximum(amax, AMAX_FLOOR) / FP8_MAX


@triton.jit
def to_e4m3(a, s):
    """float32 a over its scales s (broadcast against a), as e4m3."""
    q = tl.minimum(tl.maximum(a / s, -FP8_MAX), FP8_MAX)
    return round_e4m3(q).to(tl.float8e4nv)


@triton.jit
def quantize_groups(a):
    """float32 a [R, C] (C a multiple of 128) with one scale per row per 128 columns:
    (e4m3 [R, C], float32 scales [R, C // 128])."""
    R: tl.constexpr = a.shape[0]
    C: tl.constexpr = a.shape[1]
    groups = tl.reshape(a, [R, C // 128, 128])
    scale = scale_of_amax(tl.max(tl.abs(groups), axis=2))
    return tl.reshape(to_e4m3(groups, scale[:, :, None]), [R, C]), scale


@triton.jit
def quantize_rows(src_ptr, dst_ptr, scale_ptr, rows, row_mask, K, stride_src,
                  BLOCK_C: tl.constexpr, PER_ROW: tl.constexpr):
    """Quantise the rows ``rows`` (a [BLOCK_R] tile, ``row_mask`` the real ones) as the
    module docstring says, in BLOCK_C-column steps (also the router kernel's tail)."""
    BLOCK_R: tl.constexpr = rows.shape[0]
    cols = tl.arange(0, BLOCK_C)
    src = src_ptr + rows.to(tl.int64)[:, None] * stride_src + cols[None, :]
    dst = dst_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    if PER_ROW:
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_C):
            mask = row_mask[:, None] & ((k0 + cols) < K)[None, :]
            a = tl.load(src + k0, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1))
        s = scale_of_amax(amax)
        tl.store(scale_ptr + rows, s, mask=row_mask)
        for k0 in range(0, K, BLOCK_C):
            mask = row_mask[:, None] & ((k0 + cols) < K)[None, :]
            a = tl.load(src + k0, mask=mask, other=0.0).to(tl.float32)
            tl.store(dst + k0, to_e4m3(a, s[:, None]), mask=mask)
    else:
        GROUPS: tl.constexpr = BLOCK_C // 128
        groups = tl.cdiv(K, 128)
        offs_g = tl.arange(0, GROUPS)
        for k0 in range(0, K, BLOCK_C):
            mask = row_mask[:, None] & ((k0 + cols) < K)[None, :]
            q, s = quantize_groups(tl.load(src + k0, mask=mask, other=0.0).to(tl.float32))
            tl.store(dst + k0, q, mask=mask)
            g = k0 // 128 + offs_g
            tl.store(scale_ptr + rows.to(tl.int64)[:, None] * groups + g[None, :], s,
                     mask=row_mask[:, None] & (g < groups)[None, :])


@triton.jit
def quantize_kernel(src_ptr, dst_ptr, scale_ptr, num_rows, K, stride_src, count_ptr, gate_ptr,
                    ids_ptr, row_source_ptr, source_flags_ptr, epoch_ptr, late_ptr, stop_ptr,
                    timeout_ticks,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PER_ROW: tl.constexpr,
                    ROWS_PER_COUNT: tl.constexpr, GATED: tl.constexpr, STRIDE: tl.constexpr,
                    IDS_PER_ROW: tl.constexpr, IDS_PAD: tl.constexpr,
                    NUM_EXPERTS: tl.constexpr, WAIT_ROWS: tl.constexpr,
                    NUM_SOURCES: tl.constexpr, HIP: tl.constexpr):
    """With ROWS_PER_COUNT > 0 only the first count_ptr[0] * ROWS_PER_COUNT rows (those in
    use, known on the device) are quantised; with GATED none where gate_ptr[0] is 0 (a
    tile set the alignment did not choose); with IDS_PER_ROW > 0 only the rows routed to
    an expert here (one of row r's ids ids_ptr[r * IDS_PER_ROW ...] in [0, NUM_EXPERTS);
    IDS_PAD a power of two at least IDS_PER_ROW). The rest are left alone. With STRIDE
    the grid covers fewer row blocks than there are: each program strides over the rest. WAIT_ROWS: src's rows are still landing
    from other GPUs; each block of rows first waits for the flags of its rows' sources
    (``landing.wait_landed``, whose arguments follow ids_ptr)."""
    limit = num_rows
    if ROWS_PER_COUNT > 0:
        limit = tl.minimum(tl.load(count_ptr) * ROWS_PER_COUNT, limit)
    if GATED:
        limit = tl.where(tl.load(gate_ptr) != 0, limit, 0)
    if STRIDE:
        for block in range(tl.program_id(0), tl.cdiv(limit, BLOCK_R), tl.num_programs(0)):
            _quantize_block(src_ptr, dst_ptr, scale_ptr, block, limit, K, stride_src, ids_ptr,
                            row_source_ptr, source_flags_ptr, epoch_ptr, late_ptr, stop_ptr,
                            timeout_ticks, BLOCK_R, BLOCK_C, PER_ROW, IDS_PER_ROW, IDS_PAD,
                            NUM_EXPERTS, WAIT_ROWS, NUM_SOURCES, HIP)
    elif tl.program_id(0) * BLOCK_R < limit:
        _quantize_block(src_ptr, dst_ptr, scale_ptr, tl.program_id(0), limit, K, stride_src,
                        ids_ptr, row_source_ptr, source_flags_ptr, epoch_ptr, late_ptr, stop_ptr,
                        timeout_ticks, BLOCK_R, BLOCK_C, PER_ROW, IDS_PER_ROW, IDS_PAD,
                        NUM_EXPERTS, WAIT_ROWS, NUM_SOURCES, HIP)


@triton.jit
def _quantize_block(src_ptr, dst_ptr, scale_ptr, block, limit, K, stride_src, ids_ptr,
                    row_source_ptr, source_flags_ptr, epoch_ptr, late_ptr, stop_ptr,
                    timeout_ticks, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    PER_ROW: tl.constexpr, IDS_PER_ROW: tl.constexpr, IDS_PAD: tl.constexpr,
                    NUM_EXPERTS: tl.constexpr, WAIT_ROWS: tl.constexpr,
                    NUM_SOURCES: tl.constexpr, HIP: tl.constexpr):
    """Rows block*BLOCK_R ... below limit (routed ones only where IDS_PER_ROW), once
    landed where WAIT_ROWS."""
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < limit
    any_row = True
    if IDS_PER_ROW > 0:
        offs = tl.arange(0, IDS_PAD)
        ids = tl.load(ids_ptr + rows.to(tl.int64)[:, None] * IDS_PER_ROW + offs[None, :],
                      mask=row_mask[:, None] & (offs < IDS_PER_ROW)[None, :], other=-1)
        routed = (ids >= 0) & (ids < NUM_EXPERTS)
        row_mask = row_mask & (tl.max(routed.to(tl.int32), axis=1) > 0)
        any_row = tl.max(row_mask.to(tl.int32), axis=0) > 0  # else the block is done
    if any_row:
        if WAIT_ROWS:
            wait_landed(rows.to(tl.int64), row_mask, row_source_ptr, source_flags_ptr,
                        epoch_ptr, late_ptr, stop_ptr, timeout_ticks, NUM_SOURCES, HIP)
        quantize_rows(src_ptr, dst_ptr, scale_ptr, rows, row_mask, K, stride_src, BLOCK_C,
                      PER_ROW)
