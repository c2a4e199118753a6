"""The main job runs end to end and writes its stamped table, JSON and plot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ON_GPU

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"gpu", "model", "T", "routing", "system", "ms", "pct_floor", "floor_ms", "launches"}


def test_bench_writes_rows_for_every_system(tmp_path):
    timed = ["fused_experts", "fused_moe", "grouped_mm", "reference"]
    cmd = [sys.executable, "-m", "benchmarks.bench_moe", "--models", "mixtral-8x7b",
           "--tokens", "3", "--systems", *timed, "megablocks", "vllm", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("moe_*_uniform.json")
    rows = {row["system"]: row for row in json.loads(json_path.read_text())}
    assert set(rows) == {*timed, "megablocks", "vllm"}
    for name, row in rows.items():
        assert REQUIRED <= row.keys()
        assert row["T"] == 3 and row["floor_ms"] > 0
        if name not in timed and row["ms"] is None:  # another project, not installed here
            assert f"skipping {name}: " in done.stdout and row["note"]
            continue
        assert row["ms"] > 0
        assert row["pct_floor"] == pytest.approx(row["floor_ms"] / row["ms"] * 100)
    assert json_path.with_suffix(".md").read_text().startswith("# MoE forward benchmark")
    assert json_path.with_suffix(".png").stat().st_size > 0


def test_cpu_results_stay_out_of_the_tracked_gpu_results():
    """On CPU the default output folder is not benchmarks/results/ and git ignores it."""
    from benchmarks.bench_moe import parse_args

    out = Path(parse_args([]).out)
    if ON_GPU:
        assert out == REPO_ROOT / "benchmarks" / "results"
        return
    assert REPO_ROOT / "benchmarks" / "results" not in [out, *out.parents]
    probe = out.relative_to(REPO_ROOT) / "moe_cpu-interpreter_uniform.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=REPO_ROOT)
    assert ignored.returncode == 0, f"{probe} is not ignored by git"
