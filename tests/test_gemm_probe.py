"""tools/gemm_probe.py: per-stage MoE, dense and cuBLAS times of one cell (GPU only)."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ON_GPU

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(ON_GPU, reason="checks the message a machine without CUDA gets")
def test_probe_without_a_gpu_says_it_needs_one():
    done = subprocess.run([sys.executable, "-m", "tools.gemm_probe", "--tokens", "4"],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode != 0 and "needs CUDA" in done.stderr


@pytest.mark.skipif(not ON_GPU, reason="times GPU kernels")
def test_probe_reports_both_stages_of_every_variant():
    from tools.gemm_probe import VARIANTS, probe
    import torch

    rows = probe("qwen3-30b-a3b", 256, list(VARIANTS), 2, torch.bfloat16, torch.device("cuda"))
    assert all("error" not in r for r in rows), rows
    assert {(r["variant"], r["stage"]) for r in rows} == {
        (v, s) for v in VARIANTS for s in ("gate_up", "down")}
    for r in rows:
        assert r["rows"] == 256 * 8
        assert min(r["moe_us"], r["dense_us"], r["cublas_us"], r["floor_us"]) > 0
