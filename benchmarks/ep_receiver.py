"""What a capacity costs the receiving rank: the expert compute of one expert-parallel
forward over a capacity-padded receive buffer against the same rows packed tight.

An expert-parallel rank with ``max_tokens_per_rank=C`` receives W blocks of C rows; only
the first T rows of each block hold tokens (ids -1 after them). Per (model, T, C) this
times the expert pipeline on the rank's E/W experts three ways (CUDA-graph replay,
median) and lists each launch's time (torch.profiler, L2 flushed), after checking that
the real rows agree:

    padded   ``fused_experts`` over the [W*C, H] buffer as a plain call sees it (tiles
             for W*C rows, every output row written)
    layer    the same buffer as ``ExpertParallelMoE`` computes it (tiles and GEMM grids
             for T tokens, unrouted rows left unwritten)
    tight    the W*T real rows alone: what the padding should cost at most

One GPU is enough; run from the checkout root::

    python -m benchmarks.ep_receiver --models deepseek-v3 --tokens 1 128 --capacity 4096
"""
from __future__ import annotations

import argparse

import torch

import moe_ops
from moe_ops.pipeline import fused_experts_impl
from moe_ops.reference import rel_l2
from tools.profiler import profile_kernels
from tools.timing import Timer
from tools.workloads import layer_config


def received_blocks(num_tokens, capacity, world, top_k, local_experts, hidden, dtype, gen):
    """(x [W*C, H], weights, ids [W*C, K]) as a rank receives them: per block the first
    ``num_tokens`` rows are tokens with at least one local expert (each slot local with
    probability 1/W, the rest -1; distinct experts per token), the rows after them have
    ids -1."""
    rows = world * capacity
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype, generator=gen)
    ids = torch.full((world, capacity, top_k), -1, dtype=torch.int32, device="cuda")
    weights = torch.rand(world, capacity, top_k, device="cuda", generator=gen)
    draws = torch.rand(world, num_tokens, top_k, device="cuda", generator=gen)
    local = draws < 1.0 / world
    local[..., 0] = True
    first = torch.randint(0, local_experts, (world, num_tokens, 1), device="cuda", generator=gen)
    picked = (first + torch.arange(top_k, device="cuda")) % local_experts  # distinct per token
    ids[:, :num_tokens] = torch.where(local, picked.int(), -1)
    return x, weights.view(rows, top_k), ids.view(rows, top_k)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 128])
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args(argv)
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
        for t in args.tokens:
            x, w, ids = received_blocks(t, args.capacity, args.world, K, experts, H,
                                        torch.bfloat16, gen)
            tight = [a.view(args.world, args.capacity, -1)[:, :t].reshape(args.world * t, -1)
                     .contiguous() for a in (x, w, ids)]
            times, outs = {}, {}
            variants = (("padded", (x, w, ids), {}),
                        ("layer", (x, w, ids), dict(tile_tokens=t, skip_unrouted=True)),
                        ("tight", tight, {}))
            for label, (xs, ws, ids_), how in variants:
                def forward(xs=xs, ws=ws, ids_=ids_, how=how):
                    return fused_experts_impl(xs, ws, ids_, w_gate_up, w_down, **how)
                outs[label] = forward()
                times[label] = timer.replayed(forward)
                print(f"[{name} T={t} C={args.capacity} W={args.world} {label}: "
                      f"{xs.shape[0]} rows] {times[label]:.4f} ms")
                for kernel, us in profile_kernels(forward, runs=5):
                    print(f"    {kernel[:48]:48s} {us:9.1f} us")
            real = [o.view(args.world, -1, H)[:, :t].reshape(-1, H) for o in
                    (outs["padded"], outs["layer"])]
            for label, got in zip(("padded", "layer"), real):  # the same rows, the same sums
                error = rel_l2(got, outs["tight"])
                if not error <= 1e-2:
                    raise SystemExit(f"{name} T={t}: {label} rows differ from tight by {error}")
            print(f"[{name} T={t}] padded / tight = {times['padded'] / times['tight']:.2f}x, "
                  f"layer / tight = {times['layer'] / times['tight']:.2f}x")


if __name__ == "__main__":
    main()
