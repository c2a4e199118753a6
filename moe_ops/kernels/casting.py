"""Casts shared by the kernels.

The Triton interpreter truncates float32 -> bfloat16 where GPUs round to nearest even;
with EMULATE_RNE the rounding is done on the bits first, so interpreter runs give the
GPU's numbers.
"""
import triton
import triton.language as tl


@triton.jit
def cast_rne(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """Cast float32 x to dtype, rounding to nearest even also under the interpreter."""
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
