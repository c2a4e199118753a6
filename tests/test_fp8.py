"""fp8 experts: the two weight schemes, fp8 and 16-bit activations, against the plain
PyTorch emulation (``moe_ops.reference`` with the scales) and the bf16 reference on the
dequantised weights; the ops, compile, CUDA graphs, the module, and the argument checks."""
from dataclasses import replace

import pytest
import torch
import moe_ops
import moe_ops.pipeline as pipeline
from moe_ops import FusedMoE
from moe_ops.fp8 import (FP8_DTYPE, dequantize_weight, quantize_activations, quantize_weight,
                         scale_shape)
from moe_ops.pipeline import quantize_input, fused_experts_impl
from moe_ops.reference import fused_experts_reference, route_reference
from moe_ops.tiles import TileConfig, get_tile_config

from conftest import ON_GPU
from helpers import assert_close_l2, capture
from test_ops import expert_inputs

SCHEMES = ("block", "channel")
EMULATION_TOL = 1e-2  # against the reference that quantises the same way (bf16 output)
DEQUANTISED_TOL = 6e-2  # against the bf16 reference on the dequantised weights
# hidden 320 / inter 192: partial 128-blocks in both GEMMs (K and N); real sizes on a GPU.
SHAPES = dict(num_tokens=96, num_experts=8, top_k=2, hidden=320, inter=192) if not ON_GPU else \
    dict(num_tokens=512, num_experts=16, top_k=4, hidden=1280, inter=896)


def fp8_inputs(scheme, device, num_tokens, num_experts, top_k, hidden, inter):
    """bf16 tokens and routing, and fp8 quantisations of float experts."""
    x, topk_weights, w_gate_up, w_down = expert_inputs(num_tokens, num_experts, top_k, hidden,
                                                       inter, torch.float32, device)
    x = x.bfloat16()
    topk_ids = torch.rand(num_tokens, num_experts, device=device).topk(top_k, dim=1).indices.int()
    gate_up8, gate_up_scale = quantize_weight(w_gate_up, scheme)
    down8, down_scale = quantize_weight(w_down, scheme)
    return x, topk_weights, topk_ids, (gate_up8, down8, gate_up_scale, down_scale)


def quantise_launches(monkeypatch) -> list:
    """The inputs of every quantisation launch the pipeline makes from now on (recorded,
    then quantised as before)."""
    inputs = []
    quantize = pipeline.quantize_input
    monkeypatch.setattr(pipeline, "quantize_input",
                        lambda a, scheme, *args, **kwargs: inputs.append(a)
                        or quantize(a, scheme, *args, **kwargs))
    return inputs


