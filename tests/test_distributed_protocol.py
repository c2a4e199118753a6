"""The contract of ExpertParallelMoE (``moe_ops.distributed.protocol``): every forward is
right on every rank or raises on every rank, whatever one rank does wrong.

CPU: gloo ranks, the Triton interpreter, a tiny layer (H=16, 4 experts) and a few tokens,
``transport="all_to_all"`` with and without ``max_tokens_per_rank``. One process group
runs every case of a buffer mode in turn (spawning ranks costs more than the cases); each
case ends with the layers right again (after ``reset()`` where the failure is sticky).
"""
from __future__ import annotations

import functools
import os
import time
import traceback

import pytest
import torch

from distributed_harness import run_on_ranks, use_gpus
from helpers import rel_l2

SEED = 1234
CAPACITY = 4
TOL = 1e-5


def tiny_config(world: int):
    from dataclasses import replace

    from moe_ops.configs import shrink

    return replace(shrink("mixtral-8x7b", hidden_size=16, intermediate_size=16),
                   num_experts=2 * world)


def _nth(flags, i):
    return flags[i] if isinstance(flags, tuple) else flags


class Rig:
    """Layers A, B, ... (different weights) on this rank, one input each and the
    single-process output for it; ``step`` runs one forward and says what happened.
    ``fixed``: whether the layers have a fixed capacity, for all or (a tuple) each."""

    def __init__(self, rank, world, device, fixed, layers=2, timeout=None):
        from moe_ops.distributed import ExpertParallelMoE, random_fused_moe

        config = tiny_config(world)
        self.rank, self.config, self.device = rank, config, device
        generator = torch.Generator().manual_seed(SEED + rank)
        self.x = torch.randn(2 + rank, config.hidden_size, generator=generator).to(device)
        self.layers, self.expected = [], []
        for i in range(layers):
            self.layers.append(ExpertParallelMoE.from_config(
                config, device=device, transport="all_to_all", seed=SEED + i, timeout=timeout,
                max_tokens_per_rank=CAPACITY if _nth(fixed, i) else None))
            with torch.no_grad():
                self.expected.append(random_fused_moe(config, SEED + i, device=device)(self.x))

    def step(self, i: int, x=None):
        """("ok", relative error) or ("error", "Type: message")."""
        try:
            with torch.no_grad():
                out = self.layers[i](self.x if x is None else x)
            return ("ok", rel_l2(out, self.expected[i]) if x is None else None)
        except Exception as error:  # noqa: BLE001  (the parent checks the message)
            return ("error", f"{type(error).__name__}: {error}")

    def reset(self):
        for layer in self.layers:
            layer.reset()

    def lockstep(self, steps=1):
        return [self.step(i) for _ in range(steps) for i in range(len(self.layers))]


# -- the cases (run on every rank; each returns what the parent checks) ----------------

SEQUENCES = {  # per rank: the layers called, up to and including the first failing call
    "extra_call": ([0, 0], [0, 1]),     # rank 0 adds a call of A: its 2nd A meets B
    "skipped_call": ([0, 1], [0, 0]),   # rank 1 skips B: rank 0's B meets its 2nd A
    "other_order": ([0, 1], [1, 0]),    # A then B against B then A
}


def case_sequence(rig, name):
    if name == "other_order_3":  # ranks 0 and 1: A then B; rank 2: B then A
        steps = [rig.step(1 if rig.rank == 2 else 0)]
    else:
        steps = [rig.step(i) for i in SEQUENCES[name][rig.rank]]
    rig.reset()
    return dict(steps=steps, after=rig.lockstep())


