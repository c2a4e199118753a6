"""Check ``ExpertParallelMoE`` against the single-process layer, under torchrun, on any
number of nodes: every rank compares its output with ``FusedMoE`` on its own tokens.

    torchrun --nproc_per_node=2 -m tools.ep_check                       # one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 -m tools.ep_check                    # each node

NCCL on GPUs, gloo (and Triton's interpreter, shrunk configs) without. Each rank prints
``rank R/W ok: <model> ... rel L2 <err>`` and exits 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["mixtral-8x7b", "deepseek-v3"])
    p.add_argument("--tokens", type=int, default=19, help="tokens of rank r: tokens + 3r")
    p.add_argument("--max-tokens-per-rank", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run every model's check on this rank; 0 if all agree within tolerance."""
    from tools.cli import use_interpreter_without_gpu

    use_interpreter_without_gpu()
    import torch
    import torch.distributed as dist

    from moe_ops.configs import get_config, shrink
    from moe_ops.distributed import ExpertParallelMoE, random_fused_moe
    from moe_ops.reference import rel_l2
    from tools.cli import leave_process_group, on_gpu

    args = parse_args(argv)
    gpu = on_gpu()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    dtype, tol = (torch.bfloat16, 1e-2) if gpu else (torch.float32, 1e-5)
    failed = False
    for name in args.models:
        config = get_config(name) if gpu else shrink(name)
        moe = random_fused_moe(config, args.seed, dtype=dtype, device=device)
        layer = ExpertParallelMoE.from_config(config, dtype=dtype, device=device, seed=args.seed,
                                              max_tokens_per_rank=args.max_tokens_per_rank)
        torch.manual_seed(args.seed + rank)
        x = torch.randn(args.tokens + 3 * rank, config.hidden_size, dtype=dtype, device=device)
        with torch.inference_mode():
            err = rel_l2(layer(x), moe(x))
        ok = err <= tol
        failed |= not ok
        print(f"rank {rank}/{world} {'ok' if ok else 'MISMATCH'}: {name} "
              f"({layer.transport.name}, {x.shape[0]} tokens) rel L2 {err:.2e}", flush=True)
    leave_process_group()
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
