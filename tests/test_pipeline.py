"""The pipeline on a GPU: five launches, CUDA-graph capture and replay, no host sync."""
import dataclasses

import pytest
import torch

import moe_ops  # noqa: F401
from moe_ops.configs import get_config, shrink
from moe_ops.routing import DECODE_MAX_T, max_blocks_for

from conftest import ON_GPU
from helpers import assert_close_l2, capture
from test_ops import make_layer

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (compiled kernels)")


def config_for_device():
    return get_config("qwen3-30b-a3b") if ON_GPU else shrink("qwen3-30b-a3b")


def call(layer, x, config):
    return torch.ops.tritonmoe.fused_moe(x, *layer[:3], score_bias=layer[3],
                                         **config.routing_kwargs())


@pytest.mark.parametrize("num_slots,num_experts,block_m", [(1, 256, 16), (16, 8, 16), (100, 8, 64)])
def test_max_blocks_covers_the_worst_routing(num_slots, num_experts, block_m):
    # Worst case: as many experts as possible with one row each, the rest on one expert.
    busy = min(num_experts, num_slots)
    counts = [1] * (busy - 1) + [num_slots - (busy - 1)]
    needed = sum(-(-c // block_m) for c in counts)
    assert max_blocks_for(num_slots, num_experts, block_m) >= needed


@gpu_only
@pytest.mark.parametrize("op", ["fused_moe", "fused_experts"])
@pytest.mark.parametrize("num_tokens", [1, 64, 1000])
def test_kernel_launches_per_forward(op, num_tokens, device):
    config = config_for_device()
    layer = make_layer(config, torch.bfloat16, device)
    x = torch.randn(num_tokens, config.hidden_size, device=device, dtype=torch.bfloat16)
    if op == "fused_moe":
        forward = lambda: call(layer, x, config)  # noqa: E731
    else:
        weights, ids = torch.ops.tritonmoe.route(x, layer[0], score_bias=layer[3],
                                                 **config.routing_kwargs())
        forward = lambda: torch.ops.tritonmoe.fused_experts(x, weights, ids, *layer[1:3])  # noqa: E731
    moe_ops.set_topk_ids_check(False)  # its host-side range check is not part of the op's launches
    try:
        forward()  # compile outside the count
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
    finally:
        moe_ops.set_topk_ids_check(True)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # fused_experts at decode ranks inside its align launch: four.
    expected = 4 if op == "fused_experts" and num_tokens <= DECODE_MAX_T else 5
    assert len(kernels) == expected, [e.name for e in kernels]


@gpu_only
@pytest.mark.parametrize("num_tokens", [3, 48])  # the decode path and the token-block path
def test_cuda_graph_replay_matches_eager(num_tokens, device):
    config = shrink("deepseek-v3", 512, 256)
    layer = make_layer(config, torch.bfloat16, device)
    static_x = torch.randn(num_tokens, config.hidden_size, device=device, dtype=torch.bfloat16)
    eager = call(layer, static_x, config)
    graph, static_out = capture(lambda: call(layer, static_x, config))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager)
    # New data through the same graph: routing changes, the captured buffers adapt.
    fresh = torch.randn_like(static_x)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_l2(static_out, call(layer, fresh, config), 0.0)


@gpu_only
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("num_tokens", [3, 48])  # the decode path and the token-block path
@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3"])  # softmax; sigmoid, grouped
def test_cuda_graph_replay_of_a_non_finite_token(name, num_tokens, bad, device):
    """A replayed graph gives a non-finite token a non-finite row, the rest bit-for-bit."""
    config = shrink(name, 512, 256)
    layer = make_layer(config, torch.bfloat16, device)
    static_x = torch.randn(num_tokens, config.hidden_size, device=device, dtype=torch.bfloat16)
    clean = call(layer, static_x, config)
    graph, static_out = capture(lambda: call(layer, static_x, config))
    poisoned = static_x.clone()
    poisoned[2, 3] = bad
    static_x.copy_(poisoned)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.isfinite(static_out[2]).any()
    others = torch.arange(num_tokens, device=device) != 2
    assert torch.equal(static_out[others], clean[others])
    torch.testing.assert_close(static_out, call(layer, poisoned, config), rtol=0, atol=0,
                               equal_nan=True)


@gpu_only
@pytest.mark.parametrize("num_tokens", [1, 77])
def test_no_host_synchronisation(num_tokens, device):
    config = config_for_device()
    layer = make_layer(config, torch.bfloat16, device)
    x = torch.randn(num_tokens, config.hidden_size, device=device, dtype=torch.bfloat16)
    call(layer, x, config)
    torch.cuda.set_sync_debug_mode("error")
    try:
        call(layer, x, config)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu_only
@pytest.mark.parametrize("num_tokens", [5, 513])
def test_two_runs_are_bitwise_equal(num_tokens, device):
    config = config_for_device()
    layer = make_layer(config, torch.bfloat16, device)
    x = torch.randn(num_tokens, config.hidden_size, device=device, dtype=torch.bfloat16)
    assert torch.equal(call(layer, x, config), call(layer, x, config))


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("routed_tokens", [1, 40])  # within the grid; more than it covers
def test_sparse_receive_buffer(routed_tokens, device):
    """An expert-parallel receive buffer: W blocks of C rows, the first few of each
    routed. With tiles and GEMM grids sized for 1 token (programs stride over the blocks
    in use beyond the grid) and unrouted rows skipped, the routed rows equal the
    reference on them alone and the other rows stay unwritten (poisoned)."""
    from moe_ops.pipeline import fused_experts_impl
    from moe_ops.reference import fused_experts_reference

    config = config_for_device()
    W, C = 2, (512 if ON_GPU else 48)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    _, w_gate_up, w_down, _ = make_layer(config, dtype, device)
    E, K, H = config.num_experts, config.top_k, config.hidden_size
    x = torch.randn(W, C, H, device=device, dtype=dtype)
    weights = torch.rand(W, C, K, device=device)
    ids = torch.full((W, C, K), -1, dtype=torch.int32, device=device)
    ids[:, :routed_tokens] = torch.stack([torch.randperm(E, device=device)[:K]
                                          for _ in range(W * routed_tokens)]).view(
                                              W, routed_tokens, K).int()
    ids[:, :routed_tokens, 1::2] = -1  # partly routed rows, as a rank receives them
    out = fused_experts_impl(x.view(W * C, H), weights.view(W * C, K), ids.view(W * C, K),
                             w_gate_up, w_down, tile_tokens=1, skip_unrouted=True).view(W, C, H)
    real = [t[:, :routed_tokens].reshape(W * routed_tokens, -1) for t in (x, weights, ids)]
    expected = fused_experts_reference(*real, w_gate_up, w_down)
    assert_close_l2(out[:, :routed_tokens].reshape(-1, H), expected, 1e-2 if ON_GPU else 1e-5)
    assert bool(out[:, routed_tokens:].isnan().all())


def _routed_rows(config, rows: int, device):
    """(x, weights, ids, w_gate_up, w_down): ``rows`` rows each routed to K distinct
    experts of a random layer (bf16 on the GPU, float32 under the interpreter)."""
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    _, w_gate_up, w_down, _ = make_layer(config, dtype, device)
    E, K, H = config.num_experts, config.top_k, config.hidden_size
    x = torch.randn(rows, H, device=device, dtype=dtype)
    weights = torch.rand(rows, K, device=device)
    ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(rows)]).int()
    return x, weights, ids, w_gate_up, w_down


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("filled", [0, 1, 37, "most"])
@pytest.mark.parametrize("expected", [1, 24])  # one launch aligns; rank, then align
def test_receive_buffer_read_up_to_its_filled_rows(filled, expected, device):
    """``num_rows`` (on the device): the rows a receive buffer has filled. Only those are
    read: the rows after them hold routed ids here, yet stay unwritten (poisoned), and
    the filled rows equal the reference on them alone, with grids sized for ``expected``
    tokens (programs stride over the rest; up to DECODE_MAX_T expected, one program
    ranks and aligns every filled row, however many: "most", past the rows it ranks by
    one-hot sums, it ranks by counting)."""
    from moe_ops.interpreter import BLOCKS
    from moe_ops.pipeline import fused_experts_impl
    from moe_ops.reference import fused_experts_reference

    rows = 256 if ON_GPU else 64
    if filled == "most":
        filled = rows - 3
        assert filled > BLOCKS.one_hot_rows
    x, weights, ids, w_gate_up, w_down = _routed_rows(config_for_device(), rows, device)
    out = fused_experts_impl(x, weights, ids, w_gate_up, w_down, tile_tokens=expected,
                             skip_unrouted=True,
                             num_rows=torch.tensor([filled], dtype=torch.int32, device=device))
    if filled:
        expected = fused_experts_reference(x[:filled], weights[:filled], ids[:filled],
                                           w_gate_up, w_down)
        assert_close_l2(out[:filled], expected, 1e-2 if ON_GPU else 1e-5)
    assert bool(out[filled:].isnan().all())
    with pytest.raises(ValueError, match="skip_unrouted"):
        fused_experts_impl(x, weights, ids, w_gate_up, w_down, num_rows=torch.tensor(
            [filled], dtype=torch.int32, device=device))


