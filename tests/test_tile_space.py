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


def test_fp8_small_t_adds_wgmma_rows_with_fp8_activations_only():
    """fp8 weights at decode sizes: 64-row tiles join the space (Hopper runs fp8 dots as
    e4m3 wgmma only from 64 rows), only with fp8 activations, and are always timed."""
    from tools.tile_space import WGMMA_ROWS

    top_k, num_experts = 8, 256
    assert WGMMA_ROWS not in block_m_choices(1, top_k, num_experts)
    block_ms = block_m_choices(1, top_k, num_experts, "channel")
    assert WGMMA_ROWS in block_ms
    space = candidate_tiles("gate_up", 1, top_k, num_experts, 2, block_ms, "channel")
    wide = [t for t in space if t.BLOCK_M == WGMMA_ROWS]
    assert wide and all(t.A_FP8 for t in wide)
    assert any(not t.A_FP8 for t in space if t.BLOCK_M == 16)
    fp8_seeds = seeds("gate_up", 1, top_k, num_experts, block_ms, fp8=True)
    assert fp8_seeds and all(t.BLOCK_M == WGMMA_ROWS and t.A_FP8 for t in fp8_seeds)
    assert set(fp8_seeds) <= set(space)
    # Where the tokens fill 64-row blocks anyway, nothing is added or restricted.
    large = (8192, top_k, num_experts)
    assert block_m_choices(*large, "channel") == block_m_choices(*large)
