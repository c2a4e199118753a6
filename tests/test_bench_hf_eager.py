"""benchmarks/bench_hf_eager.py end to end on the smallest model it knows (CPU: tiny,
interpreter): every system gets a row, the patched model's logits match hf_eager's."""
import json

import pytest

from conftest import ON_GPU


@pytest.mark.skipif(ON_GPU, reason="a smoke test of the CPU path; the GPU run is the benchmark")
def test_every_system_has_a_row_and_the_patch_agrees(tmp_path):
    from benchmarks.bench_hf_eager import SYSTEMS, main

    path = main(["--models", "mixtral-8x7b", "--tokens", "3", "--host-calls", "1",
                 "--out", str(tmp_path)])
    result = json.loads(path.read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == set(SYSTEMS)
    assert all(r["T"] == 3 and r["ms"] > 0 for r in rows.values()), rows
    assert rows["tritonmoe_patch"]["rel_l2_vs_hf_eager"] < 1e-4
    assert result["host"]["us_per_call"] > 0
    assert {"device", "date", "torch", "triton", "transformers", "command"} <= result["stamp"].keys()
    assert "not performance" in path.with_suffix(".md").read_text()
