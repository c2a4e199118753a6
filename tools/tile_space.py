"""The tile configurations the tuner searches (``tools/tune.py``), pruned before any is timed.

    BLOCK_M   <= max(16, next_pow2(2*T*K/E)) and >= a quarter of that cap: a block should
              not be mostly padding, nor so small that a hot expert needs many
    BLOCK_N   32..256 (256 only with BLOCK_M >= 64), BLOCK_K 64 or 128
    GROUP_M   8 only where an expert spans several row blocks (something to group)
    warps     by tile area; stages 3..5 within SMEM_LIMIT of shared memory
    B_DESC    weights through pointers and through a tensor descriptor
    fp8       (fp8 weights) 1-byte weight tiles, A_FP8 both ways (only A_FP8 at the
              WGMMA_ROWS=64 rows added at small T, see below); BLOCK_K 128 for block
              scales (their quantisation group), 128 or 256 for per-channel ones (at
              small T a 256-wide fp8 step moves the bytes a 128-wide bf16 one does)

``LARGE_T_SEEDS`` are shapes Hopper GEMMs are known to like, always timed where legal;
``sample`` draws the rest reproducibly.
"""
from __future__ import annotations

import math
import random
from dataclasses import replace

from moe_ops.tiles import TileConfig

SMEM_LIMIT = 200 * 1024  # bytes; H100/H200 allow 227 KiB per block, keep headroom
# Triton runs a dot of fewer rows as mma.sync, which on Hopper has no e4m3 form: both
# operands are widened to f16 in registers (seen in the sm_90 PTX). From 64 rows it is an
# e4m3 wgmma reading the weight tile straight from shared memory, so fp8-activation tiles
# are also tried at 64 rows where the tokens alone would not fill them.
WGMMA_ROWS = 64


def _next_pow2(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, n))))


def block_m_choices(num_tokens: int, top_k: int, num_experts: int,
                    fp8: str | None = None) -> list[int]:
    """BLOCK_M <= max(16, next_pow2(2*T*K/E)), and no smaller than a quarter of that cap;
    with fp8 weights also WGMMA_ROWS (for fp8-activation tiles only, ``candidate_tiles``)."""
    cap = min(128, max(16, _next_pow2(2 * num_tokens * top_k / num_experts)))
    out = [bm for bm in (16, 32, 64, 128) if cap // 4 <= bm <= cap]
    if fp8 and WGMMA_ROWS not in out:
        out.append(WGMMA_ROWS)
    return out


def candidate_tiles(stage: str, num_tokens: int, top_k: int, num_experts: int,
                    elem_bytes: int, block_ms: list[int],
                    fp8: str | None = None) -> list[TileConfig]:
    """The pruned cross product for one stage (gate_up loads two weight tiles per step),
    weights through pointers and through a descriptor (B_DESC); ``fp8`` (the weights'
    scheme, "block" or "channel") as the module docstring says."""
    rows_per_expert = num_tokens * top_k / num_experts
    weight_tiles = 2 if stage == "gate_up" else 1
    w_bytes = 1 if fp8 else elem_bytes
    padded = set(block_ms) - set(block_m_choices(num_tokens, top_k, num_experts))
    out = []
    for bm, desc in ((bm, desc) for bm in block_ms for desc in (False, True)):
        for bn in (32, 64, 128, 256):
            if bn == 256 and bm < 64:
                continue  # small T: keep programs many, so enough of them stream the weights
            for bk in {"block": (128,), "channel": (128, 256), None: (64, 128)}[fp8]:
                for group_m in (1, 8):
                    if group_m == 8 and rows_per_expert < 2 * bm:
                        continue  # one row block per expert: nothing to group
                    for warps in (4, 8):
                        area = bm * bn
                        if (warps == 8 and area < 64 * 128) or (warps == 4 and area > 128 * 128):
                            continue
                        for stages in (3, 4, 5):
                            smem = stages * (bm * bk * elem_bytes + weight_tiles * bn * bk * w_bytes)
                            if smem > SMEM_LIMIT:
                                continue
                            a_fp8s = (True,) if bm in padded else (False, True)
                            for a_fp8 in (a_fp8s if fp8 else (False,)):
                                out.append(TileConfig(bm, bn, bk, group_m, warps, stages,
                                                      B_DESC=desc, A_FP8=a_fp8))
    return out


# Large-T shapes that Hopper GEMMs are known to like (128-row blocks, 8 warps, 64-wide
# K steps, weights or A through tensor descriptors), always timed where they are legal,
# whatever the sample draws.
LARGE_T_SEEDS = {
    "gate_up": [TileConfig(128, 128, 64, 8, 8, 3, B_DESC=True),
                TileConfig(128, 128, 64, 8, 8, 4, B_DESC=True),
                TileConfig(128, 64, 64, 8, 8, 4, B_DESC=True),
                TileConfig(64, 128, 64, 8, 8, 4, B_DESC=True),
                TileConfig(64, 128, 64, 8, 4, 4, B_DESC=True),
                TileConfig(128, 128, 64, 8, 8, 3)],
    "down": [TileConfig(128, 256, 64, 8, 8, 3, B_DESC=True, A_DESC=True),
             TileConfig(128, 128, 64, 8, 8, 4, B_DESC=True, A_DESC=True),
             TileConfig(128, 256, 64, 8, 8, 3)],
}


# fp8 tiles of WGMMA_ROWS rows at small T (fp8 activations), always timed there.
FP8_WGMMA_SEEDS = [TileConfig(WGMMA_ROWS, 32, 128, 1, 4, 4, A_FP8=True),
                   TileConfig(WGMMA_ROWS, 64, 128, 1, 4, 3, A_FP8=True),
                   TileConfig(WGMMA_ROWS, 32, 128, 1, 4, 4, B_DESC=True, A_FP8=True)]


def seeds(stage: str, num_tokens: int, top_k: int, num_experts: int,
          block_ms: list[int], fp8: bool = False) -> list[TileConfig]:
    """The LARGE_T_SEEDS of ``stage`` whose BLOCK_M is allowed and whose GROUP_M has
    several row blocks per expert to group (down: BLOCK_M set to ``block_ms[0]``); for
    fp8 weights with BLOCK_K 128 and fp8 activations; and with fp8 weights where the
    tokens do not fill WGMMA_ROWS, the FP8_WGMMA_SEEDS."""
    rows_per_expert = num_tokens * top_k / num_experts
    out = []
    if fp8 and WGMMA_ROWS in set(block_ms) - set(block_m_choices(num_tokens, top_k, num_experts)):
        out += FP8_WGMMA_SEEDS
    for tile in LARGE_T_SEEDS[stage]:
        if stage == "down":
            tile = replace(tile, BLOCK_M=block_ms[0])
        if fp8:
            tile = replace(tile, BLOCK_K=128, num_stages=3, A_FP8=tile.BLOCK_M >= 64)
        if tile.BLOCK_M in block_ms and rows_per_expert >= 2 * tile.BLOCK_M:
            out.append(tile)
    return out


def sample(candidates: list[TileConfig], keep: list[TileConfig], limit: int, seed: int) -> list[TileConfig]:
    """``keep`` first (duplicates dropped), then a seeded shuffle of the rest, ``limit`` in
    all (more only if ``keep`` alone is longer)."""
    keep = list(dict.fromkeys(keep))
    rest = [c for c in candidates if c not in keep]
    random.Random(seed).shuffle(rest)
    return keep + rest[: max(0, limit - len(keep))]
