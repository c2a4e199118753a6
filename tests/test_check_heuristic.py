"""tools/check_heuristic.py times the heuristic tiles and the table's in each cell."""
import json
import subprocess
import sys
from pathlib import Path

from moe_ops.tiles import TileConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_check_heuristic_times_both_tile_choices(tmp_path):
    out = tmp_path / "table.json"
    cmd = [sys.executable, "-m", "tools.check_heuristic", "--models", "qwen3-30b-a3b",
           "--tokens", "2", "--warmup-ms", "1", "--rep-ms", "5", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.with_name("table.heuristic.jsonl").open()]
    assert record["T"] == 2 and record["ms"]["heuristic"] > 0 and record["ms"]["table"] > 0
    for kind in ("heuristic", "table"):
        assert [TileConfig(**t) for t in record[kind]]
