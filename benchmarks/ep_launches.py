"""Launches and bytes of one expert-parallel forward per transport, from the checkout root:
``torchrun --nproc_per_node=2 -m benchmarks.ep_launches`` (GPUs only; times nothing).

Ranks share cuda:0 when there are fewer GPUs than ranks (gloo, symmetric memory on one
device, as the nvlink tests' shared-GPU mode): the count of launches and the bytes do not
depend on where the ranks run, so one GPU is enough. Per model and T tokens per rank
(uniform routing) each transport runs one eager forward:

    nvlink          max_tokens_per_rank=T
    nvlink_serving  max_tokens_per_rank=max(T, --capacity)
    all_to_all      max_tokens_per_rank=T (fixed splits)

and records its GPU activities (torch.profiler: kernels, copies and memsets, by name),
its wire bytes (``Transport.wire_rows``) and its relative L2 error against all_to_all
without a capacity. Writes ``ep_launches_<gpu>x<W>.{json,md}`` (``..._one_gpu`` when the
ranks shared a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import triton

import moe_ops  # noqa: F401
from benchmarks.bench_ep import NO_MULTICAST, log, rows_to_ranks, wire_bytes
from benchmarks.run_info import command_line, default_out_dir, device_label, utc_now
from moe_ops.distributed import ExpertParallelMoE
from moe_ops.reference import rel_l2
from tools.cli import leave_process_group, slug
from tools.profiler import count_launches
from tools.workloads import layer_config, tokens_with_bias_input

MODELS = ["deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"]


def cell_rows(layer, model, T, capacity, stamp) -> list[dict]:
    """One forward per transport at T tokens per rank: launches, bytes, error."""
    device = layer.router_weight.device
    torch.manual_seed(2000 + dist.get_rank() + T)
    x = tokens_with_bias_input(T, layer.config.hidden_size, layer.router_weight.dtype, device)
    to_ranks = rows_to_ranks(layer, x)
    layer.set_transport("all_to_all", None)
    with torch.no_grad():
        reference = layer(x)
    rows = []
    for system, transport, C in (("nvlink", "nvlink", T),
                                 ("nvlink_serving", "nvlink", max(T, capacity)),
                                 ("all_to_all", "all_to_all", T)):
        layer.set_transport(transport, C)
        with torch.no_grad():
            out = layer(x)  # compiles; then the profiled call
            launches, names = count_launches(lambda: layer(x), most_common=30)
        layer.check()
        err = torch.tensor([rel_l2(out, reference) if T else 0.0], device=device)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        rows.append(dict(stamp, model=model, tokens_per_rank=T, system=system, capacity=C,
                         launches=launches, kernels=names, max_rel_err=float(err),
                         wire_bytes=wire_bytes(layer, *layer.transport.wire_rows(to_ranks))))
        log(f"{model:14s} T={T:5d} {system:15s} launches={launches} "
            f"MB={rows[-1]['wire_bytes'] / 1e6:.3f} err={float(err):.1e}")
    return rows


def markdown(rows, stamp) -> str:
    lines = [f"# Launches per expert-parallel forward, {stamp['gpu']}, {stamp['world_size']} ranks",
             "", f"{stamp['date']}, torch {stamp['torch']}, Triton {stamp['triton']}, bf16, "
             f"{stamp['placement']}; command: `{stamp['command']}`", "",
             "GPU activities of one eager forward on rank 0 (torch.profiler), the MB it "
             "moves between ranks, and its relative L2 error against all_to_all without a "
             "capacity (the largest over the ranks).", "",
             "| model | T/rank | system | capacity | launches | MB moved | rel err |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tokens_per_rank']} | {r['system']} | {r['capacity']} "
                     f"| {r['launches']} | {r['wire_bytes'] / 1e6:.3f} | {r['max_rel_err']:.1e} |")
    lines += ["", "Kernels of the first nvlink forward listed (name: count):", ""]
    first = next((r for r in rows if r["system"] == "nvlink"), None)
    if first is not None:
        lines += [f"- `{name[:90]}`: {count}" for name, count in first["kernels"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 128])
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.ep_launches counts GPU launches: it needs a GPU")
    os.environ.update(NO_MULTICAST)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    shared = torch.cuda.device_count() < world
    if shared:
        os.environ["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
    device = torch.device("cuda", 0 if shared else local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("gloo" if shared else "nccl")
    stamp = dict(gpu=device_label(True, device), world_size=world, date=utc_now(),
                 torch=torch.__version__, triton=triton.__version__,
                 placement="every rank on one GPU (gloo)" if shared else "one GPU per rank",
                 command=command_line(f"torchrun --nproc_per_node={world}",
                                      "benchmarks.ep_launches", argv))
    rows = []
    for model in args.models:
        layer = ExpertParallelMoE.from_config(layer_config(model, True), dtype=torch.bfloat16,
                                              device=device, transport="all_to_all", seed=0)
        for T in args.tokens:
            rows += cell_rows(layer, model, T, args.capacity, stamp)
        del layer
        torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        out_dir = args.out or default_out_dir(True)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"ep_launches_{slug(stamp['gpu'])}x{world}" + ("_one_gpu" if shared else "")
        (out_dir / f"{stem}.json").write_text(json.dumps(dict(stamp=stamp, rows=rows), indent=1))
        (out_dir / f"{stem}.md").write_text(markdown(rows, stamp))
        log(f"wrote {out_dir / stem}.{{json,md}}")
    leave_process_group()


if __name__ == "__main__":
    main()
