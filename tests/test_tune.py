"""The tuner runs end to end and writes a table the tile lookup can read."""
import json

from moe_ops.tiles import TileConfig
from tools.tune import main


def test_tune_writes_a_readable_table_and_logs_every_variant(tmp_path):
    out = tmp_path / "table.json"
    main(["--models", "mixtral-8x7b", "--tokens", "3", "--max-configs", "2",
          "--max-down-configs", "2", "--warmup-ms", "1", "--rep-ms", "5", "--budget-s", "300",
          "--out", str(out)])
    table = json.loads(out.read_text())
    assert {entry["stage"] for entry in table["entries"]} == {"gate_up", "down"}
    for entry in table["entries"]:
        assert entry["T"] == 3
        TileConfig(**entry["config"])
    (record,) = [json.loads(line) for line in out.with_name("table.tunelog.jsonl").open()]
    assert record["complete"]
    variants = {c["variant"] for c in record["candidates"] if c["stage"] == "variant"}
    # A variant is timed unless the winner already had it, so the table's tile has it.
    chosen = {entry["stage"]: entry["config"] for entry in table["entries"]}
    for label, field, stage in [("gate_up B_DESC", "B_DESC", "gate_up"),
                                ("down B_DESC", "B_DESC", "down"),
                                ("down A_DESC", "A_DESC", "down")]:
        assert label in variants or chosen[stage][field], (label, variants)
    if 1 in (chosen["gate_up"]["GROUP_M"], chosen["down"]["GROUP_M"]):
        assert {"Zipf, as chosen", "Zipf, GROUP_M=8"} <= variants
    assert all(c["status"] == "ok" for c in record["candidates"]), record["candidates"]
