"""ExpertParallelMoE on 2 and 4 processes against the single-process FusedMoE.

CPU: gloo and the Triton interpreter, shrunk configs, fp32 (rel L2 <= 1e-5); fp8 experts
(block and channel scales) with bf16 hidden states against the single-process layer
holding the same fp8 weights (rel L2 <= 1e-2). On a machine with enough GPUs the same
tests run with NCCL (and the nvlink transport where marked), in bf16 too. Every run has
a deadline: a hang fails the test.
"""
import os
import re
from dataclasses import replace

import pytest
import torch

from distributed_harness import assert_all_ok, run_on_ranks, use_gpus
from helpers import capture, compile_for_sm90, rel_l2
from moe_ops.configs import shrink
from moe_ops.interpreter import BLOCKS
from moe_ops.tiles import FP8_ACTIVATIONS_MIN_T

MODELS = ["mixtral-8x7b", "qwen2-57b-a14b", "qwen3-30b-a3b", "deepseek-v3"]
# Tokens per rank, uneven, a rank with none, both routing paths (<= 16 and > 16 tokens).
TOKENS = {2: [[13, 0], [5, 21]], 4: [[13, 0, 5, 21], [3, 17, 0, 9]]}
CAPACITY = 24


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def _poison_empty():
    """torch.empty fills floats with NaN: a row the layer forgets to write fails."""
    import torch.utils.deterministic as deterministic

    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True


def _check_against_single_process(ep, moe, x, tol, pad_to: int = 0):
    """ep(x) against moe(x); with ``pad_to`` moe runs on x followed by random tokens up to
    that many rows (each token's output is its own: only the tiles, chosen by the row
    count, change), its first rows compared."""
    with torch.no_grad():
        padded = torch.cat([x, torch.randn(max(0, pad_to - x.shape[0]), x.shape[1],
                                           device=x.device, dtype=x.dtype)])
        out, expected = ep(x), moe(padded)[:x.shape[0]]
    assert out.shape == x.shape and out.dtype == x.dtype
    err = rel_l2(out, expected) if x.numel() else 0.0
    assert err <= tol, f"relative L2 {err:.2e} > {tol:.0e}"
    return err


def parity_scenario(rank, world, device, cases, seed, dtype, transports):
    """Every (model, max_tokens_per_rank) case and transport against random_fused_moe;
    returns the relative errors."""
    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    _poison_empty()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    errors, models = {}, {}
    for i, (name, max_tokens) in enumerate(cases):
        config = shrink(name)
        if name not in models:
            models[name] = random_fused_moe(config, seed, dtype=dtype, device=device)
        moe = models[name]
        for transport in transports:
            ep = ExpertParallelMoE.from_config(
                config, dtype=dtype, device=device, transport=transport,
                max_tokens_per_rank=max_tokens, seed=seed)
            if transport != "auto" or device.type == "cpu":  # auto: all_to_all without GPUs
                assert ep.transport.name == transport.replace("auto", "all_to_all")
            torch.manual_seed(seed + 7 * rank + i)
            x = torch.randn(TOKENS[world][i % 2][rank], config.hidden_size, device=device,
                            dtype=dtype)
            key = f"{name}/{transport}/max_tokens={max_tokens}"
            errors[key] = _check_against_single_process(ep, moe, x, tol)
            # The layer keeps only its shard, and the shard is the right one.
            per_rank = config.num_experts // world
            assert ep.w_gate_up.shape[0] == per_rank
            assert torch.equal(ep.w_gate_up, moe.w_gate_up[rank * per_rank:(rank + 1) * per_rank])
    return errors


# (model, max_tokens_per_rank): both buffer modes on every model at 2 ranks; at 4 ranks
# each model once, the two modes alternating.
CASES = {
    2: [(m, cap) for m in MODELS for cap in (None, CAPACITY)],
    4: [("mixtral-8x7b", None), ("qwen2-57b-a14b", CAPACITY), ("qwen3-30b-a3b", None),
        ("deepseek-v3", CAPACITY)],
}


@pytest.mark.parametrize("world", [2, 4])
def test_parity_with_single_process_layer(world):
    """At 4 ranks through the default transport ("auto", the README's way), with and
    without max_tokens_per_rank."""
    seed = _seed()
    print(f"seed={seed}")
    transport = "all_to_all" if world == 2 else "auto"
    errors = assert_all_ok(run_on_ranks(
        parity_scenario, world, CASES[world], seed, torch.float32, [transport]))
    assert all(len(e) == len(CASES[world]) for e in errors)


def fp8_parity_scenario(rank, world, device, cases, seed, transport="all_to_all"):
    """fp8 experts (bf16 hidden states) over ``transport`` against the single-process
    FusedMoE holding the same fp8 weights: every (scheme, model, max_tokens_per_rank,
    built, tokens) case, built by from_config (this rank's experts only) or from the
    whole layer (sliced), on the case's tokens per rank (None: TOKENS'). Each rank keeps
    its experts' rows of the weights and of both scales."""
    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    _poison_empty()
    fp8, bf16, errors = torch.float8_e4m3fn, torch.bfloat16, {}
    for i, (scheme, name, max_tokens, built, case_tokens) in enumerate(cases):
        config = FP8_CONFIGS[name]
        moe = random_fused_moe(config, seed, dtype=bf16, device=device, weight_dtype=fp8,
                               scheme=scheme)
        assert moe.fp8_scheme == scheme
        if built == "from_config":
            ep = ExpertParallelMoE.from_config(
                config, dtype=bf16, device=device, transport=transport,
                max_tokens_per_rank=max_tokens, seed=seed, weight_dtype=fp8, scheme=scheme)
        else:
            ep = ExpertParallelMoE(moe, transport=transport, max_tokens_per_rank=max_tokens)
        shard = slice(ep.expert_range.start, ep.expert_range.stop)
        assert ep.fp8_scheme == scheme and ep.w_gate_up.dtype == ep.w_down.dtype == fp8
        for weight in ("w_gate_up", "w_down"):
            mine, whole = getattr(ep, weight), getattr(moe, weight)[shard]
            assert torch.equal(mine.view(torch.uint8), whole.view(torch.uint8)), weight
            assert torch.equal(getattr(ep, f"{weight}_scale"), getattr(moe, f"{weight}_scale")[shard])
        torch.manual_seed(seed + 7 * rank + i)
        tokens = case_tokens or TOKENS[world][i % 2]
        x = torch.randn(tokens[rank], config.hidden_size, device=device, dtype=bf16)
        key = f"{scheme}/{name}/max_tokens={max_tokens}/{built}/tokens={tokens}"
        # fp8 GEMMs choose per call, by its row count, between weight-only and fp8
        # activations (moe_ops.tiles.FP8_ACTIVATIONS_MIN_T); a rank's calls (received rows,
        # capacity-padded buffers) need not choose as the single-process layer does, and
        # the two ways differ by the activations' quantisation (1-3e-2), so the bound is
        # fp8's against dequantised weights. A wrong shard of weights or scales is 1e-1 off.
        # Uneven batches: the rank with 1 token computes it with the second tile set's fp8
        # activations, and one row's quantisation differs from weight-only's by up to the
        # bound (2.8-6.2e-2 seen): the single-process layer then runs on enough rows to
        # choose fp8 activations too.
        pad_to = FP8_ACTIVATIONS_MIN_T if case_tokens else 0
        errors[key] = _check_against_single_process(ep, moe, x, FP8_PARITY_TOL, pad_to)
    return errors


