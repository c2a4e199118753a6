"""What a capacity costs the receiving rank: the expert compute of one expert-parallel
forward over a capacity-sized receive buffer against the same rows packed tight.

An expert-parallel rank with ``max_tokens_per_rank=C`` has a receive buffer of W*C rows;
over ``nvlink`` the senders fill its first rows (each reserves its block there) and the
rank knows on the device how many. Per (model, T, C), W ranks sending T tokens each, this
times the expert pipeline on the rank's E/W experts six ways (CUDA-graph replay, median)
and lists each launch's time (torch.profiler, L2 flushed), after checking that the real
rows agree:

    padded   ``fused_experts`` over the [W*C, H] buffer as a plain call sees it (tiles
             for W*C rows, every output row written)
    sparse   the same buffer with tiles and GEMM grids for T tokens, unrouted rows left
             unwritten (``skip_unrouted``), every row's ids still read
    layer    as ``ExpertParallelMoE`` computes it: sparse, and read up to the filled
             rows only (``num_rows``, on the device), with the second tile set for a
             buffer filled far past T (``second_tiles``, launched, idle here)
    one_set  the layer's call without that second tile set
    landing  the layer's call when gate_up starts on rows still landing (``Landing``):
             each gate_up tile (or, where fp8 tiles read e4m3 x, each program of x's
             quantisation) first checks the flags of its rows' sources (all raised
             here: what the check costs, not what the overlap hides)
    tight    the W*T real rows alone: what the capacity should cost at most

With ``--peer-tokens P`` the rank also receives the rows of peers with P tokens each
while it has T itself (ranks with different batches, as under data-parallel attention):
its layer call (tiles and grids for T, as the layer sizes them, and with
``--tile-tokens`` for other counts), that call without its second tile set, and the
tight call of the W*P rows received.

``landing / layer`` and ``layer / one_set`` are then measured again as the median of
``--ab`` alternating pairs of graph replays (one variant's timing right after the
other's, so that clock and thermal drift cancel): the costs of the early start and of
the idle second tile set, the numbers the layer's defaults rest on.

With ``--fp8 block`` (or ``channel``) the experts are fp8, quantised from the same bf16
weights, and variants compared within 5e-2 (tiles of other sizes may quantise the
activations differently).

One GPU is enough; run from the checkout root::

    python -m benchmarks.ep_receiver --models deepseek-v3 --tokens 1 128 --capacity 4096
"""
from __future__ import annotations

import argparse
import functools

import torch

import moe_ops
from moe_ops.fp8 import quantize_weight
from moe_ops.pipeline import Landing, fused_experts_impl
from moe_ops.reference import rel_l2
from tools.profiler import profile_kernels
from tools.timing import Timer
from tools.workloads import layer_config


def received_rows(num_tokens, capacity, world, top_k, local_experts, hidden, dtype, gen):
    """(x [W*C, H], weights, ids [W*C, K]) as a rank receives them: the first W*T rows are
    tokens with at least one local expert (each slot local with probability 1/W, the rest
    -1; distinct experts per token), the rows after them have ids -1."""
    rows, filled = world * capacity, world * num_tokens
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=gen)
    ids = torch.full((rows, top_k), -1, dtype=torch.int32, device="cuda")
    weights = torch.rand(rows, top_k, device="cuda", generator=gen)
    local = torch.rand(filled, top_k, device="cuda", generator=gen) < 1.0 / world
    local[:, 0] = True
    first = torch.randint(0, local_experts, (filled, 1), device="cuda", generator=gen)
    picked = (first + torch.arange(top_k, device="cuda")) % local_experts  # distinct per token
    ids[:filled] = torch.where(local, picked.int(), -1)
    return x, weights, ids