def case_new_group(rig):
    """After a sticky failure (the ranks call A and B in different orders), before any
    reset: a new layer on a new process group works, and the failed layers still refuse
    until reset()."""
    import torch.distributed as dist

    from moe_ops.distributed import ExpertParallelMoE

    failed = [rig.step(i) for i in SEQUENCES["other_order"][rig.rank]]
    group = dist.new_group(list(range(dist.get_world_size())))
    fresh = ExpertParallelMoE.from_config(rig.config, group=group, device=rig.device,
                                          transport="all_to_all", seed=SEED,
                                          max_tokens_per_rank=rig.layers[0].max_tokens_per_rank)
    with torch.no_grad():
        fresh_errors = [rel_l2(fresh(rig.x), rig.expected[0]) for _ in range(2)]
    refused = rig.step(0)
    rig.reset()
    return dict(failed=failed, fresh=fresh_errors, refused=refused, after=rig.lockstep())


def case_counter_2_31(rig):
    """Counts cross 2**31 untruncated: right; then counts equal in their low 32 bits but
    2**32 apart are told apart."""
    from moe_ops.distributed import protocol as P

    layer = rig.layers[0]
    layer.protocol_state[P.COUNT] = 2**31 - 2
    crossing = [rig.step(0) for _ in range(2)]
    count = int(layer.protocol_state[P.COUNT])
    layer.protocol_state[P.COUNT] = 2**31 + 5 + (2**32 if rig.rank == 1 else 0)
    mismatch = rig.step(0)
    rig.reset()
    return dict(crossing=crossing, count=count, mismatch=mismatch, after=rig.lockstep())


def case_counter_2_63(rig):
    """The last count 2**63 - 1 works; the next call fails on every rank, no wrap."""
    from moe_ops.distributed import protocol as P

    layer = rig.layers[0]
    layer.protocol_state[P.COUNT] = P.INT64_MAX - 1
    last = rig.step(0)
    exhausted = rig.step(0)
    count = int(layer.protocol_state[P.COUNT])
    again = rig.step(0)  # failed until reset: raises at once
    check = _raises(layer.check)
    rig.reset()
    return dict(last=last, exhausted=exhausted, count=count, again=again, check=check,
                after=rig.lockstep())


def bad_input(rig, kind):
    H = rig.config.hidden_size
    if kind == "hidden":
        return torch.randn(3, H + 1, device=rig.device)
    if kind == "dtype":
        return torch.randn(3, H, device=rig.device, dtype=torch.float64)
    if kind == "device":  # a meta tensor for a CPU layer (never reaches the op's real code)
        return torch.randn(3, H, device="meta")
    if kind == "tokens":
        return torch.randn(CAPACITY + 1, H, device=rig.device)
    if kind == "list":  # not a tensor at all
        return [[0.5] * H] * 3
    raise ValueError(kind)


def case_bad_input(rig, kind):
    """The README's scenario: rank 1 rejects one input, the program catches the error and
    goes on; every later forward must be right on every rank (no reset)."""
    bad = rig.step(0, bad_input(rig, kind) if rig.rank == 1 else None)
    return dict(bad=bad, after=rig.lockstep(), check=_raises(rig.layers[0].check))


def case_bad_input_unread(rig, kind):
    """The bad-input scenario on the CUDA fixed-buffer path (no host reads): rank 1 raises
    its own error; rank 0's output is NaN and its check() names rank 1; rank 1's check()
    has nothing to add (no peer failed), and later forwards are right."""
    layer = rig.layers[0]
    layer._raise_after_forward = False
    try:
        if rig.rank == 1:
            bad = rig.step(0, bad_input(rig, kind))
        else:
            with torch.no_grad():
                bad = ("nan", bool(layer(rig.x).isnan().all()))
        check = _raises(layer.check)
        after = rig.lockstep()
        clean = _raises(layer.check)
    finally:
        layer._raise_after_forward = True
    return dict(bad=bad, check=check, after=after, clean=clean)


def case_exception_inside(rig, where):
    """An exception on rank 1 inside the forward, before (route) or after (the expert
    GEMMs of the received rows) the dispatch left."""
    import moe_ops.distributed.layer as layer_module

    name = {"before_dispatch": "route", "after_dispatch": "fused_experts_impl"}[where]
    original = getattr(layer_module, name)

    def failing(*args, **kwargs):
        raise RuntimeError(f"injected failure in {name}")

    if rig.rank == 1:
        setattr(layer_module, name, failing)
    try:
        failed = rig.step(0)
    finally:
        setattr(layer_module, name, original)
    return dict(failed=failed, after=rig.lockstep(), check=_raises(rig.layers[0].check))


