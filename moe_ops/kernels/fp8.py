"""fp8 helpers of the quantisation kernel: a tile's rows quantised in registers, and the
float32 -> e4m3 rounding done on the bits (the Triton interpreter's own cast rounds
wrongly, so values are rounded before any cast).

Quantisation of a tile a [M, 128] (one 128-column group per row), as ``moe_ops.fp8``:
``s = max(amax_row, 1e-10) / 448``, ``q = e4m3(a / s)``, so that ``a ~= q * s[:, None]``.
"""
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)
AMAX_FLOOR = tl.constexpr(1e-10)


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
def quantize_rows(a):
    """(q, s): a [M, K] tile quantised per row, s [M] float32, q [M, K] the e4m3 values
    in float32 (cast them with ``.to(tl.float8e4nv)``), a ~= q * s[:, None]."""
    a = a.to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(a), axis=1), AMAX_FLOOR) / FP8_MAX
    return round_e4m3(tl.minimum(tl.maximum(a / s[:, None], -FP8_MAX), FP8_MAX)), s
