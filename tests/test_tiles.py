"""Tile lookup, and correctness of every tile configuration the shipped tables can select."""
import json
from dataclasses import replace

import pytest
import torch

import moe_ops  # noqa: F401
from moe_ops.fp8 import quantize_weight
from moe_ops.pipeline import descriptor_ok, fused_experts_impl
from moe_ops.reference import fused_experts_reference
from moe_ops.tile_table import TABLE_DIR
from moe_ops.tiles import TileConfig, get_tile_config, heuristic_tile

from conftest import ON_GPU
from helpers import assert_close_l2
from test_ops import expert_inputs

TABLES = {path.name: json.loads(path.read_text()) for path in sorted(TABLE_DIR.glob("*.json"))}


def table_tiles():
    """Distinct (stage, E, fp8 scheme or None, top_k-free tile) choices over all shipped tables."""
    seen = set()
    for table in TABLES.values():
        for entry in table["entries"]:
            scheme = entry["dtype"][4:] if entry["dtype"].startswith("fp8-") else None
            seen.add((entry["stage"], entry["E"], scheme, TileConfig(**entry["config"])))
    return sorted(seen, key=repr)


ALL_TILES = table_tiles()
# The interpreter ignores warps and stages and is slow: a sample of block shapes on CPU,
# float and fp8.
TILES = ALL_TILES if ON_GPU else [
    sorted({(s, e, f, TileConfig(t.BLOCK_M, t.BLOCK_N, t.BLOCK_K, t.GROUP_M, A_FP8=t.A_FP8))
            for s, e, f, t in ALL_TILES if e <= 8 and (f is None) == float_weights}, key=repr)[i]
    for float_weights, i in ((True, 0), (True, 1), (True, 2), (True, 3), (False, 0), (False, -1))]


def test_tables_are_well_formed():
    assert TABLES, "no tile table shipped"
    for name, table in TABLES.items():
        assert isinstance(table["gpu"], str) and table["entries"], name
        for entry in table["entries"]:
            assert entry["stage"] in ("gate_up", "down") and entry["T"] >= 1
            TileConfig(**entry["config"])


@pytest.mark.parametrize("stage,num_experts,scheme,tile", TILES, ids=repr)
def test_table_tile_is_correct(stage, num_experts, scheme, tile, device):
    """Each tile against the reference: float tables' in the table's dtype, fp8 tables'
    (scheme) on quantised experts against the emulation of the same quantisation."""
    top_k = 2 if num_experts <= 8 else 8
    hidden, inter = (512, 384) if ON_GPU else (64, 80)  # 80: a partial BLOCK_K/BLOCK_N
    if scheme:
        hidden, inter = (512, 384) if ON_GPU else (192, 160)  # partial 128-blocks
    dtype = torch.bfloat16 if ON_GPU or scheme else torch.float32
    x, weights, w_gate_up, w_down = expert_inputs(96, num_experts, top_k, hidden, inter, dtype, device)
    ids = torch.rand(96, num_experts, device=device).topk(top_k, dim=1).indices.to(torch.int32)
    scales = {}
    if scheme:
        (w_gate_up, gate_up_scale), (w_down, down_scale) = (quantize_weight(w, scheme)
                                                            for w in (w_gate_up, w_down))
        scales = dict(w_gate_up_scale=gate_up_scale, w_down_scale=down_scale)
    other = heuristic_tile("gate_up" if stage == "down" else "down", num_experts, hidden, inter,
                           96, top_k, x.dtype, fp8=scheme)
    tiles = {"gate_up_tile": tile, "down_tile": other} if stage == "gate_up" else \
        {"gate_up_tile": TileConfig(tile.BLOCK_M, other.BLOCK_N, other.BLOCK_K, A_FP8=other.A_FP8),
         "down_tile": tile}
    out = fused_experts_impl(x, weights, ids, w_gate_up, w_down, **tiles, **scales)
    a_fp8 = (tiles["gate_up_tile"].A_FP8, tiles["down_tile"].A_FP8)
    ref = fused_experts_reference(x, weights, ids, w_gate_up, w_down, **scales,
                                  fp8_activations=a_fp8)
    assert_close_l2(out, ref, 1e-2 if ON_GPU or scheme else 1e-4)


def test_lookup_takes_nearest_bucket_and_falls_back_to_heuristic():
    cpu = torch.device("cpu")
    tile = get_tile_config("gate_up", 8, 4096, 14336, 100, 2, torch.bfloat16, cpu)
    assert tile == heuristic_tile("gate_up", 8, 4096, 14336, 100, 2, torch.bfloat16)
    if ON_GPU:
        name = torch.cuda.get_device_name()
        for table in TABLES.values():
            if table["gpu"] == name:
                entry = next(e for e in table["entries"] if not e["dtype"].startswith("fp8"))
                found = get_tile_config(entry["stage"], entry["E"], entry["H"], entry["I"],
                                        entry["T"], 2, getattr(torch, entry["dtype"]),
                                        torch.device("cuda"))
                assert found == TileConfig(**entry["config"])


@pytest.mark.usefixtures("poison_allocations")
# inter 80: partial BLOCK_N (gate_up) and BLOCK_K (down); each BLOCK_M and each inter
# once with and once without A_DESC.
@pytest.mark.parametrize("block_m,inter,a_desc", [(16, 96, False), (16, 80, True),
                                                  (32, 96, True), (32, 80, False)])
def test_descriptor_tiles_are_correct(block_m, inter, a_desc, device):
    """B_DESC (weights through a tensor descriptor) for both stages, partial tiles included;
    with A_DESC down also reads h (in block order, padding rows included) through one."""
    num_experts, top_k, hidden = 8, 2, 64 if not ON_GPU else 512
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x, weights, w_gate_up, w_down = expert_inputs(53, num_experts, top_k, hidden, inter, dtype, device)
    ids = torch.rand(53, num_experts, device=device).topk(top_k, dim=1).indices.to(torch.int32)
    assert descriptor_ok(w_gate_up) and descriptor_ok(w_down)
    tile = TileConfig(block_m, 32, 32, 8 if block_m == 16 else 1, 4, 3, B_DESC=True)
    out = fused_experts_impl(x, weights, ids, w_gate_up, w_down, gate_up_tile=tile,
                             down_tile=replace(tile, A_DESC=a_desc))
    ref = fused_experts_reference(x, weights, ids, w_gate_up, w_down)
    assert_close_l2(out, ref, 1e-2 if ON_GPU else 1e-4)


def test_descriptor_tile_falls_back_to_pointers_for_unaligned_weights(device):
    """Weights a descriptor can not address (a 16-byte-misaligned row stride) still
    compute, and so does A_DESC where h's rows (inter * 4 bytes) are misaligned."""
    num_experts, top_k, hidden, inter = 4, 2, 36, 42  # 36*4 B rows: aligned; 42*4 B: not
    x, weights, w_gate_up, w_down = expert_inputs(19, num_experts, top_k, hidden, inter,
                                                  torch.float32, device)
    ids = torch.rand(19, num_experts, device=device).topk(top_k, dim=1).indices.to(torch.int32)
    assert descriptor_ok(w_gate_up) and not descriptor_ok(w_down)
    tile = TileConfig(16, 32, 32, 1, 4, 3, B_DESC=True, A_DESC=True)
    out = fused_experts_impl(x, weights, ids, w_gate_up, w_down, gate_up_tile=tile, down_tile=tile)
    assert_close_l2(out, fused_experts_reference(x, weights, ids, w_gate_up, w_down), 1e-4)