def case_timeout(rig):
    """A 0.5 s stall is waited for. Then rank 1 stalls 3.5 s; rank 0 gives up after its
    2 s time-out and raises, rank 1 is told; reset() on both makes the layer right."""
    if rig.rank == 1:
        time.sleep(0.5)
    waited = rig.step(0)
    if rig.rank == 1:
        time.sleep(3.5)
    start = time.monotonic()
    late = rig.step(0)
    seconds = time.monotonic() - start
    refused = rig.step(0)  # failed until reset: raises at once, moves nothing
    rig.reset()
    return dict(waited=waited, late=late, seconds=seconds, refused=refused, after=rig.lockstep())


def case_nan_and_check(rig):
    """The CUDA fixed-buffer path, on CPU: nothing raises in the forward; a failure turns
    the outputs into NaN and check() raises on every rank."""
    for layer in rig.layers:
        layer._raise_after_forward = False
    try:
        outs = []
        for i in ([0, 1] if rig.rank == 0 else [1, 0]):
            with torch.no_grad():
                outs.append(rig.layers[i](rig.x))
        nan = [bool(out.isnan().all()) for out in outs]
        checks = [_raises(layer.check) for layer in rig.layers]
        still = _raises(rig.layers[0].check)  # sticky: raises until reset
        rig.reset()
        after = rig.lockstep()
        clean = _raises(rig.layers[0].check)
    finally:
        for layer in rig.layers:
            layer._raise_after_forward = True
    return dict(nan=nan, checks=checks, still=still, after=after, clean=clean)


def case_deferred_raise(rig):
    """The CUDA path without max_tokens_per_rank, on CPU: rank 1 fails after the count
    exchange; rank 0's output is NaN (no host read); the next forward raises on every
    rank at its count exchange, before any token moves; the one after is right."""
    import moe_ops.distributed.layer as layer_module

    rig.layers[0]._raise_after_forward = False
    original = layer_module.fused_experts_impl
    if rig.rank == 1:
        layer_module.fused_experts_impl = lambda *a, **k: (_ for _ in ()).throw(
            RuntimeError("injected failure in fused_experts_impl"))
    try:
        with torch.no_grad():
            failed = rig.step(0) if rig.rank == 1 else ("ok", bool(rig.layers[0](rig.x).isnan().all()))
    finally:
        layer_module.fused_experts_impl = original
    try:
        told = rig.step(0)
        after = rig.lockstep()
    finally:
        rig.layers[0]._raise_after_forward = True
    return dict(failed=failed, told=told, after=after)


def case_reset_other_layer(rig):
    """Ranks resetting different layers: every rank raises (and nothing hangs)."""
    return _raises(rig.layers[rig.rank % 2].reset)


def _raises(fn):
    try:
        fn()
        return None
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"


CASE_FUNCTIONS = {"sequence": case_sequence, "new_group": case_new_group,
                  "counter_2_31": case_counter_2_31,
                  "counter_2_63": case_counter_2_63, "bad_input": case_bad_input,
                  "bad_input_unread": case_bad_input_unread,
                  "exception_inside": case_exception_inside, "timeout": case_timeout,
                  "nan_and_check": case_nan_and_check, "deferred_raise": case_deferred_raise,
                  "reset_other_layer": case_reset_other_layer}


def contract_suite(rank, world, device, cases):
    """Every case in turn on one group, on rigs shared by the cases of a buffer mode (each
    case leaves its layers right); a case that raises is reported, not fatal."""
    rigs, results = {}, {}
    for case in cases:
        fixed, name, *args = case
        timeout = 2.0 if name == "timeout" else None
        key = (fixed, timeout)
        try:
            if key not in rigs:
                rigs[key] = Rig(rank, world, device, fixed, timeout=timeout)
            results[case] = CASE_FUNCTIONS[name](rigs[key], *args)
        except BaseException as error:  # noqa: BLE001
            results[case] = ("crashed", f"{type(error).__name__}: {error}", traceback.format_exc())
    return results


