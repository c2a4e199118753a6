"""The tuner runs end to end and writes a table the tile lookup can read."""
import json
import subprocess
import sys
from pathlib import Path

from moe_ops.tiles import TileConfig
from tools.tune import LARGE_T_SEEDS, block_m_choices, candidate_tiles, sample, seeds

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_tune_writes_a_readable_table_and_logs_every_variant(tmp_path):
    out = tmp_path / "table.json"
    cmd = [sys.executable, "-m", "tools.tune", "--models", "qwen3-30b-a3b", "--tokens", "3",
           "--max-configs", "2", "--max-down-configs", "2", "--warmup-ms", "1", "--rep-ms", "5",
           "--budget-s", "300", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
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


def test_seeds_are_legal_and_always_sampled():
    """At large T the seeded shapes are in every sample; at decode sizes none is legal."""
    num_tokens, top_k, num_experts = 8192, 8, 256
    block_ms = block_m_choices(num_tokens, top_k, num_experts)
    gate_up = seeds("gate_up", num_tokens, top_k, num_experts, block_ms)
    down = seeds("down", num_tokens, top_k, num_experts, [64])
    assert len(gate_up) == len(LARGE_T_SEEDS["gate_up"])
    assert down and all(t.BLOCK_M == 64 for t in down)
    assert seeds("gate_up", 1, top_k, num_experts, block_m_choices(1, top_k, num_experts)) == []
    space = candidate_tiles("gate_up", num_tokens, top_k, num_experts, 2, block_ms)
    drawn = sample(space, [space[0]] + gate_up + [space[0]], 12, seed=0)
    assert drawn[: 1 + len(gate_up)] == [space[0]] + gate_up
    assert len(drawn) == 12 and len(set(drawn)) == 12


def test_check_heuristic_times_both_tile_choices(tmp_path):
    out = tmp_path / "table.json"
    cmd = [sys.executable, "-m", "tools.tune", "--check-heuristic", "--models", "qwen3-30b-a3b",
           "--tokens", "2", "--warmup-ms", "1", "--rep-ms", "5", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.with_name("table.heuristic.jsonl").open()]
    assert record["T"] == 2 and record["ms"]["heuristic"] > 0 and record["ms"]["table"] > 0
    for kind in ("heuristic", "table"):
        assert [TileConfig(**t) for t in record[kind]]