def check_against_references(out, x, topk_weights, topk_ids, fp8_weights, fp8_activations):
    gate_up8, down8, gate_up_scale, down_scale = fp8_weights
    emulated = fused_experts_reference(x, topk_weights, topk_ids, gate_up8, down8, gate_up_scale,
                                       down_scale, fp8_activations)
    assert_close_l2(out, emulated, EMULATION_TOL)
    dequantised = fused_experts_reference(
        x, topk_weights, topk_ids, dequantize_weight(gate_up8, gate_up_scale).bfloat16(),
        dequantize_weight(down8, down_scale).bfloat16())
    assert_close_l2(out, dequantised, DEQUANTISED_TOL)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_weight_quantisation_round_trip(scheme, device):
    w = torch.randn(3, 200, 300, device=device)  # partial blocks both ways
    w8, scale = quantize_weight(w, scheme)
    assert w8.dtype == FP8_DTYPE and scale.dtype == torch.float32
    assert tuple(scale.shape) == scale_shape(scheme, w.shape)
    assert_close_l2(dequantize_weight(w8, scale), w, 4e-2)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_activation_quantisation_is_torchs(scheme, device):
    """The quantisation launch rounds exactly as torch's float32 -> e4m3fn cast (done on the
    bits, since the interpreter's own cast is wrong), over normals, subnormals, zero rows
    and a partial 128-column group, on a strided input."""
    rows, cols = 40, 300
    a = torch.randn(rows, cols + 8, device=device) * torch.logspace(-5, 2, rows, device=device)[:, None]
    a[3] = 0.0
    a = a.bfloat16()[:, :cols]
    a8, scale = quantize_input(a, scheme)
    assert a8.dtype == FP8_DTYPE
    per_row = scheme == "channel"
    assert scale.shape == ((rows,) if per_row else (rows, 3))
    full = scale[:, None] if per_row else scale.repeat_interleave(128, 1)[:, :cols]
    torch.testing.assert_close(a8.float() * full, quantize_activations(a.float(), per_row),
                               rtol=0, atol=0)


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("gate", [None, 0, 5])
def test_activation_quantisation_of_the_rows_in_use(scheme, gate, device):
    """``quantize_input`` with the rows in use counted on the device (count * 3 rows), its
    programs sized for 2 rows (each striding over many row blocks): those rows equal the
    full quantisation's, the rest stay unwritten; with a gate holding 0 (a tile set not
    chosen) no row is written."""
    rows = 3000 if ON_GPU else 40
    a = torch.randn(rows, 300, device=device).bfloat16()
    count = torch.tensor([rows // 4], dtype=torch.int32, device=device)
    used = 0 if gate == 0 else rows // 4 * 3
    a8, scale = quantize_input(a, scheme, count, 3, grid_rows=2, gate=None if gate is None else
                               torch.tensor([gate], dtype=torch.int32, device=device))
    full8, full_scale = quantize_input(a, scheme)
    assert torch.equal(a8[:used].view(torch.uint8), full8[:used].view(torch.uint8))
    assert torch.equal(scale[:used], full_scale[:used])
    assert bool(a8[used:].float().isnan().all()) and bool(scale[used:].isnan().all())


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("ids_per_row", [1, 3])
def test_activation_quantisation_of_routed_rows(scheme, ids_per_row, device):
    """``quantize_input`` with ``routed``: only rows with an id in [0, E) are quantised
    (as the full quantisation does), the others (ids -1 or past E) stay unwritten."""
    rows, num_experts = (3000 if ON_GPU else 40), 8
    a = torch.randn(rows, 300, device=device).bfloat16()
    ids = torch.randint(0, num_experts, (rows, ids_per_row), device=device, dtype=torch.int32)
    ids[torch.rand(rows, ids_per_row, device=device) < 0.5] = -1
    ids[::7, 0] = num_experts  # out of range: not routed here
    routed = ((ids >= 0) & (ids < num_experts)).any(dim=1)
    assert 0 < int(routed.sum()) < rows
    a8, scale = quantize_input(a, scheme, routed=(ids, ids_per_row, num_experts))
    full8, full_scale = quantize_input(a, scheme)
    assert torch.equal(a8[routed].view(torch.uint8), full8[routed].view(torch.uint8))
    assert torch.equal(scale[routed], full_scale[routed])
    assert bool(a8[~routed].float().isnan().all()) and bool(scale[~routed].isnan().all())


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("a_desc", [False, True])
def test_sparse_receive_buffer_quantises_its_routed_rows(scheme, a_desc, device, monkeypatch):
    """A receive buffer whose filled rows are not known on the device (``all_to_all``'s),
    mostly unrouted, fp8 activations for both GEMMs (x and h quantised by their own
    launches, h in slot order and in block order): x's launch quantises the routed rows
    only (the others' e4m3 rows stay unwritten), h's is restricted to the routed slots or
    to the blocks in use (what each restriction quantises: the tests above), and the
    routed rows equal the references."""
    import inspect

    x, topk_weights, topk_ids, fp8_weights = fp8_inputs(scheme, device, **SHAPES)
    rows = x.shape[0]
    unrouted = torch.rand(rows, device=device) < 2 / 3
    topk_ids[unrouted] = -1
    launches = []
    quantize = pipeline.quantize_input

    def recording(*args, **kwargs):
        launches.append((inspect.signature(quantize).bind(*args, **kwargs).arguments,
                         quantize(*args, **kwargs)))
        return launches[-1][1]

    monkeypatch.setattr(pipeline, "quantize_input", recording)
    tile = TileConfig(16, 64, 128, 1, 4, 3, A_FP8=True)
    down = replace(tile, A_DESC=a_desc)
    out = fused_experts_impl(x, topk_weights, topk_ids, fp8_weights[0], fp8_weights[1], tile,
                             down, w_gate_up_scale=fp8_weights[2], w_down_scale=fp8_weights[3],
                             tile_tokens=rows // 3, skip_unrouted=True)
    check_against_references(out[~unrouted], x[~unrouted], topk_weights[~unrouted],
                             topk_ids[~unrouted], fp8_weights, (True, True))
    assert bool(out[unrouted].isnan().all())
    (x_args, (x8, _)), (h_args, _) = launches
    assert bool(x8[unrouted].float().isnan().all()) and not x8[~unrouted].float().isnan().any()
    assert x_args["routed"][1] == SHAPES["top_k"]
    if a_desc:  # h in block order: the blocks in use, counted on the device
        assert h_args.get("count") is not None and h_args["rows_per_count"] == 16
    else:  # h in slot order: each slot by its id
        assert h_args["routed"][1] == 1


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("a_fp8,b_desc", [((False, False), False), ((True, True), True),
                                          ((False, True), True), ((True, False), False)])
def test_kernel_variants_match_emulation(scheme, a_fp8, b_desc, device):
    x, topk_weights, topk_ids, fp8_weights = fp8_inputs(scheme, device, **SHAPES)
    gate_up8, down8, gate_up_scale, down_scale = fp8_weights
    block_m = 64 if ON_GPU else 32
    tiles = [TileConfig(block_m, 64, 128, 1, 4, 3, B_DESC=b_desc, A_FP8=flag) for flag in a_fp8]
    out = fused_experts_impl(x, topk_weights, topk_ids, gate_up8, down8, *tiles,
                             w_gate_up_scale=gate_up_scale, w_down_scale=down_scale)
    check_against_references(out, x, topk_weights, topk_ids, fp8_weights, a_fp8)


def test_fast_accumulation_stays_near_the_emulation(device):
    """set_fp8_fast_accumulation(True): per-channel fp8 MMAs accumulate at the hardware's
    precision (Hopper): within 3e-2 of the emulation, and off again afterwards."""
    x, topk_weights, topk_ids, fp8_weights = fp8_inputs("channel", device, **SHAPES)
    tile = TileConfig(64 if ON_GPU else 32, 64, 128, 1, 4, 3, A_FP8=True)
    moe_ops.set_fp8_fast_accumulation(True)
    try:
        fast = fused_experts_impl(x, topk_weights, topk_ids, fp8_weights[0], fp8_weights[1], tile,
                                  tile, w_gate_up_scale=fp8_weights[2], w_down_scale=fp8_weights[3])
    finally:
        moe_ops.set_fp8_fast_accumulation(False)
    gate_up8, down8, gate_up_scale, down_scale = fp8_weights
    emulated = fused_experts_reference(x, topk_weights, topk_ids, gate_up8, down8, gate_up_scale,
                                       down_scale, (True, True))
    assert_close_l2(fast, emulated, 3e-2)
    assert not moe_ops.fp8.fast_accumulation()


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("a_desc", [False, True])
def test_gate_up_writes_block_fp8_h(a_desc, device, monkeypatch):
    """Block weights with fp8 activations for down and a 128-wide gate_up tile: gate_up
    writes h in e4m3 with its scales (one quantisation launch, for x, instead of two),
    h in slot order and in block order (A_DESC), inter not a multiple of 128."""
    shape = dict(SHAPES, inter=SHAPES["inter"] + 64)  # a partial last 128-column group
    x, topk_weights, topk_ids, fp8_weights = fp8_inputs("block", device, **shape)
    gate_up = TileConfig(16, 128, 128, 1, 4, 3, A_FP8=True)
    down = TileConfig(16, 64, 128, 1, 4, 3, A_DESC=a_desc, A_FP8=True)
    tiles = pipeline.expert_tiles(x.shape[0], shape["num_experts"], shape["hidden"], shape["inter"],
                                  shape["top_k"], x.dtype, x.device, gate_up, down, "block")
    assert tiles.h_fp8 and tiles.h_block_order == a_desc
    launches = quantise_launches(monkeypatch)
    out = fused_experts_impl(x, topk_weights, topk_ids, fp8_weights[0], fp8_weights[1], gate_up,
                             down, w_gate_up_scale=fp8_weights[2], w_down_scale=fp8_weights[3])
    assert len(launches) == 1
    check_against_references(out, x, topk_weights, topk_ids, fp8_weights, (True, True))


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("a_fp8", [False, True])
def test_float16_hidden_states(scheme, a_fp8, device):
    """fp8 experts beside float16 tokens (h, and block scales' h written by gate_up, in
    float16 before quantisation)."""
    x, topk_weights, topk_ids, fp8_weights = fp8_inputs(scheme, device, **SHAPES)
    x = x.half()
    gate_up = TileConfig(16, 128, 128, 1, 4, 3, A_FP8=a_fp8)
    down = TileConfig(16, 64, 128, 1, 4, 3, A_FP8=a_fp8)
    out = fused_experts_impl(x, topk_weights, topk_ids, fp8_weights[0], fp8_weights[1], gate_up,
                             down, w_gate_up_scale=fp8_weights[2], w_down_scale=fp8_weights[3])
    assert out.dtype == torch.float16
    check_against_references(out, x, topk_weights, topk_ids, fp8_weights, (a_fp8, a_fp8))


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("a_desc", [False, True])
def test_receive_buffer_quantised_up_to_its_filled_rows(scheme, a_desc, device):
    """An expert-parallel receive buffer with its filled rows known on the device
    (``num_rows``), fp8 activations for both GEMMs (x and h quantised by their own
    launches, h in slot order and in block order): the filled rows equal the references on
    them alone, the rows after them (routed ids, never read) stay unwritten."""
    x, topk_weights, topk_ids, fp8_weights = fp8_inputs(scheme, device, **SHAPES)
    filled = SHAPES["num_tokens"] // 3
    gate_up = TileConfig(16, 64, 128, 1, 4, 3, A_FP8=True)  # 64 wide: h quantised apart
    down = TileConfig(16, 64, 128, 1, 4, 3, A_DESC=a_desc, A_FP8=True)
    out = fused_experts_impl(x, topk_weights, topk_ids, fp8_weights[0], fp8_weights[1], gate_up,
                             down, w_gate_up_scale=fp8_weights[2], w_down_scale=fp8_weights[3],
                             tile_tokens=filled // 4, skip_unrouted=True,
                             num_rows=torch.tensor([filled], dtype=torch.int32, device=device))
    check_against_references(out[:filled], x[:filled], topk_weights[:filled],
                             topk_ids[:filled], fp8_weights, (True, True))
    assert bool(out[filled:].isnan().all())


@pytest.mark.usefixtures("poison_allocations")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("crowded", [False, True])
def test_receive_buffer_crowded_past_its_expected_tokens(scheme, crowded, device):
    """A rank expecting one token whose fp8 experts' receive buffer gets a few rows, or
    nearly all of them from peers with larger batches: the second tile set (tiles for
    many tokens, fp8 activations where those tiles want them, its own launches beside the
    first set's) computes where the slots routed pass the switch point, and the first
    set where they do not; either way the filled rows equal the references quantised as
    the chosen set's tiles quantise, the others stay unwritten."""
    x, topk_weights, topk_ids, fp8_weights = fp8_inputs(scheme, device, **SHAPES)
    rows, hidden, inter = x.shape[0], SHAPES["hidden"], SHAPES["inter"]
    num_experts, top_k = SHAPES["num_experts"], SHAPES["top_k"]
    filled = rows - 3 if crowded else 2
    tiles = pipeline.expert_tiles(1, num_experts, hidden, inter, top_k, x.dtype, x.device,
                                  fp8=scheme)
    second = pipeline._crowded_tiles(tiles, 1, rows, fp8_weights[2], num_experts, hidden,
                                     inter, top_k, x)
    assert second is not None and (filled * top_k > pipeline._switch_slots(1, top_k)) == crowded
    chosen = second if crowded else tiles
    out = fused_experts_impl(x, topk_weights, topk_ids, fp8_weights[0], fp8_weights[1],
                             w_gate_up_scale=fp8_weights[2], w_down_scale=fp8_weights[3],
                             tile_tokens=1, skip_unrouted=True,
                             num_rows=torch.tensor([filled], dtype=torch.int32, device=device))
    check_against_references(out[:filled], x[:filled], topk_weights[:filled],
                             topk_ids[:filled], fp8_weights,
                             (chosen.gate_up.A_FP8, chosen.down.A_FP8))
    assert bool(out[filled:].isnan().all())


def _landing_fp8_case(scheme, device):
    """``test_pipeline``'s landing case (rows from three sources) with fp8 experts whose
    tiles read e4m3 activations (x and h quantised by launches), bf16 rows."""
    from test_pipeline import _landing_case

    x, weights, ids, w_gate_up, w_down, landing, _ = _landing_case(device, 3)
    fp8_weights = quantize_weight(w_gate_up, scheme) + quantize_weight(w_down, scheme)
    fp8_weights = (fp8_weights[0], fp8_weights[2], fp8_weights[1], fp8_weights[3])
    tile = TileConfig(16, 64, 128, 1, 4, 3, A_FP8=True)
    return x.bfloat16(), weights, ids, fp8_weights, landing, tile


def _landed_call(x, weights, ids, fp8_weights, landing, tile):
    gate_up8, down8, gate_up_scale, down_scale = fp8_weights
    return fused_experts_impl(x, weights, ids, gate_up8, down8, tile, tile,
                              w_gate_up_scale=gate_up_scale, w_down_scale=down_scale,
                              landing=landing)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("flag", ["landed", "failed"])
def test_quantisation_of_landing_rows(scheme, flag, device):
    """fp8 experts whose gate_up reads x in e4m3, over rows landing from three sources
    (``Landing``): the quantisation launch waits for its rows' flags. Once every flag
    holds the epoch the result is the references' and nothing gives up (``late``
    untouched); a failed flag makes the programs that need it give up at once, which
    ``late`` records, never a hang."""
    x, weights, ids, fp8_weights, landing, tile = _landing_fp8_case(scheme, device)
    landing.flags.fill_(5)
    if flag == "failed":
        landing.flags[1] = -1
    out = _landed_call(x, weights, ids, fp8_weights, landing, tile)
    if flag == "landed":
        check_against_references(out, x, weights, ids, fp8_weights, (True, True))
        assert int(landing.late) == 4
    else:
        assert int(landing.late) == 5


@pytest.mark.skipif(not ON_GPU, reason="a kernel on another stream lands the rows later")
def test_quantisation_waits_for_rows_landing_later(device):
    """The rows and their flags arrive from another stream ~20 ms after the quantisation
    launch started (the buffer NaN until then): it waits, and the result is the
    references'."""
    from test_pipeline import land_later

    x, weights, ids, fp8_weights, landing, tile = _landing_fp8_case("block", device)
    out = _landed_call(land_later(x, landing), weights, ids, fp8_weights, landing, tile)
    torch.cuda.synchronize()
    check_against_references(out, x, weights, ids, fp8_weights, (True, True))
    assert int(landing.late) == 4


@pytest.mark.parametrize("scheme,block_k,a_fp8", [("block", 64, False), ("channel", 64, False),
                                                   ("channel", 256, False), ("channel", 256, True)])
def test_other_k_steps(scheme, block_k, a_fp8, device):
    """Weight-only tiles may step K by 64 (half a scale block) and in 16-row blocks;
    per-channel tiles by 256, with or without fp8 activations (K not a multiple of 256:
    the last step is masked)."""
    x, topk_weights, topk_ids, fp8_weights = fp8_inputs(scheme, device, **SHAPES)
    tile = TileConfig(16, 32, block_k, 1, 4, 3, A_FP8=a_fp8)
    out = fused_experts_impl(x, topk_weights, topk_ids, fp8_weights[0], fp8_weights[1], tile, tile,
                             w_gate_up_scale=fp8_weights[2], w_down_scale=fp8_weights[3])
    check_against_references(out, x, topk_weights, topk_ids, fp8_weights, (a_fp8, a_fp8))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_tokens", [1, 200] if not ON_GPU else [1, 64, 4096])
def test_default_tiles_match_emulation(scheme, num_tokens, device):
    """The looked-up tiles (the H200 table on one, the heuristic elsewhere) at each T."""
    shape = dict(SHAPES, num_tokens=num_tokens)
    x, topk_weights, topk_ids, fp8_weights = fp8_inputs(scheme, device, **shape)
    out = moe_ops.fused_experts(x, topk_weights, topk_ids, fp8_weights[0], fp8_weights[1],
                                fp8_weights[2], fp8_weights[3])
    lookup = (shape["num_experts"], shape["hidden"], shape["inter"], num_tokens, shape["top_k"],
              x.dtype, device, scheme)
    a_fp8 = tuple(get_tile_config(stage, *lookup).A_FP8 for stage in ("gate_up", "down"))
    check_against_references(out, x, topk_weights, topk_ids, fp8_weights, a_fp8)


def deepseek_like(device, scheme):
    """A small sigmoid-routed, grouped layer with fp8 experts, and its routing arguments."""
    num_experts, hidden, inter = 16, SHAPES["hidden"], SHAPES["inter"]
    x = torch.randn(24 if not ON_GPU else 40, hidden, device=device).bfloat16()
    router = (torch.randn(num_experts, hidden, device=device) * hidden ** -0.5).bfloat16()
    bias = torch.randn(num_experts, device=device) * 0.1
    _, _, _, fp8_weights = fp8_inputs(scheme, device, 1, num_experts, 4, hidden, inter)
    routing = dict(top_k=4, scoring="sigmoid", n_group=4, topk_group=2, score_bias=bias,
                   routed_scaling_factor=2.5)
    return x, router, fp8_weights, routing


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_moe_eager_op_and_compiled(scheme, device):
    x, router, (gate_up8, down8, gate_up_scale, down_scale), routing = deepseek_like(device, scheme)
    scales = dict(w_gate_up_scale=gate_up_scale, w_down_scale=down_scale)
    out = moe_ops.fused_moe(x, router, gate_up8, down8, **routing, **scales)
    topk_weights, topk_ids = route_reference(x, router, **routing)
    lookup = (16, x.shape[1], down8.shape[2], x.shape[0], 4, x.dtype, device, scheme)
    a_fp8 = tuple(get_tile_config(stage, *lookup).A_FP8 for stage in ("gate_up", "down"))
    check_against_references(out, x, topk_weights, topk_ids,
                             (gate_up8, down8, gate_up_scale, down_scale), a_fp8)
    op_out = torch.ops.tritonmoe.fused_moe(x, router, gate_up8, down8, **routing, **scales)
    assert torch.equal(op_out, out)
    compiled = torch.compile(lambda t: moe_ops.fused_moe(t, router, gate_up8, down8, **routing,
                                                         **scales), fullgraph=True, dynamic=True)
    assert_close_l2(compiled(x), out, 1e-6)
    assert_close_l2(compiled(x[:7]), moe_ops.fused_moe(x[:7], router, gate_up8, down8, **routing,
                                                       **scales), 1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fused_experts_opcheck(scheme, device):
    x, topk_weights, topk_ids, fp8_weights = fp8_inputs(scheme, device, 24, 8, 2, 256, 128)
    # test_schema compares inputs with ops CPU float8 lacks; the fake and AOT checks run.
    torch.library.opcheck(torch.ops.tritonmoe.fused_experts.default,
                          (x, topk_weights, topk_ids, *fp8_weights),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_graph_replay_without_host_sync(scheme, device):
    x, router, (gate_up8, down8, gate_up_scale, down_scale), routing = deepseek_like(device, scheme)
    fn = lambda: moe_ops.fused_moe(x, router, gate_up8, down8, **routing,  # noqa: E731
                                   w_gate_up_scale=gate_up_scale, w_down_scale=down_scale)
    expected = fn()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph, static_out = capture(fn)
        x.copy_(torch.randn_like(x))
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not torch.equal(static_out, expected)
    assert_close_l2(static_out, fn(), 1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_module_holds_fp8_experts(scheme, device):
    config = replace(moe_ops.get_config("qwen3-30b-a3b"), num_experts=8, hidden_size=256,
                     intermediate_size=128, top_k=2)
    module = FusedMoE(config, dtype=torch.bfloat16, device=device)
    x = torch.randn(5, 256, device=device).bfloat16()
    float_out = module(x)
    module.quantize_experts(scheme)
    assert module.fp8_scheme == scheme and module.w_gate_up.dtype == FP8_DTYPE
    assert_close_l2(module(x), float_out, DEQUANTISED_TOL)
    with pytest.raises(ValueError, match="already fp8"):
        module.quantize_experts(scheme)
    drawn = FusedMoE.from_config(config, dtype=torch.bfloat16, device=device,
                                 weight_dtype=FP8_DTYPE, scheme=scheme)
    assert drawn.fp8_scheme == scheme and torch.isfinite(drawn(x).float()).all()


def _bad_args(device):
    x, topk_weights, topk_ids, (gate_up8, down8, gate_up_scale, down_scale) = fp8_inputs(
        "block", device, 8, 4, 2, 256, 128)
    good = dict(hidden_states=x, topk_weights=topk_weights, topk_ids=topk_ids, w_gate_up=gate_up8,
                w_down=down8, w_gate_up_scale=gate_up_scale, w_down_scale=down_scale)
    _, channel_scale = quantize_weight(torch.randn(4, 256, 128, device=device), "channel")
    return good, [
        (dict(w_gate_up_scale=None), ValueError, "w_gate_up_scale is required"),
        (dict(w_down_scale=down_scale.double()), TypeError, "w_down_scale must be float32"),
        (dict(w_gate_up_scale=torch.ones(4, 4, 4, device=device)), ValueError,
         "128x128 blocks, the only block size supported"),
        (dict(w_down_scale=channel_scale), ValueError, "use one scheme"),
        (dict(w_down_scale=torch.ones(4, 256, 1, 1, device=device)), ValueError, "3-D"),
        (dict(hidden_states=x.float()), TypeError, "bfloat16 or float16 with float8"),
        (dict(w_down=down8.float()), TypeError, "both expert weights"),
        (dict(w_gate_up=gate_up8.bfloat16(), w_down=down8.bfloat16()), ValueError,
         "scales go with float8_e4m3fn weights only"),
        (dict(w_gate_up_scale=gate_up_scale.transpose(1, 2).contiguous().transpose(1, 2)),
         ValueError, "w_gate_up_scale must be contiguous"),
    ]


def test_bad_fp8_arguments_are_named(device):
    good, cases = _bad_args(device)
    for change, error, message in cases:
        args = dict(good, **change)
        with pytest.raises(error, match=message):
            moe_ops.fused_experts(**args)
        # The fake checks the same at trace time (dynamo wraps the error, message kept).
        with pytest.raises((error, torch._dynamo.exc.TorchRuntimeError), match=message):
            torch.compile(moe_ops.fused_experts, fullgraph=True)(**args)


def test_fp8_tiles_are_checked(device):
    x, topk_weights, topk_ids, fp8_weights = fp8_inputs("block", device, 8, 4, 2, 256, 128)
    for tile, message in ((TileConfig(16, 32, 64, A_FP8=True),
                           "A_FP8 with block-fp8 weights needs BLOCK_K=128"),
                          (TileConfig(16, 32, 256), "BLOCK_K dividing 128")):
        with pytest.raises(ValueError, match=message):
            fused_experts_impl(x, topk_weights, topk_ids, fp8_weights[0], fp8_weights[1], tile,
                               tile, w_gate_up_scale=fp8_weights[2], w_down_scale=fp8_weights[3])
    bf16_weights = [dequantize_weight(w, scale, torch.bfloat16)
                    for w, scale in (fp8_weights[0::2], fp8_weights[1::2])]
    tile = TileConfig(16, 32, 128, A_FP8=True)
    with pytest.raises(ValueError, match="A_FP8 needs fp8 weights"):
        fused_experts_impl(x, topk_weights, topk_ids, *bf16_weights, tile, tile)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_router_kernel_quantises_x(scheme, device, monkeypatch):
    """fused_moe with fp8 activations for gate_up, past the decode path: the router kernel
    writes x in e4m3 (no quantisation launch for x), bit for bit what the launch makes."""
    from moe_ops.routing import DECODE_MAX_T, Routing, route_and_quantize

    x, router, fp8_weights, routing = deepseek_like(device, scheme)
    assert x.shape[0] > DECODE_MAX_T
    _, (x8, scale) = route_and_quantize(
        x, router, Routing(**{k: v for k, v in routing.items() if k != "score_bias"}),
        routing["score_bias"], 16, scheme)
    launched = quantize_input(x, scheme)
    assert torch.equal(x8.view(torch.uint8), launched[0].view(torch.uint8))
    assert torch.equal(scale, launched[1])

    inputs = quantise_launches(monkeypatch)
    tile = TileConfig(16, 64, 128, 1, 4, 3, A_FP8=True)
    monkeypatch.setattr(pipeline, "get_tile_config", lambda *args: tile)
    pipeline.expert_tiles.cache_clear()
    try:
        out = moe_ops.fused_moe(x, router, *fp8_weights[:2], w_gate_up_scale=fp8_weights[2],
                                w_down_scale=fp8_weights[3], **routing)
    finally:
        pipeline.expert_tiles.cache_clear()
    assert all(a.shape[1] != x.shape[1] for a in inputs)  # only h was quantised by a launch
    weights, ids = route_reference(x, router, **routing)
    check_against_references(out, x, weights, ids, fp8_weights, (True, True))