# -- the parent: one run per world size, one test per case -------------------------------
# Mechanisms shared by both buffer modes are tested in one of them; those that differ
# (where the header travels, where the failure raises) in both.

CASES = {
    2: [(False, "sequence", "extra_call"), (True, "sequence", "skipped_call"),
        (False, "sequence", "other_order"), (True, "sequence", "other_order"),
        (True, "counter_2_31"), (False, "counter_2_63"), (True, "counter_2_63"),
        (False, "bad_input", "hidden"), (False, "bad_input", "device"),
        (False, "bad_input", "list"),
        (True, "bad_input", "dtype"), (True, "bad_input", "tokens"),
        (True, "bad_input_unread", "tokens"),
        (True, "new_group"),
        (False, "exception_inside", "before_dispatch"), (False, "exception_inside", "after_dispatch"),
        (True, "exception_inside", "before_dispatch"), (True, "exception_inside", "after_dispatch"),
        (False, "timeout"), (True, "timeout"), (True, "nan_and_check"),
        (False, "deferred_raise"), (True, "reset_other_layer")],
    3: [(True, "sequence", "other_order_3"), (True, "bad_input", "tokens"),
        (False, "bad_input", "hidden"), (False, "exception_inside", "after_dispatch")],
}


@functools.lru_cache(maxsize=None)
def _suite(world: int):
    """Each rank's results by case (or the run's failure), computed once per module."""
    return run_on_ranks(contract_suite, world, CASES[world], deadline_s=300)


def _results(world, case):
    out = []
    for rank, (status, value, tb) in enumerate(_suite(world)):
        assert status == "ok", f"rank {rank}: {status} {value}\n{tb}"
        result = value[case]
        assert not (isinstance(result, tuple) and result and result[0] == "crashed"), \
            f"rank {rank}: {result[1]}\n{result[2]}"
        out.append(result)
    return out


def _right(steps):
    return all(status == "ok" and (err is None or err <= TOL) for status, err in steps)


def _assert_peer_told_then_all_right(ranks, step, told):
    """Rank 0's ``step`` raised saying ``told`` (rank 1's failure), and afterwards every
    rank's forwards are right with nothing left for check()."""
    status, message = ranks[0][step]
    assert status == "error" and told in message, message
    for rank, result in enumerate(ranks):
        assert _right(result["after"]) and result["check"] is None, (rank, result)


def _cases(world, name):
    """The cases of one kind, in one xdist group: ``_suite`` runs every case at once, and
    a second worker would run it all again (``make test`` distributes by group)."""
    return [pytest.param(case, id="-".join(
        ["max_tokens" if case[0] else "sized_per_call"] + [str(a) for a in case[2:]]),
        marks=pytest.mark.xdist_group(f"contract_suite_{world}"))
        for case in CASES[world] if case[1] == name]


pytestmark = pytest.mark.skipif(use_gpus(2), reason="the CPU contract suite (gloo)")


@pytest.mark.parametrize("case", _cases(2, "sequence"))
def test_identity_and_sequence_mismatch_raises_on_every_rank(case):
    fail_at = 0 if case[2] == "other_order" else 1
    for rank, result in enumerate(_results(2, case)):
        steps = result["steps"]
        assert _right(steps[:fail_at]), (rank, steps)
        status, message = steps[fail_at]
        assert status == "error" and message.startswith("ExpertParallelError"), (rank, message)
        assert f"rank {rank} ran call" in message and f"rank {1 - rank} ran call" in message
        assert "of layer" in message and "reset()" in message, message
        assert _right(result["after"]), (rank, result["after"])