FP8_PARITY_TOL = 6e-2
# Small fp8 layers (hidden 256: two 128-wide scale blocks along K): Mixtral as it is, and
# Qwen2-MoE (gated shared expert) cut to 8 experts, top-2.
FP8_CONFIGS = {
    "mixtral-8x7b": shrink("mixtral-8x7b", hidden_size=256, intermediate_size=128),
    "qwen2-57b-a14b": replace(shrink("qwen2-57b-a14b", hidden_size=256, intermediate_size=128),
                              num_experts=8, top_k=2),
}
# (scheme, model, max_tokens_per_rank, built, tokens per rank or None for TOKENS'): each
# scheme in both buffer modes, each way of building; and uneven batches: rank 0 decodes
# 1 token and receives ~UNEVEN slots (top-2, half of them its experts') from rank 1, twice
# its switch point (the slots of ``crowded_rows`` tokens): the receive buffer's second
# tile set computes there, the first on rank 1.
UNEVEN = 4 * BLOCKS.crowded_rows
FP8_CASES = [("block", "mixtral-8x7b", None, "from_config", None),
             ("block", "qwen2-57b-a14b", CAPACITY, "whole", None),
             ("channel", "qwen2-57b-a14b", None, "from_config", None),
             ("channel", "mixtral-8x7b", CAPACITY, "whole", None),
             ("block", "mixtral-8x7b", UNEVEN, "from_config", [1, UNEVEN])]


def test_fp8_experts_parity_with_single_process_layer():
    seed = _seed()
    print(f"seed={seed}")
    errors = assert_all_ok(run_on_ranks(fp8_parity_scenario, 2, FP8_CASES, seed))
    assert all(len(e) == len(FP8_CASES) for e in errors)


def one_rank_scenario(rank, world, device, seed, max_tokens):
    """Every token of every rank routed to rank 0's experts; the forward's NVTX ranges."""
    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    _poison_empty()
    config = shrink("mixtral-8x7b")
    moe = random_fused_moe(config, seed, device=device)
    per_rank = config.num_experts // world
    generator = torch.Generator(device=device).manual_seed(seed)
    router = torch.randn(moe.router_weight.shape, generator=generator, device=device).abs()
    router[per_rank:] *= -1  # tokens below are positive: only rank 0's experts score high
    moe.router_weight.copy_(router)
    ep = ExpertParallelMoE(moe, transport="all_to_all", max_tokens_per_rank=max_tokens)
    x = torch.rand(9 + rank, config.hidden_size, device=device) + 0.1
    ids = torch.ops.tritonmoe.route(x, moe.router_weight, **config.routing_kwargs())[1]
    assert bool((ids < per_rank).all())
    stages = _record_stages()
    err = _check_against_single_process(ep, moe, x, 1e-5)
    for stage in ("plan", "dispatch", "dispatch_wait", "gate_up", "combine", "combine_wait"):
        assert ("tritonmoe", f"tritonmoe/{stage}") in stages, (stage, stages)
    return err


def _record_stages() -> list:
    """Record the NVTX ranges opened from now on (the names stage_range gives)."""
    import contextlib

    from moe_ops import profiling

    opened = []

    class Recorder:
        def annotate(self, message, domain=None):
            opened.append((domain, message))
            return contextlib.nullcontext()

    profiling._nvtx = Recorder()
    return opened


@pytest.mark.parametrize("max_tokens", [None, 16])
def test_every_token_on_one_rank(max_tokens):
    assert_all_ok(run_on_ranks(one_rank_scenario, 2, _seed(), max_tokens))