def _landing_case(device, sources: int):
    """A receive buffer whose rows came from ``sources`` ranks (each row's source drawn at
    random), its layer and the reference on its rows."""
    from moe_ops.pipeline import Landing
    from moe_ops.reference import fused_experts_reference

    # Small on the GPU too: every gate_up program must be resident at once, so that the
    # stream landing the rows finds an SM while they wait.
    rows = 32
    x, weights, ids, w_gate_up, w_down = _routed_rows(
        dataclasses.replace(shrink("qwen3-30b-a3b"), num_experts=16, top_k=4), rows, device)
    landing = Landing(row_source=torch.randint(0, sources, (rows,), dtype=torch.int32,
                                               device=device),
                      flags=torch.zeros(sources, dtype=torch.int64, device=device),
                      epoch=torch.tensor([5], dtype=torch.int64, device=device),
                      late=torch.tensor([4], dtype=torch.int64, device=device),
                      stop=torch.zeros(1, dtype=torch.int64, device=device),
                      timeout_ticks=10**10, hip=torch.version.hip is not None)
    expected = fused_experts_reference(x, weights, ids, w_gate_up, w_down)
    return x, weights, ids, w_gate_up, w_down, landing, expected


@pytest.mark.parametrize("flag", ["landed", "failed", "later", "stopped"])
def test_gate_up_on_landed_rows(flag, device):
    """gate_up over rows that land from three sources (``Landing``): once every flag holds
    the epoch the result is the reference's and no tile gives up (``late`` untouched); a
    source's flag that failed (negative) or is from a later exchange, or a flag not raised
    yet in an exchange already failed (``stop``), makes the tiles that need it give up at
    once, which ``late`` records (the epoch), never a hang."""
    from moe_ops.pipeline import fused_experts_impl

    x, weights, ids, w_gate_up, w_down, landing, expected = _landing_case(device, 3)
    landing.flags.fill_(5)
    if flag != "landed":
        landing.flags[1] = {"failed": -1, "later": 6, "stopped": 0}[flag]
        landing.stop.fill_(int(flag == "stopped"))
    out = fused_experts_impl(x, weights, ids, w_gate_up, w_down, landing=landing)
    if flag == "landed":
        assert_close_l2(out, expected, 1e-2 if ON_GPU else 1e-5)
        assert int(landing.late) == 4
    else:
        assert int(landing.late) == 5


