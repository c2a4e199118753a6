"""Whether Triton runs kernels through its CPU interpreter, and the block sizes that differ there.

Triton decides at import time (``TRITON_INTERPRET=1`` must be set before triton is
imported); this module reads the variable once, at its own import, and every launcher
asks it instead of the environment. The interpreter's cost is per program and per
Python-level operation, so it wants few, large programs; a GPU wants many, small ones.
Each launcher's non-GEMM block sizes for both cases live in ``LaunchBlocks`` below.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

ACTIVE: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (read once, at import)."""
    return ACTIVE


@dataclass(frozen=True)
class LaunchBlocks:
    """Block sizes of the launches outside the grouped GEMM (whose tiles are ``tiles``')."""

    combine_t: int  # tokens per combine program
    combine_h: int  # hidden columns per combine program
    route_block_h: int | None  # router K step (None: sized from shared memory on a GPU)
    rank_block_t: int | None  # tokens per rank program (None: sized from E and top-k)
    one_hot_rows: int  # most filled rows the one-launch alignment ranks by one-hot sums
    crowded_rows: int  # least tokens whose slots a receive buffer's second tile set needs
    router_partials_h: int  # K step of the decode router's split GEMM
    plan_block_t: int  # tokens per expert-parallel plan program
    gather_rows: int  # rows per expert-parallel packing program
    gather_h: int  # hidden columns per packing program
    quantize_rows: int  # most rows per fp8 activation-quantisation program
    quantize_tile: int  # elements (rows x columns) such a program holds per step
    quantize_programs: int  # programs to spread the rows over, where rows allow


INTERPRETER_BLOCKS = LaunchBlocks(combine_t=16, combine_h=256, route_block_h=64, rank_block_t=64,
                                  one_hot_rows=16, crowded_rows=16, router_partials_h=64,
                                  plan_block_t=64, gather_rows=16, gather_h=64,
                                  quantize_rows=64, quantize_tile=8192, quantize_programs=1)
COMPILED_BLOCKS = LaunchBlocks(combine_t=4, combine_h=512, route_block_h=None, rank_block_t=None,
                               one_hot_rows=64, crowded_rows=64, router_partials_h=128,
                               plan_block_t=256, gather_rows=8, gather_h=512,
                               quantize_rows=16, quantize_tile=2048, quantize_programs=512)
BLOCKS: LaunchBlocks = INTERPRETER_BLOCKS if ACTIVE else COMPILED_BLOCKS


@functools.lru_cache(maxsize=None)
def busy_programs(device) -> int:
    """The fewest programs a grid striding over rows known only on the device gets (a
    receive buffer filled by peers with more tokens than expected): four per SM (CU) of
    ``device``, so that every SM has work; 1 under the interpreter, which runs programs
    one after the other."""
    if ACTIVE:
        return 1
    import torch
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count