def compile_scenario(rank, world, device, seed):
    """A residual block around the layer compiles with fullgraph=True and dynamic or
    unbacked shapes (no graph break, the fake op traced) and gives the eager result; a
    call whose output is unused still communicates."""
    from moe_ops.distributed import ExpertParallelMoE

    # A tiny layer (the op is one node whatever the routing) with a gated shared expert.
    config = replace(shrink("qwen2-57b-a14b", hidden_size=16, intermediate_size=16), num_experts=8)
    ep = ExpertParallelMoE.from_config(config, device=device, max_tokens_per_rank=32,
                                       seed=seed, transport="all_to_all")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = ep

        def forward(self, x):
            return x + self.moe(x)

    block = Block()
    # fullgraph=True: a graph break would raise. 3-D input: the layer flattens it.
    compiled = torch.compile(block, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in ((1, 5), (2, 5 + rank)):
        x = torch.randn(*shape, config.hidden_size, device=device)
        with torch.no_grad():
            assert rel_l2(compiled(x), block(x)) <= 1e-6

    # An unbacked token count (data-dependent) traces: the fake uses torch._check.
    torch._dynamo.reset()
    x = torch.randn(7 + rank, config.hidden_size, device=device)
    torch._dynamo.decorators.mark_unbacked(x, 0)
    with torch.no_grad():
        assert rel_l2(torch.compile(block, fullgraph=True, backend="aot_eager")(x), block(x)) <= 1e-6

    # A call whose output is unused is kept (the op mutates the layer's protocol state):
    # it communicates on every rank, so the count advances and the ranks stay in step.
    def unused_output(x):
        ep(x)
        return x * 2

    count = int(ep.protocol_state[0])
    with torch.no_grad():
        torch.compile(unused_output, fullgraph=True, backend="aot_eager")(x)
        assert int(ep.protocol_state[0]) == count + 1
        assert rel_l2(block(x), x + ep(x)) <= 1e-6  # still in step with the peer

    # A bad input on one rank, compiled: every rank raises (the real op rejects it while
    # taking part; a check at trace time would leave the peer a call ahead), then the
    # ranks are still in step.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    bad = torch.randn(3, config.hidden_size + 8 * rank, device=device)
    with torch.no_grad():
        try:
            compiled(bad)
            raised = None
        except Exception as error:  # noqa: BLE001  (checked below)
            raised = f"{type(error).__name__}: {error}"
        expected = "hidden_states must be" if rank == 1 else "rank 1 rejected its input"
        assert raised is not None and expected in raised, raised
        assert rel_l2(compiled(x), block(x)) <= 1e-6
    return True


def test_fullgraph_compile():
    assert_all_ok(run_on_ranks(compile_scenario, 2, _seed()))


# -- errors: raised on every rank, never a hang ------------------------------------------

def construct_scenario(rank, world, device, cases):
    """Each bad construction in turn on one group: every rank raises the same error, and
    the group stays usable for the next."""
    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    errors = {}
    for case in cases:
        config, dtype, experts = shrink("mixtral-8x7b"), torch.float32, {}
        whole = None  # a whole layer to shard, for the cases of replicated weights
        if case.startswith("replicated"):  # rank 1 loaded one replicated tensor differently
            whole = random_fused_moe(shrink("deepseek-v3"), 3, device=device)
            if rank == 1 and case == "replicated shared_down":
                whole.shared_down.data[0, 0] += 0.5
            elif rank == 1 and case == "replicated score_bias":
                whole.score_bias.mul_(1.01)
            elif rank == 1:  # gate and up halves swapped: same sum, other order
                whole.shared_gate_up.data = whole.shared_gate_up.data.roll(
                    whole.shared_gate_up.shape[0] // 2, dims=0).contiguous()
        if case == "indivisible":
            config = replace(config, num_experts=7)
        elif case == "config" and rank == 1:
            config = replace(config, top_k=3)
        elif case == "dtype" and rank == 1:
            dtype = torch.float16
        elif case.startswith("fp8"):  # bf16 hidden states beside fp8 or float experts
            dtype = torch.bfloat16
            if case == "fp8 beside float" and rank == 1:
                experts = dict(weight_dtype=torch.float8_e4m3fn)
            elif case == "fp8 schemes":
                experts = dict(weight_dtype=torch.float8_e4m3fn, scheme=("block", "channel")[rank])
            elif case == "fp8 with fp32 hidden" and rank == 1:
                dtype, experts = torch.float32, dict(weight_dtype=torch.float8_e4m3fn)
        try:
            if whole is not None:
                ExpertParallelMoE(whole, transport="all_to_all")
            else:
                ExpertParallelMoE.from_config(config, dtype=dtype, device=device,
                                              transport="all_to_all", **experts)
            errors[case] = "built"
        except Exception as error:  # noqa: BLE001  (the parent checks it)
            errors[case] = f"{type(error).__name__}: {error}"
    return errors


CONSTRUCTION_ERRORS = {
    "indivisible": "ValueError: .*divisible by the group's world size 2",
    "config": "ValueError: .*disagree on config .*top_k: 2 vs 3",
    "dtype": "ValueError: .*disagree on dtype",
    "fp8 beside float": "ValueError: .*disagree on experts_format: 'torch.bfloat16' vs "
                        "'torch.float8_e4m3fn \\(block scales\\)'",
    "fp8 schemes": "ValueError: .*disagree on experts_format: 'torch.float8_e4m3fn \\(block "
                   "scales\\)' vs 'torch.float8_e4m3fn \\(channel scales\\)'",
    "replicated shared_down": "ValueError: .*disagree on checksum of shared_down",
    "replicated score_bias": "ValueError: .*disagree on checksum of score_bias",
    "replicated shared_gate_up order": "ValueError: .*disagree on checksum of shared_gate_up",
    # What only rank 1 can find (its fp8 experts beside float32 hidden states) is raised
    # on every rank too.
    "fp8 with fp32 hidden": ("TypeError: .*rank 1 .*cannot build the layer: its "
                             "torch.float8_e4m3fn \\(block scales\\) experts do not fit its "
                             "torch.float32 router and hidden states: .*bfloat16 or float16"),
}


def test_construction_errors_on_every_rank():
    import re

    reports = assert_all_ok(run_on_ranks(construct_scenario, 2, list(CONSTRUCTION_ERRORS),
                                         deadline_s=120))
    for rank, errors in enumerate(reports):
        for case, message in CONSTRUCTION_ERRORS.items():
            value = errors[case]
            assert re.match(message, value), (rank, value)


def non_member_scenario(rank, world, device, seed):
    """A layer on a group of rank 0 alone: rank 1, outside it, gets a clear error (not an
    IndexError) from both constructors; rank 0's layer works."""
    import torch.distributed as dist

    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    config = shrink("qwen3-30b-a3b")
    group = dist.new_group([0])
    moe = random_fused_moe(config, seed, device=device)
    if rank == 0:
        ep = ExpertParallelMoE(moe, group=group, transport="all_to_all")
        x = torch.randn(5, config.hidden_size, device=device)
        with torch.no_grad():
            return rel_l2(ep(x), moe(x))
    errors = []
    for build in (lambda: ExpertParallelMoE(moe, group=group),
                  lambda: ExpertParallelMoE.from_config(config, group=group, device=device)):
        try:
            build()
            errors.append("built")
        except ValueError as error:
            errors.append(str(error))
    return errors


def test_a_rank_outside_the_group_gets_a_clear_error():
    error_0, errors_1 = assert_all_ok(run_on_ranks(non_member_scenario, 2, _seed(),
                                                   deadline_s=120))
    assert error_0 <= 1e-5, error_0
    assert all(e.startswith("group: this process (global rank 1) is not a member")
               for e in errors_1), errors_1


def dying_rank_scenario(rank, world, device, max_tokens):
    from moe_ops.distributed import ExpertParallelMoE

    config = shrink("qwen3-30b-a3b")
    ep = ExpertParallelMoE.from_config(config, device=device, transport="all_to_all",
                                       max_tokens_per_rank=max_tokens)
    if rank == 1:
        raise SystemExit("rank 1 stops before the forward")
    with torch.no_grad():
        ep(torch.randn(6, config.hidden_size, device=device))
    return "finished"


def skipped_call_reset_scenario(rank, world, device, timeout):
    """Rank 1 skips a call (an exception of its own between layers) and resets while rank
    0 waits in that call: what the README says happens (the group's error on every rank
    at the group's time-out; the layer's own time-out first on rank 0), timed."""
    import time

    from moe_ops.distributed import ExpertParallelMoE

    config = shrink("qwen3-30b-a3b")
    ep = ExpertParallelMoE.from_config(config, device=device, transport="all_to_all",
                                       timeout=timeout)
    x = torch.randn(3, config.hidden_size, device=device)
    raised = []
    with torch.no_grad():
        ep(x)
        calls = [ep.reset] if rank == 1 else [lambda: ep(x), ep.reset]
        start = time.monotonic()
        for call in calls:
            try:
                call()
                raised.append(None)
            except Exception as error:  # noqa: BLE001  (the parent checks it)
                raised.append(type(error).__name__)
    return raised, time.monotonic() - start


@pytest.mark.skipif(use_gpus(2), reason="gloo's behaviour; NCCL's watchdog ends the processes")
def test_reset_after_a_skipped_call_raises_everywhere_at_the_group_timeout():
    group_timeout_s = 10
    reports = run_on_ranks(skipped_call_reset_scenario, 2, 2.0, deadline_s=90,
                           group_timeout_s=group_timeout_s)
    (raised_0, elapsed_0), (raised_1, elapsed_1) = assert_all_ok(reports)
    assert raised_0[0] == "ExpertParallelTimeout", raised_0  # the skipped call, at timeout=
    assert raised_0[-1] is not None and raised_1[-1] is not None, reports  # both resets
    for elapsed in (elapsed_0, elapsed_1):  # at the group's time-out, not before, no hang
        assert 0.5 * group_timeout_s <= elapsed <= 2 * group_timeout_s + 5, reports


@pytest.mark.parametrize("max_tokens", [None, 16])
def test_dying_rank_fails_its_peer_in_bounded_time(max_tokens):
    """A rank that exits: its peer raises (the group reports the closed connection)
    instead of hanging. Bad inputs, exceptions, time-outs and mismatched calls:
    test_distributed_protocol.py."""
    reports = run_on_ranks(dying_rank_scenario, 2, max_tokens, deadline_s=150,
                           group_timeout_s=20)
    assert reports[1][0] == "error" and "SystemExit" in reports[1][1], reports[1]
    assert reports[0][0] in ("error", "died"), reports[0]  # not "finished", not "hung"
    if reports[0][0] == "error" and not use_gpus(2):
        assert "ExpertParallelError" in reports[0][1], reports[0]


def test_plan_packs_each_token_once_per_owner(device):
    """With a capacity, block d holds the tokens needing rank d in order, their ids
    renumbered (-1 for other ranks' experts), ids -1 on the rows after them and those
    rows' x untouched; planning without send buffers gives the same plan."""
    from moe_ops.distributed.plan import plan_dispatch

    T, K, H, W, E_l, C = 6, 2, 8, 2, 3, 10
    ids = torch.stack([torch.randperm(W * E_l)[:K] for _ in range(T)]).int().to(device)
    weights, x = torch.rand(T, K, device=device), torch.randn(T, H, device=device)
    send_x = torch.full((W * C, H), 7.0, device=device)
    send_ids = torch.full((W * C, K), 99, dtype=torch.int32, device=device)
    send_weights = torch.full((W * C, K), 5.0, device=device)
    plan = plan_dispatch(x, weights, ids, E_l, W, C, send=(send_x, send_ids, send_weights))
    bare = plan_dispatch(x, weights, ids, E_l, W, C)
    assert bare.send is None
    assert torch.equal(bare.rows, plan.rows) and torch.equal(bare.counts, plan.counts)
    for d in range(W):
        owned = (ids // E_l) == d
        tokens = owned.any(1).nonzero().flatten()
        n = len(tokens)
        assert int(plan.counts[d]) == n
        expected_rows = torch.full((T,), -1, dtype=torch.int32, device=device)
        expected_rows[tokens] = d * C + torch.arange(n, dtype=torch.int32, device=device)
        assert torch.equal(plan.rows[d], expected_rows)
        rows = slice(d * C, d * C + n)
        assert torch.equal(send_x[rows], x[tokens])
        assert torch.equal(send_ids[rows], torch.where(owned[tokens], ids[tokens] - d * E_l, -1))
        assert torch.equal(send_weights[rows], weights[tokens])
        assert (send_ids[d * C + n:(d + 1) * C] == -1).all()
        assert (send_x[d * C + n:(d + 1) * C] == 7).all()


class _FakePeers:
    """The nvlink workspace of W ranks as local tensors (rank d's symmetric buffers are
    ``bufs[d]``, R receive rows each, its fill counter at ``fills[d]``), with the address
    table a transport on ``rank`` would build."""

    def __init__(self, W, R, H, K, rank, fills, dtype, device):
        self.bufs = [dict(recv_x=torch.full((R, H), 3.5, dtype=dtype, device=device),
                          recv_ids=torch.full((R, K), 77, dtype=torch.int32, device=device),
                          recv_weights=torch.full((R, K), 9.0, device=device),
                          recv_source=torch.full((R,), 55, dtype=torch.int32, device=device),
                          fill=torch.tensor([fill], dtype=torch.int32, device=device),
                          headers=torch.zeros(2, W, 4, dtype=torch.int64, device=device),
                          flags=torch.zeros(3, W, dtype=torch.int64, device=device))
                     for fill in fills]

        def table(name, index=0):
            return torch.tensor([b[name][index].data_ptr() for b in self.bufs],
                                dtype=torch.int64, device=device)

        self.addresses = dict(recv_x=table("recv_x"), recv_ids=table("recv_ids"),
                              recv_weights=table("recv_weights"),
                              recv_source=table("recv_source"), fill=table("fill"),
                              header_dispatch=table("headers", (0, rank)),
                              flag_dispatch=table("flags", (0, rank)),
                              header_combine=table("headers", (1, rank)),
                              flag_combine=table("flags", (1, rank)),
                              flag_ids=table("flags", (2, rank)))


@pytest.mark.parametrize("failed", [False, True])
def test_push_stores_each_routed_row_in_its_owners_memory(failed, device):
    """The nvlink dispatch, peers' memory faked by local tensors (their addresses): the
    plan reserves each destination's rows after what its fill counter already holds (other
    senders' rows), and the push kernel stores there exactly the tokens needing that rank
    (x, ids in its numbering, weights, this rank as their source), nothing else; of its
    several programs, the last of those moving ids writes every rank's header (this one's
    own included) and raises its ids flag, the last of all raises every rank's rows flag,
    each to the epoch (FLAG_FAILED when the workspace failed), and both counters are
    re-armed. The release kernel sets the filled recv_ids rows to -1, zeroes the fill
    counter and raises the peers' second flags."""
    import triton

    from moe_ops.distributed import kernels as K
    from moe_ops.distributed import protocol as P
    from moe_ops.distributed.plan import plan_dispatch

    T, Kk, H, W, E_l, C, rank, layer_id = 7, 2, 12, 3, 2, 10, 1, 5
    R = W * C
    fills = [4, 0, 11]  # rows other senders reserved before this one
    ids = torch.stack([torch.randperm(W * E_l)[:Kk] for _ in range(T)]).int().to(device)
    weights, x = torch.rand(T, Kk, device=device), torch.randn(T, H, device=device)
    peers = _FakePeers(W, R, H, Kk, rank, fills, x.dtype, device)
    a = peers.addresses
    state = P.new_state(device)
    state[P.COUNT] = 41
    plan = plan_dispatch(x, weights, ids, E_l, W, C, reserve=a["fill"], state=state)
    assert state.tolist()[P.CODE] == P.NONE
    epoch = torch.tensor([1234], dtype=torch.int64, device=device)
    failed_word = torch.tensor([int(failed)], dtype=torch.int64, device=device)
    arrivals = torch.zeros(3, dtype=torch.int32, device=device)
    K.push_rows_kernel[(triton.cdiv(T, 2), triton.cdiv(H, 4))](
        x, ids, weights, plan.rows, a["recv_x"], a["recv_ids"], a["recv_weights"],
        a["recv_source"], a["header_dispatch"], a["flag_ids"], a["flag_dispatch"],
        arrivals[0:2], epoch, failed_word, state, layer_id, P.OK, T, H, E_l, rank, WORLD=W,
        TOP_K=Kk, K_PAD=2, BLOCK_T=2, BLOCK_H=4)
    flag = P.FLAG_FAILED if failed else 1234
    header = [P.MAGIC, layer_id, 41, P.OK]
    for d in range(W):
        owned = (ids // E_l) == d
        tokens = owned.any(1).nonzero().flatten()
        n, first = len(tokens), fills[d]
        got = peers.bufs[d]
        assert int(got["fill"]) == first + n
        expected_rows = torch.full((T,), -1, dtype=torch.int32, device=device)
        expected_rows[tokens] = first + torch.arange(n, dtype=torch.int32, device=device)
        assert torch.equal(plan.rows[d], expected_rows)
        rows = slice(first, first + n)
        assert torch.equal(got["recv_x"][rows], x[tokens])
        assert torch.equal(got["recv_ids"][rows],
                           torch.where(owned[tokens], ids[tokens] - d * E_l, -1))
        assert torch.equal(got["recv_weights"][rows], weights[tokens])
        assert (got["recv_source"][rows] == rank).all()
        untouched = torch.ones(R, dtype=torch.bool, device=device)
        untouched[rows] = False
        assert (got["recv_x"][untouched] == 3.5).all()
        assert (got["recv_ids"][untouched] == 77).all()
        assert (got["recv_weights"][untouched] == 9).all()
        assert (got["recv_source"][untouched] == 55).all()
        assert int(got["flags"][0, rank]) == flag and int(got["flags"][2, rank]) == flag
        assert got["headers"][0, rank].tolist() == header
        assert (got["flags"][1] == 0).all()
    assert arrivals.tolist() == [0, 0, 0]

    own = peers.bufs[rank]
    filled = int(own["fill"])
    blocks = 8  # several programs
    late = epoch - 1  # no tile gave up in this exchange
    record = torch.zeros(P.RECORD_WORDS, dtype=torch.int64, device=device)
    K.release_back_kernel[(triton.cdiv(own["recv_ids"].numel(), blocks),)](
        own["recv_ids"], own["fill"], own["recv_ids"].numel(), a["header_combine"],
        a["flag_combine"], arrivals[2:], epoch, failed_word, state, layer_id, P.OK, rank,
        late, record, WORLD=W, TOP_K=Kk, LANDING=True, BLOCK=blocks)
    assert (own["recv_ids"][:filled] == -1).all() and (own["recv_ids"][filled:] == 77).all()
    assert int(own["fill"]) == 0 and int(arrivals[2]) == 0
    assert state.tolist()[P.CODE] == P.NONE and not record.any()
    for d in range(W):
        if d != rank:
            assert int(peers.bufs[d]["flags"][1, rank]) == flag
            assert peers.bufs[d]["headers"][1, rank].tolist() == header


@pytest.mark.parametrize("recorded", [False, True])
def test_release_turns_a_tile_that_gave_up_into_a_timeout(recorded, device):
    """A gate_up tile gave up waiting for landing rows in this exchange (late == epoch):
    the release records a sticky time-out in the layer state, fails the workspace and
    copies the state into its record, and tells every peer TIMED_OUT in its second
    header before they read a partial sum; this rank's own slot is not signalled. When a
    sticky failure was already recorded (a peer's failed flag at the ids wait), that one
    stands and the peers are told BROKEN."""
    import triton

    from moe_ops.distributed import kernels as K
    from moe_ops.distributed import protocol as P

    W, R, H, Kk, rank, layer_id = 3, 12, 4, 2, 2, 9
    peers = _FakePeers(W, R, H, Kk, rank, [0, 0, 5], torch.float32, device)
    a, own = peers.addresses, peers.bufs[rank]
    state = P.new_state(device)
    state[P.COUNT] = 17
    if recorded:
        P.record_local(state, P.PEER_STATUS, 17, P.DISPATCH)
    epoch = torch.tensor([300], dtype=torch.int64, device=device)
    failed, late = torch.zeros_like(epoch), epoch.clone()
    record = torch.zeros(P.RECORD_WORDS, dtype=torch.int64, device=device)
    arrivals = torch.zeros(1, dtype=torch.int32, device=device)
    K.release_back_kernel[(triton.cdiv(own["recv_ids"].numel(), 8),)](
        own["recv_ids"], own["fill"], own["recv_ids"].numel(), a["header_combine"],
        a["flag_combine"], arrivals, epoch, failed, state, layer_id, P.OK, rank, late, record,
        WORLD=W, TOP_K=Kk, LANDING=True, BLOCK=8)
    values = state.tolist()
    code = P.PEER_STATUS if recorded else P.TIMEOUT
    assert (values[P.CODE], values[P.PEER], values[P.CALL], values[P.PHASE], values[P.STICKY],
            values[P.POISON]) == (code, -1, 17, P.DISPATCH, 1, 1)
    assert int(failed) == 1 and record.tolist() == values + [layer_id]
    if not recorded:
        assert "timed out waiting for a peer in the dispatch" in P.describe(values, layer_id,
                                                                            rank)
    for d in range(W):
        if d != rank:
            assert peers.bufs[d]["headers"][1, rank].tolist() == [
                P.MAGIC, layer_id, 17, P.BROKEN if recorded else P.TIMED_OUT]
            assert int(peers.bufs[d]["flags"][1, rank]) in (300, P.FLAG_FAILED)
    assert (own["flags"] == 0).all() and int(own["fill"]) == 0


def test_plan_never_reserves_past_a_full_receive_buffer(device):
    """A receive buffer whose fill counter leaves no room for this rank's block (rows of a
    late, failed forward still there): the block is not sent (rows -1, nothing past the
    buffer is named) and the layer state records OVERFLOW at that rank, sticky and
    poisoned; the other destinations are planned as usual."""
    from moe_ops.distributed import protocol as P
    from moe_ops.distributed.plan import plan_dispatch

    T, K, H, W, E_l, C, rank = 6, 2, 8, 2, 2, 8, 0
    ids = torch.stack([torch.arange(K) + 2 * (t % 2) for t in range(T)]).int().to(device)
    weights, x = torch.rand(T, K, device=device), torch.randn(T, H, device=device)
    fills = torch.tensor([[0], [W * C - 1]], dtype=torch.int32, device=device)  # rank 1: full
    addresses = torch.tensor([fills[d].data_ptr() for d in range(W)], dtype=torch.int64,
                             device=device)
    state = P.new_state(device)
    state[P.COUNT] = 3
    plan = plan_dispatch(x, weights, ids, E_l, W, C, reserve=addresses, state=state)
    assert (plan.rows[1] == -1).all()
    own = (torch.arange(T, device=device) % 2) == 0
    assert torch.equal(plan.rows[0][own], torch.arange(T // 2, dtype=torch.int32, device=device))
    values = state.tolist()
    assert (values[P.CODE], values[P.PEER], values[P.CALL], values[P.STICKY], values[P.POISON]) \
        == (P.OVERFLOW, 1, 3, 1, 1)
    assert "rank 1's receive buffer had no room" in P.describe(values, 7, rank)


def test_nvlink_decision_matches_gpus_by_uuid_not_index():
    """Per-process CUDA_VISIBLE_DEVICES gives every rank index 0: GPUs are told apart by
    UUID; a GPU this process cannot see, or one shared by two ranks, rules nvlink out."""
    from moe_ops.distributed.nvlink import peer_access_ok

    def rank(uuid, index, visible, host="node0"):
        return dict(host=host, uuid=uuid, index=index, visible=visible)

    every = {"GPU-a": 0, "GPU-b": 1}
    granted = lambda i, j: True  # noqa: E731
    assert peer_access_ok([rank("GPU-a", 0, every), rank("GPU-b", 1, every)],
                          rank("GPU-a", 0, every), granted)
    assert not peer_access_ok([rank("GPU-a", 0, every), rank("GPU-b", 1, every)],
                              rank("GPU-a", 0, every), lambda i, j: False)
    isolated = [rank("GPU-a", 0, {"GPU-a": 0}), rank("GPU-b", 0, {"GPU-b": 0})]
    assert not peer_access_ok(isolated, isolated[0], granted)  # index 0 == 0 is no proof
    shared = [rank("GPU-a", 0, every), rank("GPU-a", 0, every)]
    assert not peer_access_ok(shared, shared[0], granted)
    two_hosts = [rank("GPU-a", 0, every), rank("GPU-b", 1, every, host="node1")]
    assert not peer_access_ok(two_hosts, two_hosts[0], granted)
    cpu = [rank(None, None, {}), rank(None, None, {})]
    assert not peer_access_ok(cpu, cpu[0], granted)


SM90_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_ops.distributed import kernels as K

def build(fn, signature, **constexprs):
    signature.update({name: "constexpr" for name in constexprs})
    keys = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=keys),
                   target=GPUTarget("cuda", 90, 32))

i64 = dict(buf_ptr="*i64", counts_ptr="*i64", state_ptr="*i64", layer_id="i32",
           row_words="i32", block_rows="i32", capacity="i32")
for fixed in (True, False):
    build(K.stamp_headers_kernel, dict(i64, status="i32"), WORLD=2, HEADER_ROWS=1,
          FIXED=fixed, BUMP=True, REPORT_PENDING=not fixed)
    build(K.check_headers_kernel, dict(i64, self_rank="i32", phase="i32", reply_ptr="*i64",
          status="i32"), WORLD=8, HEADER_ROWS=1, FIXED=fixed, REPLY=fixed)
    build(K.plan_pack_kernel, dict(topk_ids_ptr="*i32", topk_weights_ptr="*fp32",
          counts_ptr="*i32", rows_ptr="*i32", send_ids_ptr="*i32",
          send_weights_ptr="*fp32", src_token_ptr="*i32", num_tokens="i32",
          block_rows="i32", experts_per_rank="i32", total_rows="i32",
          fill_addrs="*i64", rows_limit="i32", state_ptr="*i64", epoch_ptr="*i64",
          failed_ptr="*i64"), WORLD=2, W_PAD=2, TOP_K=8, K_PAD=8, FIXED=fixed,
          HEADER_ROWS=int(fixed), PACK=not fixed, RESERVE=fixed, BUMP=fixed, BLOCK_T=256)
    build(K.combine_partials_kernel, dict(back_ptr="*bf16", bases_ptr="*i64", rows_ptr="*i32",
          shared_ptr="*bf16", state_ptr="*i64", out_ptr="*bf16",
          num_tokens="i32", hidden="i32"), WORLD=2, HAS_SHARED=fixed,
          PULL=fixed, BLOCK_T=4, BLOCK_H=512, INTERPRETER=False)
build(K.gather_rows_kernel, dict(x_ptr="*bf16", src_token_ptr="*i32", out_ptr="*bf16",
      num_rows="i32", hidden="i32"), BLOCK_R=8, BLOCK_H=512)
flags = dict(epoch_ptr="*i64", failed_ptr="*i64")
signal = dict(header_addrs="*i64", flag_addrs="*i64", counter_ptr="*i32", **flags,
              state_ptr="*i64", layer_id="i32", status="i32")
build(K.push_rows_kernel, dict(x_ptr="*bf16", topk_ids_ptr="*i32", topk_weights_ptr="*fp32",
      rows_ptr="*i32", x_addrs="*i64", ids_addrs="*i64", weights_addrs="*i64",
      source_addrs="*i64", header_addrs="*i64", ids_flag_addrs="*i64", flag_addrs="*i64",
      counter_ptr="*i32", **flags, state_ptr="*i64", layer_id="i32", status="i32",
      num_tokens="i32", hidden="i32", experts_per_rank="i32", rank="i32"),
      WORLD=2, TOP_K=8, K_PAD=8, BLOCK_T=8, BLOCK_H=512)
for landing in (False, True):
    build(K.release_back_kernel, dict(recv_ids_ptr="*i32", fill_ptr="*i32", num_words="i32",
          **signal, rank="i32", late_ptr="*i64", record_ptr="*i64"), WORLD=2, TOP_K=8,
          LANDING=landing, BLOCK=1024)
build(K.put_flag_kernel, dict(flags, state_ptr="*i64", peer_header_ptr="*i64",
      peer_flag_ptr="*i64", layer_id="i32", status="i32"))
build(K.wait_flags_kernel, dict(flags, flags_ptr="*i64", headers_ptr="*i64",
      record_ptr="*i64", state_ptr="*i64", layer_id="i32", self_rank="i32", skip_rank="i32",
      timeout_ticks="i64", phase="i32"), WORLD=2, HIP=False)
"""


def test_kernels_compile_for_sm90(tmp_path):
    """Every kernel of the layer compiles for an H100/H200 (sm_90) from any machine, so a
    CPU-only CI catches what the interpreter accepts and the GPU compiler would not."""
    compile_for_sm90(SM90_COMPILE, tmp_path)


# -- GPU: NCCL and nvlink, bf16, graph capture, no host sync -----------------------------

needs_two_gpus = pytest.mark.skipif(not use_gpus(2), reason="needs 2 GPUs")


@needs_two_gpus
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_parity_both_transports(dtype):
    seed = _seed()
    fixed = [(m, CAPACITY) for m in MODELS]
    assert_all_ok(run_on_ranks(parity_scenario, 2, fixed, seed, dtype, ["nvlink", "all_to_all"]))
    assert_all_ok(run_on_ranks(parity_scenario, 2, [(m, None) for m in MODELS], seed,
                               dtype, ["all_to_all"]))


@needs_two_gpus
def test_gpu_nvlink_fp8_experts_parity():
    """fp8 experts over nvlink, their received rows quantised (or, with weight-only fp8
    tiles, read) as they land: the fixed-capacity cases of FP8_CASES, uneven batches
    among them, against the single-process layer."""
    cases = [case for case in FP8_CASES if case[2] is not None]
    errors = assert_all_ok(run_on_ranks(fp8_parity_scenario, 2, cases, _seed(), "nvlink"))
    assert all(len(e) == len(cases) for e in errors)


def graph_scenario(rank, world, device, seed, transport):
    """Capture two layers' forwards in one CUDA graph with no host sync (they share one
    nvlink workspace; the first starts gate_up as rows land, the second after all have);
    three replays with new data each equal the eager forward bitwise, and each layer
    equals the single-process layer on its input."""
    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    config = shrink("deepseek-v3", hidden_size=256, intermediate_size=128)
    moe = random_fused_moe(config, seed, dtype=torch.bfloat16, device=device)
    layers = [ExpertParallelMoE.from_config(config, dtype=torch.bfloat16, device=device,
                                            transport=transport, max_tokens_per_rank=64,
                                            seed=seed) for _ in range(2)]
    layers[1].early_gate_up = False
    static_x = torch.randn(40 + 8 * rank, config.hidden_size, device=device, dtype=torch.bfloat16)

    def step():
        middle = layers[0](static_x)
        return middle, layers[1](middle)

    with torch.no_grad():
        torch.cuda.set_sync_debug_mode("error")  # the warm-up forward and the capture
        graph, (static_middle, static_out) = capture(step)
        torch.cuda.set_sync_debug_mode("default")
        errors = []
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            errors += [rel_l2(static_middle, moe(static_x)), rel_l2(static_out, moe(static_middle))]
            torch.cuda.set_sync_debug_mode("error")
            eager_middle, eager_out = step()
            torch.cuda.set_sync_debug_mode("default")
            assert torch.equal(eager_middle, static_middle) and torch.equal(eager_out, static_out)
        for layer in layers:
            layer.check()  # after replays: the documented call, nothing failed
    assert max(errors) <= 1e-2, errors
    return errors


@needs_two_gpus
@pytest.mark.parametrize("transport", ["nvlink", "all_to_all"])
def test_gpu_graph_replay_without_host_sync(transport):
    assert_all_ok(run_on_ranks(graph_scenario, 2, _seed(), transport))


def device_poison_scenario(rank, world, device, seed):
    """NCCL with fixed buffers: no host sync in any forward, failures included. Ranks
    calling two layers in different orders get NaN outputs and check() raises on both;
    after reset() the layers are right; a forward issued on a second CUDA stream is
    ordered after the first (the stream rule)."""
    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    config = shrink("qwen3-30b-a3b")
    moe = random_fused_moe(config, seed, device=device)
    layers = [ExpertParallelMoE.from_config(config, device=device, transport="all_to_all",
                                            max_tokens_per_rank=32, seed=seed) for _ in range(2)]
    x = torch.randn(9 + rank, config.hidden_size, device=device)
    with torch.no_grad():
        torch.cuda.set_sync_debug_mode("error")
        outs = [layers[i](x) for i in ([0, 1] if rank == 0 else [1, 0])]
        torch.cuda.set_sync_debug_mode("default")
        assert all(bool(out.isnan().all()) for out in outs)
        for layer in layers:
            with pytest.raises(RuntimeError, match="ran call 1 of layer"):
                layer.check()
            layer.reset()
        side = torch.cuda.Stream()
        first = layers[0](x)
        with torch.cuda.stream(side):
            second = layers[0](x)  # waits for the first forward (an event, no host sync)
        torch.cuda.current_stream().wait_stream(side)
        for out in (first, second):
            assert rel_l2(out, moe(x)) <= 1e-5
        layers[0].check()
    return True


@needs_two_gpus
def test_gpu_failures_poison_without_host_sync_and_check_raises():
    assert_all_ok(run_on_ranks(device_poison_scenario, 2, _seed()))


def nvlink_history_scenario(rank, world, device, seed):
    """Nothing depends on host call history (item 4): rank 0 replays a graph holding ONE
    forward (an odd count) while rank 1 runs the same forwards eagerly, then they swap;
    every output equals the single-process layer."""
    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    config = shrink("qwen3-30b-a3b", hidden_size=256, intermediate_size=128)
    moe = random_fused_moe(config, seed, dtype=torch.bfloat16, device=device)
    layer = ExpertParallelMoE.from_config(config, dtype=torch.bfloat16, device=device,
                                          transport="nvlink", max_tokens_per_rank=64, seed=seed)
    static_x = torch.randn(17 + rank, config.hidden_size, device=device, dtype=torch.bfloat16)
    errors = []
    with torch.no_grad():
        graph, static_out = capture(lambda: layer(static_x))  # warm-up + capture: 2 forwards
        for step in range(6):
            static_x.copy_(torch.randn_like(static_x))
            replaying = (rank == 0) == (step < 3)
            if replaying:
                graph.replay()
                out = static_out
            else:
                out = layer(static_x)
            errors.append(rel_l2(out, moe(static_x)))
        layer.check()
    assert max(errors) <= 1e-2, errors
    return errors


@needs_two_gpus
def test_gpu_nvlink_replays_and_eager_forwards_mix_across_ranks():
    assert_all_ok(run_on_ranks(nvlink_history_scenario, 2, _seed()))


def nvlink_failure_scenario(rank, world, device, seed):
    """nvlink: rank 1 stalls past rank 0's 1 s time-out (device clock): both outputs are
    NaN, check() raises on both (rank 0: timed out waiting for rank 1; rank 1: rank 0
    failed), a queued forward ends at once; reset() makes the layer right again."""
    import time

    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    config = shrink("qwen3-30b-a3b")
    moe = random_fused_moe(config, seed, device=device)
    layer = ExpertParallelMoE.from_config(config, device=device, transport="nvlink",
                                          max_tokens_per_rank=32, seed=seed, timeout=1.0)
    x = torch.randn(9 + rank, config.hidden_size, device=device)
    with torch.no_grad():
        assert rel_l2(layer(x), moe(x)) <= 1e-5
        torch.cuda.synchronize()
        if rank == 1:
            time.sleep(3.0)
        out = layer(x)
        torch.cuda.synchronize()
        start = time.monotonic()
        queued = layer(x)  # the workspace failed: its waits end at once
        torch.cuda.synchronize()
        assert time.monotonic() - start < 0.5
        assert bool(out.isnan().all()) and bool(queued.isnan().all())
        expected = "timed out waiting for rank 1" if rank == 0 else "rank 0 has failed"
        with pytest.raises(RuntimeError, match=expected):
            layer.check()
        layer.reset()
        assert rel_l2(layer(x), moe(x)) <= 1e-5
        layer.check()
    return True


@needs_two_gpus
def test_gpu_nvlink_timeout_poisons_both_ranks_and_reset_recovers():
    assert_all_ok(run_on_ranks(nvlink_failure_scenario, 2, _seed()))


def _check_raises(layer, pattern) -> str:
    """layer.check() raises an error matching ``pattern`` (returned); the failure shows
    the state."""
    values = layer.protocol_state.tolist()
    try:
        layer.check()
    except RuntimeError as error:
        assert re.search(pattern, str(error)), f"{error} (state {values})"
        return str(error)
    raise AssertionError(f"check() did not raise; state {values}")


def nvlink_header_scenario(rank, world, device, seed):
    """nvlink carries each forward's header (item 1): two layers of one shape (one
    workspace) called in different orders make both outputs NaN and check() raise for
    both layers on every rank (the layer that saw the failure directly, the other one
    quoting the workspace's record; reset() recovers). A rank that read the other's
    header names both sides; a rank whose peer had already failed and moved on (its
    flag then says so: with ranks time-sliced on one GPU this happens) names the failed
    peer. Returns the messages (the test wants both sides named on some rank). A rank
    that rejects its input raises it, its peer's output is NaN and check() names that
    rank, and the next forwards are right without a reset."""
    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    config = shrink("qwen3-30b-a3b")
    moes = [random_fused_moe(config, seed + i, device=device) for i in range(2)]
    layers = [ExpertParallelMoE.from_config(config, device=device, transport="nvlink",
                                            max_tokens_per_rank=32, seed=seed + i)
              for i in range(2)]
    x = torch.randn(9 + rank, config.hidden_size, device=device)

    def lockstep():
        for layer, moe in zip(layers, moes):
            assert rel_l2(layer(x), moe(x)) <= 1e-5
            layer.check()

    with torch.no_grad():
        lockstep()
        order = [0, 1] if rank == 0 else [1, 0]
        outs = [layers[i](x) for i in order]
        assert all(bool(out.isnan().all()) for out in outs)
        other = 1 - rank
        messages = [_check_raises(layer, f"while rank {other} ran call|rank {other} has failed")
                    for layer in layers]
        for layer in layers:
            layer.reset()
        lockstep()
        if rank == 1:
            with pytest.raises(ValueError, match="max_tokens_per_rank"):
                layers[0](torch.randn(33, config.hidden_size, device=device))
            layers[0].check()  # it raised its own error; no peer failed
        else:
            assert bool(layers[0](x).isnan().all())
            with pytest.raises(RuntimeError, match="rank 1 rejected its input"):
                layers[0].check()
        lockstep()
    return messages


@needs_two_gpus
def test_gpu_nvlink_headers_catch_layer_order_and_carry_a_rejected_input():
    messages = sum(assert_all_ok(run_on_ranks(nvlink_header_scenario, 2, _seed())), [])
    assert any(re.search(r"ran call \d+ of layer \d+ while rank \d ran call \d+ of layer", m)
               for m in messages), messages


def nvlink_token_counts_scenario(rank, world, device, seed):
    """The nvlink dispatch stores each forward's routed rows only (ids and weights
    included) and the combine pulls the partial sums from the owners' buffers: forwards whose token
    counts rise and fall (0 included; shorter after longer, the rows past them then hold
    no token), gate_up started as the rows land and after all have, each equal the
    single-process layer."""
    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

    _poison_empty()
    config = shrink("deepseek-v3", hidden_size=256, intermediate_size=128)
    moe = random_fused_moe(config, seed, dtype=torch.bfloat16, device=device)
    layers = [ExpertParallelMoE.from_config(config, dtype=torch.bfloat16, device=device,
                                            transport="nvlink", max_tokens_per_rank=64,
                                            seed=seed) for _ in range(2)]
    layers[1].early_gate_up = False
    errors = []
    for i, count in enumerate([64, 3, 0, 40 + rank, 1, 64 - 7 * rank]):
        torch.manual_seed(seed + 31 * i + rank)
        x = torch.randn(count, config.hidden_size, device=device, dtype=torch.bfloat16)
        for layer in layers:
            errors.append(_check_against_single_process(layer, moe, x, 1e-2))
    for layer in layers:
        layer.check()
    return errors


@needs_two_gpus
def test_gpu_nvlink_moves_each_forwards_tokens_only():
    assert_all_ok(run_on_ranks(nvlink_token_counts_scenario, 2, _seed()))
