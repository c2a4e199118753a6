"""The roofline's byte/flop model, checked against numbers worked out by hand."""
import pytest
import torch

from moe_ops.configs import CONFIGS, MoEConfig
from tools.ceilings import Ceilings
from tools.roofline import (distinct_experts, expected_distinct_experts, floor, fusion_savings,
                            layer_traffic, stage_traffic)

# E=4, K=2, H=4, I=3, 2-byte elements: small enough to count every byte by hand.
TINY = MoEConfig("tiny", hidden_size=4, intermediate_size=3, num_experts=4, top_k=2)


def test_expected_distinct_experts():
    assert expected_distinct_experts(4, 2, 2) == pytest.approx(3.0)  # 4 * (1 - 0.5^2)
    assert expected_distinct_experts(256, 8, 1) == pytest.approx(8.0)  # one token: K experts
    assert expected_distinct_experts(8, 2, 0) == 0.0
    assert expected_distinct_experts(8, 2, 10_000) == pytest.approx(8.0)


def test_distinct_experts_from_ids():
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]], dtype=torch.int32)
    assert distinct_experts(ids) == 3
    assert distinct_experts(torch.tensor([[5, 6]] * 4)) == 2


def test_layer_traffic_by_hand():
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)  # T=2, 3 experts hit
    t = layer_traffic(TINY, 2, distinct_experts(ids))
    assert t.weight_bytes == 3 * 3 * 4 * 3 * 2 == 216      # D * 3*H*I * b
    assert t.activation_bytes == 2 * 2 * 4 * 2 == 32       # x read + out written
    assert t.bytes == 248
    assert t.flops == 2 * 2 * 2 * 3 * 4 * 3 == 288         # 2 * T*K * 3*H*I
    with_router = layer_traffic(TINY, 2, 3, include_router=True)
    assert with_router.bytes == 248 + 4 * 4 * 2             # + E*H*b
    assert with_router.flops == 288 + 2 * 2 * 4 * 4         # + 2*T*H*E
    assert layer_traffic(TINY, 2, 3, bytes_per_elem=4).bytes == 2 * 248


def test_floor_takes_the_larger_bound():
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    compute_bound = floor(TINY, 2, Ceilings("toy", bandwidth=248.0, matmul_rate=144.0, dtype="bf16"),
                          topk_ids=ids)
    assert compute_bound.memory_s == pytest.approx(1.0)
    assert compute_bound.compute_s == pytest.approx(2.0)
    assert compute_bound.floor_s == pytest.approx(2.0) and compute_bound.bound == "compute"
    memory_bound = floor(TINY, 2, Ceilings("toy", 124.0, 288.0, "bf16"), distinct=3)
    assert memory_bound.floor_s == pytest.approx(2.0) and memory_bound.bound == "memory"


def test_stage_traffic_fused_vs_unfused_by_hand():
    # R = T*K = 4 slots, D = 3 experts, b = 2.
    fused = {s.stage: s for s in stage_traffic(TINY, 2, 3)}
    unfused = {s.stage: s for s in stage_traffic(TINY, 2, 3, fused_gate_up=False)}
    assert fused["gate_up"].bytes_read == 4 * 4 * 2 + 3 * 2 * 3 * 4 * 2 == 176
    assert fused["gate_up"].bytes_written == 4 * 3 * 2 == 24
    assert unfused["gate"].bytes == unfused["up"].bytes == 32 + 72 + 24
    assert unfused["silu_mul"].bytes == 2 * 24 + 24
    assert fused["down"].bytes == 24 + 3 * 4 * 3 * 2 + 16 + 4 * 4 * 2
    assert set(fused) == {"route", "align", "gate_up", "down", "combine"}
    assert sum(s.launches for s in fused.values()) == 5
    saved = fusion_savings(TINY, 2, 3)
    assert saved["bytes_saved"] == 4 * 4 * 2 + 4 * 4 * 3 * 2 == 128  # R*H*b + 4*R*I*b
    assert saved["gate_up_bytes_unfused"] == 328 and saved["gate_up_bytes_fused"] == 200
    assert saved["launches_saved"] == 2


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_real_configs_weight_bytes_at_full_routing(name):
    cfg = CONFIGS[name]
    t = layer_traffic(cfg, 100_000)  # every expert hit
    assert t.distinct_experts == pytest.approx(cfg.num_experts)
    expected = cfg.num_experts * 3 * cfg.hidden_size * cfg.intermediate_size * 2
    assert t.weight_bytes == pytest.approx(expected)


def test_deepseek_v3_weights_are_22_5_gb():
    t = layer_traffic("deepseek-v3", 100_000)
    assert t.weight_bytes == pytest.approx(256 * 3 * 7168 * 2048 * 2)
    assert 22.5e9 < t.weight_bytes < 22.6e9
