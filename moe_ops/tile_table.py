"""The tuned tile tables on disk: one JSON file per GPU in ``moe_ops/tile_tables/``.

Written by ``tools/tune.py``, read by ``moe_ops.tiles``; this module is the only one that
knows the format::

    {"gpu": "NVIDIA H200", "entries": [
        {"stage": "gate_up", "E": 8, "H": 4096, "I": 14336, "dtype": "bfloat16",
         "T": 32, "config": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1,
                             "num_warps": 4, "num_stages": 4, "B_DESC": true,
                             "A_DESC": false}}, ...]}

``config`` holds the fields of ``moe_ops.tiles.TileConfig``. An entry is keyed by
(stage, E, H, I, dtype, T).
"""
from __future__ import annotations

import json
from pathlib import Path

TABLE_DIR = Path(__file__).parent / "tile_tables"


def entry_key(entry: dict) -> tuple:
    """(stage, E, H, I, dtype, T) of one entry."""
    return (entry["stage"], entry["E"], entry["H"], entry["I"], entry["dtype"], entry["T"])


def make_entry(stage: str, num_experts: int, hidden: int, inter: int, dtype_name: str,
               num_tokens: int, config: dict) -> dict:
    """One table entry: the tile ``config`` (a ``TileConfig.as_dict()``) of one cell."""
    return {"stage": stage, "E": num_experts, "H": hidden, "I": inter, "dtype": dtype_name,
            "T": num_tokens, "config": config}


def read_entries(path: Path, gpu: str) -> dict:
    """The entries of ``path`` keyed by ``entry_key`` ({} if there is no file); ValueError
    if the file is another GPU's table."""
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    if table.get("gpu") != gpu:
        raise ValueError(f"{path} holds a table for {table.get('gpu')!r}, not {gpu!r}")
    return {entry_key(e): e for e in table["entries"]}


def write_entries(path: Path, gpu: str, entries: dict) -> None:
    """Write ``entries`` (keyed as ``read_entries`` returns them) as ``gpu``'s table,
    sorted for stable diffs, replacing the file atomically."""
    ordered = [entries[k] for k in sorted(entries, key=lambda k: (k[1:], k[0]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpu": gpu, "entries": ordered}, indent=1) + "\n")
    tmp.replace(path)


def gpu_entries(gpu: str) -> list[dict]:
    """Every entry of every table in ``TABLE_DIR`` whose ``gpu`` is this one."""
    found = []
    for path in sorted(TABLE_DIR.glob("*.json")):
        table = json.loads(path.read_text())
        if table.get("gpu") == gpu:
            found.extend(table["entries"])
    return found