@pytest.mark.parametrize("case", _cases(2, "counter_2_31"))
def test_counter_crosses_2_31_and_compares_64_bits(case):
    for rank, result in enumerate(_results(2, case)):
        assert _right(result["crossing"]) and result["count"] == 2**31, result
        status, message = result["mismatch"]
        assert status == "error", message
        mine, theirs = 2**31 + 6 + 2**32 * rank, 2**31 + 6 + 2**32 * (1 - rank)
        assert f"ran call {mine} of layer" in message and f"ran call {theirs} of it" in message
        assert _right(result["after"]), result


@pytest.mark.parametrize("case", _cases(2, "counter_2_63"))
def test_counter_stops_at_2_63_without_wrapping(case):
    for rank, result in enumerate(_results(2, case)):
        assert _right([result["last"]]), result
        status, message = result["exhausted"]
        assert status == "error" and "reached 2**63 - 1" in message, result
        assert result["count"] == 2**63 - 1
        assert result["again"][0] == "error" and "reset()" in result["again"][1]
        assert result["check"] is not None and "reset()" in result["check"]
        assert _right(result["after"]), result


BAD_INPUT_ERRORS = {"hidden": "ValueError: hidden_states must be",
                    "dtype": "TypeError: hidden_states has dtype",
                    "device": "ValueError: hidden_states is on meta",
                    "tokens": "ValueError: hidden_states has 5 tokens",
                    "list": "ValueError: hidden_states must be [..., hidden="}


@pytest.mark.parametrize("case", _cases(2, "bad_input"))
def test_bad_input_on_one_rank_raises_everywhere_then_later_forwards_are_right(case):
    ranks = _results(2, case)
    bad = ranks[1]["bad"]
    assert bad[0] == "error" and bad[1].startswith(BAD_INPUT_ERRORS[case[2]]), bad
    assert case[2] != "list" or bad[1].endswith("got list"), bad
    _assert_peer_told_then_all_right(ranks, "bad", "rank 1 rejected its input")


@pytest.mark.parametrize("case", _cases(2, "new_group"))
def test_after_a_failure_a_new_layer_on_a_new_group_works(case):
    for result in _results(2, case):
        assert all(status == "error" for status, _ in result["failed"]), result
        assert max(result["fresh"]) <= TOL, result
        assert result["refused"][0] == "error" and "reset()" in result["refused"][1], result
        assert _right(result["after"]), result


@pytest.mark.parametrize("case", _cases(2, "bad_input_unread"))
def test_bad_input_without_host_reads_blames_the_right_rank(case):
    ranks = _results(2, case)
    assert ranks[1]["bad"][0] == "error" and "max_tokens_per_rank" in ranks[1]["bad"][1], ranks[1]
    assert ranks[0]["bad"] == ("nan", True), ranks[0]
    check = ranks[0]["check"]
    assert check is not None and "rank 1 rejected its input" in check, ranks[0]
    assert ranks[1]["check"] is None, ranks[1]  # it raised its own error; no peer failed
    for result in ranks:
        assert _right(result["after"]) and result["clean"] is None, result


@pytest.mark.parametrize("case", _cases(2, "exception_inside"))
def test_exception_inside_forward_tells_the_peers(case):
    ranks = _results(2, case)
    assert ranks[1]["failed"][0] == "error" and "injected failure" in ranks[1]["failed"][1]
    _assert_peer_told_then_all_right(ranks, "failed", "rank 1 raised inside the forward")


@pytest.mark.parametrize("case", _cases(2, "timeout"))
def test_timeout_raises_on_every_rank_and_reset_recovers(case):
    for rank, result in enumerate(_results(2, case)):
        assert _right([result["waited"]]), result
        status, message = result["late"]
        assert status == "error", result
        if rank == 0:
            assert message.startswith("ExpertParallelTimeout") and "2.0 s" in message, message
            assert result["seconds"] < 3.5, result
        else:
            assert "rank 0 timed out" in message, message
        assert result["refused"][0] == "error" and "reset()" in result["refused"][1], result
        assert _right(result["after"]), result