def land_later(x, landing):
    """A NaN buffer into which another stream copies x, and raises the landing flags to
    the epoch (5), ~20 ms after the kernels queued next on this stream have started."""
    buffer = torch.full_like(x, float("nan"))
    other = torch.cuda.Stream(priority=-1)
    other.wait_stream(torch.cuda.current_stream())  # the buffers above exist before it writes
    with torch.cuda.stream(other):
        torch.cuda._sleep(40_000_000)
        buffer.copy_(x)
        landing.flags.fill_(5)
    return buffer


@pytest.mark.skipif(not ON_GPU, reason="a kernel on another stream lands the rows later")
def test_gate_up_waits_for_rows_landing_later(device):
    """The rows and their flags arrive from another stream ~20 ms after gate_up started
    (the buffer NaN until then): every tile waits for its sources' flags and the result is
    the reference's. With flags that never come and a 1 ms bound, the tiles give up."""
    from moe_ops.pipeline import fused_experts_impl

    x, weights, ids, w_gate_up, w_down, landing, expected = _landing_case(device, 2)
    buffer = land_later(x, landing)
    out = fused_experts_impl(buffer, weights, ids, w_gate_up, w_down, landing=landing)
    torch.cuda.synchronize()
    assert_close_l2(out, expected, 1e-2)
    assert int(landing.late) == 4

    never = landing._replace(flags=torch.zeros_like(landing.flags), timeout_ticks=10**6)
    fused_experts_impl(x, weights, ids, w_gate_up, w_down, landing=never)
    assert int(never.late) == 5
