"""fp8 expert weights: the two schemes, their scale layouts, and (de)quantisation.

Weights are float8_e4m3fn with float32 dequantisation multipliers (``w ~= w8 * scale``;
transformers and DeepSeek-V3's checkpoints call them ``weight_scale_inv``). For a
weight W [E, N, K] (N output rows, K reduced):

    "block"    scale [E, cdiv(N, 128), cdiv(K, 128)]: one per 128x128 block (DeepSeek-V3's
               checkpoints, transformers' ``FP8Experts``)
    "channel"  scale [E, N]: one per output row

The scheme is told by the scale's rank. Where a tile asks for fp8 activations
(``TileConfig.A_FP8``) the kernels quantise the GEMM's input per row (channel weights) or
per row per 128 columns (block weights), as ``quantize_activations`` does here:
``s = max(amax, 1e-10) / 448``, ``q = e4m3(a / s)``.
"""
from __future__ import annotations

import torch

from .dtypes import dtype_name

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
SCHEMES = ("block", "channel")
AMAX_FLOOR = 1e-10

_fast_accumulation = False


def set_fp8_fast_accumulation(enabled: bool) -> None:
    """Let fp8 MMAs with per-channel scales accumulate at Hopper's reduced precision over
    the whole K (as torch's ``use_fast_accum`` and vLLM's Triton kernel do): up to 2x
    faster at large T, about 1e-2 further from exact float32 accumulation. Off by
    default. Read at each launch (a captured CUDA graph keeps the setting it saw)."""
    global _fast_accumulation
    _fast_accumulation = bool(enabled)


def fast_accumulation() -> bool:
    """Whether ``set_fp8_fast_accumulation`` turned fast fp8 accumulation on."""
    return _fast_accumulation


def scheme_of(scale: torch.Tensor | None) -> str | None:
    """``"block"`` for a 3-D scale, ``"channel"`` for a 2-D one, None without a scale."""
    if scale is None:
        return None
    return "block" if scale.dim() == 3 else "channel"


def scale_shape(scheme: str, weight_shape) -> tuple[int, ...]:
    """The scale shape ``scheme`` gives a weight [E, N, K]."""
    num_experts, rows, cols = weight_shape
    if scheme == "block":
        return (num_experts, -(-rows // BLOCK), -(-cols // BLOCK))
    if scheme == "channel":
        return (num_experts, rows)
    raise ValueError(f"fp8 scheme must be one of {SCHEMES}, got {scheme!r}")


# The kernels' number for a weights' scheme (W_SCALE, the router kernel's QUANTIZE).
SCHEME_CODES = {None: 0, "channel": 1, "block": 2}


def wants_fp8(weight_dtype: torch.dtype | None, dtype: torch.dtype) -> bool:
    """Whether ``weight_dtype`` asks for fp8 experts beside hidden ``dtype`` (None or
    ``dtype``: float experts); ValueError for any other dtype."""
    if weight_dtype is None or weight_dtype == dtype:
        return False
    if weight_dtype != FP8_DTYPE:
        raise ValueError(f"weight_dtype must be None, dtype or torch.float8_e4m3fn, "
                         f"got {weight_dtype}")
    return True


def empty_activations(rows: int, cols: int, scheme: str,
                      device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (a8 e4m3 [rows, cols], float32 scale) for activations quantised for
    ``scheme``'s weights (the scales as ``empty_scales``)."""
    return (torch.empty(rows, cols, dtype=FP8_DTYPE, device=device),
            empty_scales(rows, cols, scheme, device))


def empty_scales(rows: int, cols: int, scheme: str, device) -> torch.Tensor:
    """Uninitialised float32 scales of [rows, cols] activations quantised for ``scheme``'s
    weights: one per row ("channel") or per row per 128 columns ("block")."""
    shape = (rows,) if scheme == "channel" else (rows, -(-cols // BLOCK))
    return torch.empty(shape, dtype=torch.float32, device=device)


def tile_key(dtype: torch.dtype, scheme: str | None) -> str:
    """The weights' name in the tile tables: the dtype's (``"bfloat16"``) or ``"fp8-block"``."""
    return f"fp8-{scheme}" if scheme else dtype_name(dtype)


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """w [E, N, K] zero-padded to multiples of 128 and viewed [E, N/128, 128, K/128, 128]."""
    num_experts, rows, cols = w.shape
    pad_rows, pad_cols = -rows % BLOCK, -cols % BLOCK
    padded = torch.nn.functional.pad(w, (0, pad_cols, 0, pad_rows))
    return padded.view(num_experts, padded.shape[1] // BLOCK, BLOCK, padded.shape[2] // BLOCK, BLOCK)


def _expand(scale: torch.Tensor, weight_shape) -> torch.Tensor:
    """The scale of every element of a weight [E, N, K] (float32)."""
    _, rows, cols = weight_shape
    if scale.dim() == 2:
        return scale.float()[:, :, None].expand(weight_shape)
    full = scale.float().repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    return full[:, :rows, :cols]


def _quantize_experts(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_weight of a few experts, in float32."""
    w32 = w.float()
    if scheme == "block":
        amax = _blocks(w32).abs().amax(dim=(2, 4))
    else:
        amax = w32.abs().amax(dim=2)
    scale = amax.clamp(min=AMAX_FLOOR) / FP8_MAX
    return (w32 / _expand(scale, w.shape)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _expert_chunks(num_experts: int, per_expert_elems: int) -> range:
    """Start indices of expert chunks of about 2^28 elements (float32 temporaries ~1 GiB)."""
    return range(0, num_experts, max(1, (1 << 28) // max(1, per_expert_elems)))


def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8 float8_e4m3fn [E, N, K], scale float32) with ``w ~= w8 * scale`` elementwise;
    a few experts at a time, so a whole model's layer quantises in little extra memory."""
    if w.dim() != 3:
        raise ValueError(f"quantize_weight takes a weight [E, N, K], got shape {tuple(w.shape)}")
    if scheme not in SCHEMES:
        raise ValueError(f"fp8 scheme must be one of {SCHEMES}, got {scheme!r}")
    w8 = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(scale_shape(scheme, w.shape), dtype=torch.float32, device=w.device)
    step = _expert_chunks(w.shape[0], w[0].numel()).step
    for e in range(0, w.shape[0], step):
        w8[e:e + step], scale[e:e + step] = _quantize_experts(w[e:e + step], scheme)
    return w8, scale


def dequantize_weight(w8: torch.Tensor, scale: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w8 * scale`` [E, N, K] in ``dtype`` (computed in float32, a few experts at a time)."""
    out = torch.empty(w8.shape, dtype=dtype, device=w8.device)
    step = _expert_chunks(w8.shape[0], w8[0].numel()).step
    for e in range(0, w8.shape[0], step):
        part = w8[e:e + step]
        out[e:e + step] = part.float() * _expand(scale[e:e + step], part.shape)
    return out


def quantize_activations(a: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """float32 rows ``a`` [R, K] as the fp8-activation GEMMs see them: quantised to e4m3 per
    row (``per_row``, with per-channel weights) or per row per 128 columns (with block
    weights), and multiplied back by their scale."""
    rows, cols = a.shape
    group = cols if per_row else BLOCK
    padded = torch.nn.functional.pad(a.float(), (0, -cols % group)).view(rows, -1, group)
    scale = padded.abs().amax(dim=2, keepdim=True).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (padded / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    return (q * scale).view(rows, -1)[:, :cols]