@pytest.mark.parametrize("case", _cases(2, "nan_and_check"))
def test_without_host_reads_outputs_are_nan_and_check_raises(case):
    for result in _results(2, case):
        assert result["nan"] == [True, True], result
        assert all(c is not None and "ExpertParallelError" in c for c in result["checks"]), result
        assert result["still"] is not None
        assert _right(result["after"]) and result["clean"] is None, result


@pytest.mark.parametrize("case", _cases(2, "deferred_raise"))
def test_failure_after_count_exchange_raises_everywhere_at_next_forward(case):
    ranks = _results(2, case)
    assert ranks[1]["failed"][0] == "error" and "injected" in ranks[1]["failed"][1], ranks[1]
    assert ranks[0]["failed"] == ("ok", True), ranks[0]  # NaN, nothing raised yet
    assert "rank 1 raised inside the forward" in ranks[0]["told"][1], ranks[0]
    assert "rank 0 reports a failure of an earlier call" in ranks[1]["told"][1], ranks[1]
    for rank, result in enumerate(ranks):
        assert result["told"][0] == "error" and _right(result["after"]), (rank, result)


@pytest.mark.parametrize("case", _cases(2, "reset_other_layer"))
def test_reset_of_different_layers_raises_on_every_rank(case):
    for result in _results(2, case):
        assert result is not None and "reset different layers" in result, result


def test_three_ranks_every_rank_raises():
    """One rank of three calls the layers in another order / rejects its input / fails
    inside the forward: both others raise, naming it, and later forwards are right."""
    for rank, result in enumerate(_results(3, CASES[3][0])):
        status, message = result["steps"][0]
        assert status == "error" and "ExpertParallelError" in message, (rank, message)
        assert _right(result["after"]), (rank, result)
    for case in CASES[3][1:]:
        ranks = _results(3, case)
        key = "bad" if case[1] == "bad_input" else "failed"
        expected = "rank 1 rejected its input" if key == "bad" else "rank 1 raised inside"
        assert ranks[1][key][0] == "error", ranks[1]
        for rank in (0, 2):
            assert expected in ranks[rank][key][1], (case, rank, ranks[rank])
        for rank in range(3):
            assert _right(ranks[rank]["after"]), (case, rank, ranks[rank])


# -- a sleepy rank: random stalls between and inside layers, many forwards -------------

STRESS_FORWARDS = 100
STRESS_TIMEOUT_S = 1.5


def sleepy_rank(rank, world, device, seed):
    """Both ranks call the same random sequence of two layers, one with token counts
    exchanged per call, one with a fixed capacity; rank 1 stalls at random between layers
    and inside them (in the expert GEMMs of the received rows), now and then past the
    time-out. Per forward: ("ok", error) or ("error", message), and whether this rank
    stalled past the time-out just before."""
    import random

    import moe_ops.distributed.layer as layer_module

    rig = Rig(rank, world, device, (False, True), timeout=STRESS_TIMEOUT_S)
    order, stalls = random.Random(seed), random.Random(seed + 1 + rank)
    original = layer_module.fused_experts_impl

    def drowsy(*args, **kwargs):
        time.sleep(stalls.uniform(0, 0.02))
        return original(*args, **kwargs)

    if rank == 1:
        layer_module.fused_experts_impl = drowsy
    steps = []
    try:
        for _ in range(STRESS_FORWARDS):
            long_stall = order.random() < 0.03  # the same forwards on both ranks
            if rank == 1:
                time.sleep(STRESS_TIMEOUT_S + 1.0 if long_stall else stalls.uniform(0, 0.03))
            result = rig.step(order.randrange(len(rig.layers)))
            steps.append((*result, long_stall))
            if result[0] == "error":
                rig.reset()  # collective: every rank saw the error in this forward
    finally:
        layer_module.fused_experts_impl = original
    return steps