def crowded(name, t, peers, top_k, args, run, experts, hidden, gen, timer) -> None:
    """The layer's call expecting t tokens on a buffer filled by peers of ``peers`` tokens
    each (top_k ids per row), against the tight call of those rows (``run``: the rank's
    experts' ``fused_experts_impl``)."""
    x, w, ids = received_rows(peers, args.capacity, args.world, top_k, experts, hidden,
                              torch.bfloat16, gen)
    filled = args.world * peers
    counted = torch.tensor([filled], dtype=torch.int32, device="cuda")
    tight = [a[:filled].contiguous() for a in (x, w, ids)]
    calls = {f"layer tiles for {n}": functools.partial(
        run, x, w, ids, tile_tokens=n, skip_unrouted=True,
        num_rows=counted) for n in [t] + [n for n in args.tile_tokens if n != t]}
    calls["one set, tiles for t"] = functools.partial(
        run, x, w, ids, tile_tokens=t, skip_unrouted=True, num_rows=counted, second_tiles=False)
    calls["tight"] = functools.partial(run, *tight)
    times = {}
    for label, call in calls.items():
        error = rel_l2(call()[:filled], calls["tight"]())
        if not error <= args.tolerance:
            raise SystemExit(f"{name} T={t} peers={peers}: {label} rows differ by {error}")
        times[label] = timer.replayed(call)
        print(f"[{name} T={t} receiving {filled} rows {label}] {times[label]:.4f} ms")
        for kernel, us in profile_kernels(call, runs=5):
            print(f"    {kernel[:48]:48s} {us:9.1f} us")
    print(f"[{name} T={t} receiving {filled} rows] " + ", ".join(
        f"{label} / tight = {times[label] / times['tight']:.2f}x" for label in times))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 128])
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--ab", type=int, default=7, help="alternating pairs per comparison")
    p.add_argument("--peer-tokens", nargs="*", type=int, default=[],
                   help="also: receive W*P rows while expecting T (P >= T)")
    p.add_argument("--tile-tokens", nargs="*", type=int, default=[],
                   help="with --peer-tokens: also time the layer's call with tiles for these")
    p.add_argument("--fp8", choices=["block", "channel"],
                   help="the experts quantised to fp8 with this scheme's scales")
    args = p.parse_args(argv)
    # fp8 tiles of different sizes may quantise the activations differently
    args.tolerance = 5e-2 if args.fp8 else 1e-2
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.ep_receiver times GPU kernels: it needs CUDA")
    moe_ops.set_topk_ids_check(False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    timer = Timer(warmup_ms=5, rep_ms=20)
    for name in args.models:
        cfg = layer_config(name, True)
        experts = cfg.num_experts // args.world
        H, I, K = cfg.hidden_size, cfg.intermediate_size, cfg.top_k
        w_gate_up = torch.randn(experts, 2 * I, H, device="cuda", dtype=torch.bfloat16,
                                generator=gen) * H ** -0.5
        w_down = torch.randn(experts, H, I, device="cuda", dtype=torch.bfloat16,
                             generator=gen) * I ** -0.5
        run = functools.partial(fused_experts_impl, w_gate_up=w_gate_up, w_down=w_down)
        if args.fp8:
            (gate_up8, gate_up_scale), (down8, down_scale) = (
                quantize_weight(w, args.fp8) for w in (w_gate_up, w_down))
            run = functools.partial(fused_experts_impl, w_gate_up=gate_up8, w_down=down8,
                                    w_gate_up_scale=gate_up_scale, w_down_scale=down_scale)
        for t in args.tokens:
            x, w, ids = received_rows(t, args.capacity, args.world, K, experts, H,
                                      torch.bfloat16, gen)
            filled = args.world * t
            tight = [a[:filled].contiguous() for a in (x, w, ids)]
            times, outs = {}, {}
            sparse = dict(tile_tokens=t, skip_unrouted=True)
            counted = torch.tensor([filled], dtype=torch.int32, device="cuda")
            # Rank s's rows are block s of the filled rows; every source's flag is raised.
            sources = (torch.arange(x.shape[0], device="cuda") // max(t, 1)).clamp(
                max=args.world - 1).int()
            epoch = torch.ones(1, dtype=torch.int64, device="cuda")
            landed = Landing(sources, epoch.repeat(args.world), epoch, epoch - 1, epoch * 0,
                             10**10, torch.version.hip is not None)
            layer = dict(sparse, num_rows=counted)
            variants = (("padded", (x, w, ids), {}),
                        ("sparse", (x, w, ids), sparse),
                        ("layer", (x, w, ids), layer),
                        ("one_set", (x, w, ids), dict(layer, second_tiles=False)),
                        ("landing", (x, w, ids), dict(layer, landing=landed)),
                        ("tight", tight, {}))
            labels = [v[0] for v in variants if v[0] != "tight"]
            forwards = {}
            for label, (xs, ws, ids_), how in variants:
                def forward(xs=xs, ws=ws, ids_=ids_, how=how):
                    return run(xs, ws, ids_, **how)
                forwards[label] = forward
                outs[label] = forward()
                times[label] = timer.replayed(forward)
                print(f"[{name} T={t} C={args.capacity} W={args.world} {label}: "
                      f"{xs.shape[0]} rows] {times[label]:.4f} ms")
                for kernel, us in profile_kernels(forward, runs=5):
                    print(f"    {kernel[:48]:48s} {us:9.1f} us")
            for label in labels:  # the same sums
                error = rel_l2(outs[label][:filled], outs["tight"])
                if not error <= args.tolerance:
                    raise SystemExit(f"{name} T={t}: {label} rows differ from tight by {error}")
            print(f"[{name} T={t}] " + ", ".join(
                f"{label} / tight = {times[label] / times['tight']:.2f}x"
                for label in labels))
            for a, b in (("landing", "layer"), ("layer", "one_set")):
                pairs = sorted(timer.replayed(forwards[a]) / timer.replayed(forwards[b])
                               for _ in range(args.ab))
                print(f"[{name} T={t}] {a} / {b}, median of {args.ab} alternating pairs: "
                      f"{pairs[len(pairs) // 2]:.3f}x (range {pairs[0]:.3f}-{pairs[-1]:.3f})")
            for peers in (p for p in args.peer_tokens if t <= p <= args.capacity):
                crowded(name, t, peers, K, args, run, experts, H, gen, timer)


if __name__ == "__main__":
    main()
