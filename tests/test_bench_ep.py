"""The expert-parallel benchmark runs (two gloo ranks under torchrun, the interpreter) and
records what the serving issue asks of it: the serving-capacity rows, bytes moved per
forward beside the routed rows' bytes, and the outputs of every system agreeing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ON_GPU

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_bench_ep(out: Path, *args: str) -> list[dict]:
    """bench_ep on two gloo ranks (the interpreter), one iteration, uniform routing; the
    rows of the JSON it wrote under ``out``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "benchmarks.bench_ep", "--routing", "uniform", "--iters", "1", "--out", str(out),
         *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return json.loads(next(out.glob("ep_*.json")).read_text())["rows"]


@pytest.mark.skipif(ON_GPU, reason="the CPU (gloo) run; GPUs run tools/gpu_session.sh ep")
def test_bench_ep_records_serving_rows_and_bytes(tmp_path):
    rows = run_bench_ep(tmp_path, "--models", "mixtral-8x7b", "--tokens", "3", "--capacity", "16")
    by_system = {row["system"]: row for row in rows}
    serving, fixed = by_system["ep_all_to_all_serving"], by_system["ep_all_to_all"]
    assert serving["max_rel_err"] <= 1e-4
    # Capacity 16 moves 16 (+ header) rows per peer each way, T=3 moves 3 (+ header); the
    # routed rows (at most 3 tokens to the other rank) are the least of the three.
    assert serving["wire_bytes"] > fixed["wire_bytes"] >= fixed["routed_bytes"] > 0
    assert "| MB moved |" in next(tmp_path.glob("ep_*.md")).read_text()


@pytest.mark.skipif(ON_GPU, reason="the CPU (gloo) run; GPUs run tools/gpu_session.sh ep")
def test_bench_ep_uneven_batches(tmp_path):
    """``--rank0-tokens``: rank 0 brings 1 token, rank 1 brings 40; every system agrees
    (with capacity-sized buffers rank 0's receiver, expecting 1 token, takes its second
    tile set: more slots arrive than those of the interpreter's 16-token switch point)."""
    rows = run_bench_ep(tmp_path, "--models", "qwen3-30b-a3b", "--tokens", "40",
                        "--rank0-tokens", "1", "--capacity", "40")
    assert next(tmp_path.glob("ep_*_rank0-1.json"))
    assert rows and all(row["rank0_tokens"] == 1 for row in rows)
    assert max(row["max_rel_err"] for row in rows) <= 1e-4
