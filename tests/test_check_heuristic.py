"""tools/check_heuristic.py times the heuristic tiles and the table's in each cell."""
import json

from moe_ops.tiles import TileConfig
from tools.check_heuristic import main


def test_check_heuristic_times_both_tile_choices(tmp_path):
    out = tmp_path / "table.json"
    main(["--models", "mixtral-8x7b", "--tokens", "2", "--warmup-ms", "1", "--rep-ms", "5",
          "--out", str(out)])
    (record,) = [json.loads(line) for line in out.with_name("table.heuristic.jsonl").open()]
    assert record["T"] == 2 and record["ms"]["heuristic"] > 0 and record["ms"]["table"] > 0
    for kind in ("heuristic", "table"):
        assert [TileConfig(**t) for t in record[kind]]
