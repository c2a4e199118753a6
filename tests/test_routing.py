"""The decode path of moe_ops.routing (T <= DECODE_MAX_T): split router GEMM, then
selection, ranks and alignment in one program. Checked on its intermediates."""
import pytest
import torch

from moe_ops.configs import CONFIGS, get_config, shrink
from moe_ops.routing import DECODE_MAX_T, Routing, align_ids, route
from moe_ops.reference import route_reference

from conftest import ON_GPU

pytestmark = pytest.mark.usefixtures("poison_allocations")


def check_alignment(topk_ids, alignment, block_m, num_experts):
    """Every slot with an id in [0, E) once, in a block of its own expert; nothing else
    but the sentinel in the blocks in use; -1 past them."""
    sorted_slots, block_expert, num_blocks, max_blocks = alignment
    num_slots = topk_ids.numel()
    used = int(num_blocks.item())
    assert 0 < used <= max_blocks
    rows = sorted_slots[: used * block_m].view(used, block_m).cpu()
    experts = block_expert[:used].cpu()
    flat_ids = topk_ids.flatten().cpu()
    real = rows < num_slots
    valid = ((flat_ids >= 0) & (flat_ids < num_experts)).nonzero().flatten().tolist()
    assert sorted(rows[real].tolist()) == valid
    for b in range(used):
        assert (flat_ids[rows[b][real[b]].long()] == experts[b]).all()
        assert real[b].any(), "an empty block was scheduled"
    assert (rows[~real] == num_slots).all()
    assert (block_expert[used:max_blocks] == -1).all()


@pytest.mark.parametrize("num_tokens", [1, 5, DECODE_MAX_T])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_routing_matches_reference(name, num_tokens, device):
    # CPU: hidden 200, several H splits, the last one partial; GPU: the real router.
    config = get_config(name) if ON_GPU else shrink(name, hidden_size=200)
    router = torch.randn(config.num_experts, config.hidden_size, device=device)
    router *= 2 * config.hidden_size ** -0.5
    bias = torch.randn(config.num_experts, device=device) * 0.1 if config.score_bias else None
    x = torch.randn(num_tokens, config.hidden_size, device=device)
    block_m = 16
    weights, ids, alignment = route(x, router, Routing(**config.routing_kwargs()), bias, block_m)
    ref_weights, ref_ids = route_reference(x, router, score_bias=bias, **config.routing_kwargs())
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    check_alignment(ids, alignment, block_m, config.num_experts)


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (256, 8)])
def test_decode_alignment_of_given_ids_drops_the_out_of_range_ones(num_experts, top_k, block_m,
                                                                   device):
    ids = torch.randint(0, num_experts, (DECODE_MAX_T, top_k), dtype=torch.int32, device=device)
    ids[3, 0], ids[7, top_k - 1], ids[11, 1] = num_experts, -1, 2**30
    check_alignment(ids, align_ids(ids, num_experts, block_m), block_m, num_experts)


@pytest.mark.parametrize("counted", [True, False])  # the filled rows known on the device
@pytest.mark.parametrize("expected", [1, 24])  # one launch ranks and aligns; rank, then align
@pytest.mark.parametrize("fill", [3, 150])
def test_switched_alignment_picks_its_block_size_by_the_slots_routed(fill, expected, counted,
                                                                     device):
    """A receive buffer aligned two ways (``align_ids_switched``): up to the switch point
    (slots routed in its filled rows) in blocks of 16 and the big blocks' word says 0,
    past it in blocks of 64 and the small blocks' word says 0. Counted: rows past the
    fill hold ids that must not be read; else they hold none."""
    from moe_ops.routing import BlockSwitch, align_ids_switched

    num_experts, top_k, rows, switch_slots = 16, 4, 200, 100
    ids = torch.stack([torch.randperm(num_experts, device=device)[:top_k]
                       for _ in range(rows)]).int()
    ids[::5, 1] = -1
    visible = ids.clone()
    visible[fill:] = -1
    num_rows = torch.tensor([fill], dtype=torch.int32, device=device) if counted else None
    small, big = align_ids_switched(ids if counted else visible, num_experts, 16, expected,
                                    num_rows, BlockSwitch(64, switch_slots))
    routed = int((visible >= 0).sum())
    chosen, idle, block_m = (big, small, 64) if routed > switch_slots else (small, big, 16)
    assert int(idle.num_blocks.item()) == 0
    check_alignment(visible, chosen, block_m, num_experts)
