"""tools/tile_space.py: the tuner's pruned candidates and its always-timed seeds."""
from tools.tile_space import LARGE_T_SEEDS, block_m_choices, candidate_tiles, sample, seeds


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
