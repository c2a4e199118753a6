"""fused_moe's decode routing (T <= DECODE_MAX_T): split router GEMM, then selection and
alignment in one program. Checked on its intermediates: ids, weights and the alignment."""
import pytest
import torch

from moe_ops.configs import CONFIGS, shrink
from moe_ops.pipeline import DECODE_MAX_T, _route_align_decode
from moe_ops.reference import route_reference

from test_ops import make_layer

pytestmark = pytest.mark.usefixtures("poison_allocations")


def check_alignment(topk_ids, align_out, block_m):
    """Every slot once, in a block of its own expert; padding rows hold the sentinel."""
    sorted_slots, block_expert, num_blocks, max_blocks = align_out
    num_slots = topk_ids.numel()
    used = int(num_blocks.item())
    assert 0 < used <= max_blocks
    rows = sorted_slots[: used * block_m].view(used, block_m).cpu()
    experts = block_expert[:used].cpu()
    flat_ids = topk_ids.flatten().cpu()
    real = rows < num_slots
    assert sorted(rows[real].tolist()) == list(range(num_slots))
    for b in range(used):
        assert (flat_ids[rows[b][real[b]].long()] == experts[b]).all()
        assert real[b].any(), "an empty block was scheduled"
    assert (rows[~real] == num_slots).all()
    assert (block_expert[used:max_blocks] == -1).all()


@pytest.mark.parametrize("num_tokens", [1, 5, DECODE_MAX_T])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_routing_matches_reference(name, num_tokens, device):
    # hidden 200: several H splits, the last one partial.
    config = shrink(name, hidden_size=200)
    router, _, _, bias = make_layer(config, torch.float32, device)
    x = torch.randn(num_tokens, config.hidden_size, device=device)
    block_m = 16
    weights, ids, align_out = _route_align_decode(
        x, router, config.top_k, config.scoring, config.renormalize, config.n_group,
        config.topk_group, bias, config.routed_scaling_factor, block_m)
    ref_weights, ref_ids = route_reference(x, router, score_bias=bias, **config.routing_kwargs())
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    check_alignment(ids, align_out, block_m)