def test_sleepy_rank_every_forward_right_or_an_error_everywhere():
    seed = int.from_bytes(os.urandom(4), "little")
    reports = run_on_ranks(sleepy_rank, 2, seed, deadline_s=400)
    for rank, (status, value, tb) in enumerate(reports):
        assert status == "ok", f"seed {seed} rank {rank}: {status} {value}\n{tb}"
    steps0, steps1 = reports[0][1], reports[1][1]
    assert len(steps0) == len(steps1) == STRESS_FORWARDS
    for k, ((status0, value0, long0), (status1, value1, _)) in enumerate(zip(steps0, steps1)):
        assert status0 == status1, f"seed {seed} forward {k}: rank 0 {value0}, rank 1 {value1}"
        if status0 == "ok":
            assert value0 <= TOL and value1 <= TOL, (seed, k, value0, value1)
        else:
            assert long0, f"seed {seed} forward {k}: an error without a stall past the time-out"
    # Short stalls are waited for: only the long ones may fail.
    assert sum(status == "ok" for status, _, _ in steps0) >= STRESS_FORWARDS - sum(
        long for _, _, long in steps0)


def test_both_transports_implement_the_declared_interface():
    """The layer calls only ``transport.Transport``'s steps: both transports implement all
    of them, and a transport without a count exchange says what it needs."""
    import inspect

    from moe_ops.distributed.all_to_all import AllToAllTransport
    from moe_ops.distributed.nvlink import NVLinkTransport
    from moe_ops.distributed.transport import Transport

    for transport in (AllToAllTransport, NVLinkTransport):
        assert issubclass(transport, Transport) and not inspect.isabstract(transport)
    with pytest.raises(ValueError, match="needs max_tokens_per_rank"):
        NVLinkTransport.exchange_counts(object.__new__(NVLinkTransport), None, None)


def test_a_failed_nvlink_workspace_poisons_its_other_layers_and_says_why(device):
    """The layers of one shape share an NVLink workspace: once it failed, the next forward
    of a layer that had not failed records SHARED (sticky, poisoned) at its epoch bump (the
    plan's launch, before it reserves rows), and its check() message quotes the
    workspace's first failure."""
    from moe_ops.distributed import protocol as P
    from moe_ops.distributed.plan import plan_dispatch

    T, K, H, W, E_l, C = 3, 2, 8, 2, 2, 4
    for failed in (0, 1):
        epoch = torch.tensor([5], device=device)
        state = P.new_state(device)
        state[P.COUNT] = 7
        fills = torch.zeros(W, 1, dtype=torch.int32, device=device)
        addresses = torch.tensor([fills[d].data_ptr() for d in range(W)], dtype=torch.int64,
                                 device=device)
        ids = torch.stack([torch.randperm(W * E_l)[:K] for _ in range(T)]).int().to(device)
        plan_dispatch(torch.randn(T, H, device=device), torch.rand(T, K, device=device), ids,
                      E_l, W, C, reserve=addresses, state=state,
                      bump=(epoch, torch.tensor([failed], device=device)))
        values = state.tolist()
        assert int(epoch) == 6 and values[P.COUNT] == 8
        assert int(fills.sum()) == int(sum(((ids // E_l) == d).any(1).sum() for d in range(W)))
        expected = (P.SHARED, 8, 1, 1) if failed else (P.NONE, 0, 0, 0)
        assert (values[P.CODE], values[P.CALL], values[P.STICKY], values[P.POISON]) == expected
    record = [0] * P.RECORD_WORDS
    record[P.CODE], record[P.PEER], record[P.CALL], record[P.PHASE] = (
        P.OTHER_LAYER, 1, 3, P.DISPATCH)
    record[P.GOT_LAYER], record[P.GOT_COUNT], record[P.RECORD_LAYER] = 12, 3, 11
    message = str(P.failure(values, 14, 0, record=record))
    assert "rank 0 ran call 8 of layer 14" in message
    assert "rank 0 ran call 3 of layer 11 while rank 1 ran call 3 of layer 12" in message
    assert "reset()" in message
