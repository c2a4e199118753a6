"""Tile choice for the grouped GEMMs: one lookup, tuned tables first, a heuristic after.

Tables (``moe_ops.tile_table``, one JSON file per GPU) are written by ``tools/tune.py``.
A lookup takes the entry of the same (stage, E, H, I, weights) whose T bucket is nearest
in log scale, within 8x (weights: the dtype's name, or "fp8-block" / "fp8-channel");
anything not in a table falls back to ``heuristic_tile``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch

from .fp8 import tile_key
from .interpreter import interpreter_active
from .tile_table import gpu_entries


# fp8 experts multiply in fp8 (activations quantised) from this many tokens on.
FP8_ACTIVATIONS_MIN_T = 32
# A tuned bucket stands for token counts within 8x of its own; past that the regime may
# differ (an fp8 table tuned at T=8192 only must not give T=1 its fp8-activation tiles).
NEAREST_MAX_LOG2 = 3


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch settings of one grouped-GEMM launch.

    B_DESC reads the weight tiles through a tensor descriptor (TMA on Hopper) instead
    of pointer loads, where the weights' layout allows one (``descriptor_ok``).
    A_DESC (down tiles only) has gate_up write h in block order, so that down reads its
    A tiles through a descriptor instead of gathering rows by slot.
    A_FP8 (fp8 weights only; BLOCK_K = 128 with block scales): A arrives in e4m3 (from a
    quantisation launch, the router kernel or gate_up's epilogue, ``moe_ops.pipeline``)
    and the dot runs in fp8; without it fp8 weights are widened to A's dtype.
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3
    B_DESC: bool = False
    A_DESC: bool = False
    A_FP8: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def has_tma(device: torch.device) -> bool:
    """Whether ``device`` loads tensor-descriptor tiles in hardware (NVIDIA sm_90 and up)."""
    return (device.type == "cuda" and torch.version.hip is None and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (9, 0))


def heuristic_tile(stage: str, num_experts: int, hidden: int, inter: int,
                   num_tokens: int, top_k: int, dtype: torch.dtype, tma: bool = False,
                   fp8: str | None = None) -> TileConfig:
    """Block sizes that work on any device; used where no tuned entry exists.

    BLOCK_M follows the rows an expert gets on average, so decode does not pad a
    64-row tile for one token; BLOCK_N shrinks at small T so that enough programs
    stream the weights. With ``tma`` (Hopper and later, 16-bit dtypes) the shapes are
    the ones the H200 table settles on: weights through descriptors at every T, and at
    128-row blocks wide tiles (gate_up 128x(2x128), down 128x256) with down reading h
    through a descriptor too (measured within 0.86-1.10x of the tuned tiles' time).
    fp8 weights (``fp8`` names the scheme) take BLOCK_K = 128, and fp8 activations from
    FP8_ACTIVATIONS_MIN_T tokens on (the H200 tuner chose them at every T >= 32 it tried:
    widening the weights costs more than the quantisation launches); below, weight-only.
    """
    a_fp8 = fp8 is not None and num_tokens >= FP8_ACTIVATIONS_MIN_T
    rows_per_expert = max(1, num_tokens * top_k // num_experts)
    if interpreter_active():
        # The interpreter's cost is per program: few, large programs.
        block_m = min(64, max(16, _next_pow2(rows_per_expert)))
        return TileConfig(block_m, 64, 128 if fp8 else 64, 1, 4, 1, A_FP8=a_fp8)
    # Room for 1.5x the mean rows: an expert spilling into a second block reads its
    # weights twice.
    block_m = min(128, max(16, _next_pow2(rows_per_expert * 3 // 2)))
    elem = dtype.itemsize
    w_elem = 1 if fp8 else elem
    tma = tma and elem == 2  # the tuned shapes are 16-bit ones; fp32 keeps the plain tiles
    a_desc = False
    if block_m <= 32:
        block_n, block_k, group_m, warps = 64, 128 // (elem // 2), 1, 4
    elif block_m == 64:
        block_n, block_k, group_m, warps = 128, 64, 8, 8 if tma else 4
    elif tma:
        block_n, block_k, group_m, warps = (256 if stage == "down" else 128), 64, 8, 8
        a_desc = stage == "down"
    else:
        block_n, block_k, group_m, warps = (128 if stage == "down" else 64), 64, 8, 8
    if fp8:
        block_k = 128
        if block_m == 128 and tma:
            # 64-row tiles: block scales keep a second accumulator per K step, which
            # 128x256 tiles spill (the H200 tuner's block entries are 64-row ones).
            block_m, block_n, group_m, warps = 64, (256 if stage == "down" else 128), 8, 8
    # As many pipeline stages as fit in ~160 KB of shared memory, 2 to 4.
    b_tiles = 2 if stage == "gate_up" else 1
    stage_bytes = block_m * block_k * elem + b_tiles * block_k * block_n * w_elem
    stages = max(2, min(4, (160 * 1024) // stage_bytes))
    return TileConfig(block_m, block_n, block_k, group_m, warps, stages, B_DESC=tma, A_DESC=a_desc,
                      A_FP8=a_fp8)


@functools.lru_cache(maxsize=None)
def _load_table(gpu_name: str) -> dict:
    """This GPU's tuned tiles, keyed by (stage, E, H, I, weights) -> [(T, TileConfig)]."""
    index: dict = {}
    for entry in gpu_entries(gpu_name):
        key = (entry["stage"], entry["E"], entry["H"], entry["I"], entry["dtype"])
        index.setdefault(key, []).append((entry["T"], TileConfig(**entry["config"])))
    return index


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


@functools.lru_cache(maxsize=4096)
def get_tile_config(stage: str, num_experts: int, hidden: int, inter: int, num_tokens: int,
                    top_k: int, dtype: torch.dtype, device: torch.device,
                    fp8: str | None = None) -> TileConfig:
    """The tile for one grouped-GEMM launch: the tuned entry nearest in T, else the heuristic.
    ``dtype`` is the hidden states'; ``fp8`` the weights' fp8 scheme, None for float weights.

    Cached: the lookup sits on the hot path of every call.
    """
    if not interpreter_active():
        candidates = _load_table(_device_name(device)).get(
            (stage, num_experts, hidden, inter, tile_key(dtype, fp8)))
        if candidates:
            log_t = math.log2(max(1, num_tokens))
            t, config = min(candidates, key=lambda tc: abs(math.log2(tc[0]) - log_t))
            if abs(math.log2(t) - log_t) <= NEAREST_MAX_LOG2:
                return config
    return heuristic_tile(stage, num_experts, hidden, inter, num_tokens, top_k, dtype,
                          has_tma(device), fp8)
