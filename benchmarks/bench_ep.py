#!/usr/bin/env python
"""Expert-parallel benchmark: ``torchrun --nproc_per_node=N benchmarks/bench_ep.py``.

For each model (routed + shared experts, bf16), routing (uniform, Zipf) and tokens per
rank T, every rank brings T tokens and times, in one run, the slower rank's median of
per-call CUDA-event timings:

    ep_nvlink            ExpertParallelMoE, nvlink transport (overlap=False, the default)
    ep_nvlink_overlap    the same with overlap=True (own tokens computed during the dispatch)
    ep_all_to_all        all_to_all transport with max_tokens_per_rank=T (fixed splits)
    ep_all_to_all_sync   all_to_all without it (one count exchange, host-synced), eager
    compute_only         this rank's fused_experts on exactly the rows it receives
    shared_only          the shared expert of this rank's tokens (part of every ep_* row)
    comm_only            the nvlink transport moving the same blocks there and back
    baseline             what users write today: per-pair all_to_all_single with host-synced
                         splits, torch._grouped_mm experts, un-sort, weighted sum (eager)

Systems marked "graph" in the JSON are CUDA-graph replays (the no-sync ones). Floor: the
slower rank's expert compute at the measured copy bandwidth / matmul rate
(``tools.roofline``): max(distinct local experts hit x 3*H*I*2 bytes / bandwidth,
2 * received (token, expert) pairs * 3*H*I / rate). Writes ``ep_<gpu>x<W>.{json,md,png}``.
Without GPUs (gloo, interpreter) it runs shrunk configs at tiny T to exercise the code.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
from pathlib import Path

for _name, _value in {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0",
                      "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_name] = _value  # never NVLink multicast (see README)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tools.runtime import ON_GPU, capture_graph, rel_l2  # noqa: E402  (before triton)

import triton  # noqa: E402

import moe_ops  # noqa: E402,F401
from benchmarks.ep_baseline import sequential_ep_forward  # noqa: E402
from moe_ops.configs import get_config, shrink  # noqa: E402
from moe_ops.distributed import ExpertParallelMoE  # noqa: E402
from moe_ops.module import shared_expert_output  # noqa: E402
from moe_ops.pipeline import fused_experts_impl  # noqa: E402
from tools.roofline import measure_ceilings, median_wall_ms  # noqa: E402

MODELS = ["deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"]
TOKENS = [1, 128, 1024, 8192]
SYSTEMS = ["ep_nvlink", "ep_nvlink_overlap", "ep_all_to_all", "ep_all_to_all_sync",
           "compute_only", "shared_only", "comm_only", "baseline"]


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def slowest(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if ON_GPU else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median of per-call timings (CUDA events on a GPU), every rank starting together."""
    for _ in range(warmup):
        fn()
    dist.barrier()
    if not ON_GPU:
        return median_wall_ms(fn, iters, warmup=0)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def apply_routing(layer, routing: str, zipf_s: float) -> None:
    """Router column 0 carries a per-expert logit bias (token column 0 is 1): zero for
    uniform routing, -s*log(rank) for Zipf(s); the same on every rank."""
    E = layer.config.num_experts
    gen = torch.Generator(device=layer.router_weight.device).manual_seed(1234)
    bias = torch.zeros(E, device=layer.router_weight.device)
    if routing == "zipf":
        rank = torch.randperm(E, device=layer.router_weight.device, generator=gen).float() + 1
        bias = -zipf_s * rank.log()
    layer.router_weight[:, 0] = bias.to(layer.router_weight.dtype)


def received_rows(layer, x):
    """(rows x, weights, local ids, pairs): the tokens of every rank that need this
    rank's experts, as this rank receives them (host-synced; outside any timing)."""
    c = layer.config
    bias = None if layer.score_bias is None else layer.score_bias.float()
    weights, ids = torch.ops.tritonmoe.route(x, layer.router_weight, c.top_k, c.scoring,
                                             c.renormalize, c.n_group, c.topk_group, bias,
                                             c.routed_scaling_factor)
    gathered = [torch.empty_like(t) for t in (x, weights, ids) for _ in range(layer.world_size)]
    W = layer.world_size
    for i, t in enumerate((x, weights, ids)):
        dist.all_gather(gathered[i * W:(i + 1) * W], t)
    all_x, all_w, all_ids = (torch.cat(gathered[i * W:(i + 1) * W]) for i in range(3))
    first = layer.expert_range.start
    local = all_ids - first
    owned = (local >= 0) & (local < len(layer.expert_range))
    keep = owned.any(dim=1).nonzero().flatten()
    local_ids = torch.where(owned, local, -1).to(torch.int32)[keep].contiguous()
    distinct = int(torch.unique(local_ids[local_ids >= 0]).numel())
    return (all_x[keep].contiguous(), all_w[keep].contiguous(), local_ids,
            int(owned.sum()), distinct)


def bench_cell(layer, model, routing, T, args, ceilings, rows, stamp):
    c, W = layer.config, layer.world_size
    device = layer.router_weight.device
    torch.manual_seed(1000 + dist.get_rank() + T)
    x = torch.randn(T, c.hidden_size, device=device, dtype=layer.router_weight.dtype)
    x[:, 0] = 1
    cell = dict(stamp, model=model, tokens_per_rank=T, routing=routing)
    results, outputs = {}, {}

    def record(system, ms, graph, note=""):
        results[system] = ms
        rows.append(dict(cell, system=system, ms=ms, graph=graph, note=note))

    rx, rw, rids, pairs, distinct = received_rows(layer, x)
    H, I = c.hidden_size, c.intermediate_size
    floor_ms = slowest(max(distinct * 3 * H * I * 2 / ceilings.bandwidth,
                           2 * pairs * 3 * H * I / ceilings.matmul_rate) * 1e3)
    recv_tokens = torch.tensor([rx.shape[0]], device=device, dtype=torch.float64)
    gathered = [torch.empty_like(recv_tokens) for _ in range(W)]
    dist.all_gather(gathered, recv_tokens)
    received = [int(g.item()) for g in gathered]
    cell.update(floor_ms=floor_ms, received_tokens=received,
                imbalance=max(received) / max(1e-9, sum(received) / W))

    def compute():
        return fused_experts_impl(rx, rw, rids, layer.w_gate_up, layer.w_down)

    def timed(system, fn, graph):
        if graph and ON_GPU:
            graph, out = capture_graph(fn)
            ms = slowest(median_ms(graph.replay, args.iters))
        else:
            out = fn()
            ms = slowest(median_ms(fn, args.iters))
        record(system, ms, graph and ON_GPU)
        return out

    with torch.no_grad():
        timed("compute_only", compute, True)
        if layer.shared_gate_up is not None:
            timed("shared_only", lambda: shared_expert_output(
                x, layer.shared_gate_up, layer.shared_down, layer.shared_gate), True)
        if ON_GPU:
            layer.set_transport("nvlink", T)
            for system, overlap in (("ep_nvlink", False), ("ep_nvlink_overlap", True)):
                layer.overlap = overlap
                outputs[system] = timed(system, lambda: layer.forward_impl(x), True).clone()
            layer.overlap = False
            timed("comm_only", lambda: comm_round_trip(layer, x), True)
        layer.set_transport("all_to_all", T)
        outputs["ep_all_to_all"] = timed("ep_all_to_all", lambda: layer.forward_impl(x), True).clone()
        layer.set_transport("all_to_all", None)
        outputs["ep_all_to_all_sync"] = timed("ep_all_to_all_sync", lambda: layer.forward_impl(x), False)
        if ON_GPU:
            outputs["baseline"] = timed("baseline", lambda: sequential_ep_forward(layer, x), False)
    reference = outputs.get("baseline", outputs["ep_all_to_all_sync"])
    errors = {k: rel_l2(v, reference) for k, v in outputs.items() if T}
    worst = slowest(max([e if e == e else float("inf") for e in errors.values()] or [0.0]))
    compute_ms = results["compute_only"]
    for row in rows[-len(results):]:
        row.update(cell, pct_floor=100 * floor_ms / row["ms"],
                   x_compute=row["ms"] / compute_ms, max_rel_err=worst)
    base = results.get("baseline")
    log(f"{model:14s} {routing:7s} T={T:5d}  " + "  ".join(
        f"{k}={v:.3f}" for k, v in results.items())
        + f"  ms | nvlink/compute={results.get('ep_nvlink', float('nan')) / compute_ms:.2f}"
        + (f" baseline/nvlink={base / results['ep_nvlink']:.2f}" if base and 'ep_nvlink' in results else "")
        + f" imbalance={cell['imbalance']:.2f} err={worst:.1e}")
    if worst > 2e-2:
        raise RuntimeError(f"{model} T={T}: systems disagree (rel L2 {worst:.2e})")
    torch.cuda.empty_cache() if ON_GPU else None


def comm_round_trip(layer, x):
    """The nvlink transport moving T rows to every peer and back, no expert compute."""
    t, C, W, c = layer.transport, layer.max_tokens_per_rank, layer.world_size, layer.config
    t.begin()
    send = t.send_buffers(W * C, c.hidden_size, c.top_k, x.dtype, x.device)
    filled = [x.shape[0]] * W
    t.dispatch(*send, [C] * W, [C] * W, filled)
    recv_x, _, _ = t.receive(None)
    back = t.receive_back(t.send_back(recv_x, [C] * W, [C] * W, [C] * W))
    t.end()
    return back


def write_outputs(rows, stamp, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(dict(stamp=stamp, rows=rows), indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(rows, stamp))
    try:
        plot(rows, stamp, out_dir / f"{stem}.png")
    except ImportError:
        pass


def markdown(rows, stamp) -> str:
    lines = [f"# Expert-parallel MoE, {stamp['gpu']} x{stamp['world_size']}",
             "", f"{stamp['date']}, torch {stamp['torch']}, Triton {stamp['triton']}, "
             f"bf16; command: `{stamp['command']}`", "",
             "Slower rank's median ms (CUDA events; every no-sync system as a CUDA-graph "
             "replay, ep_all_to_all_sync and baseline eager). `x compute` = ep_nvlink / "
             "compute_only; `x comp+shared` = ep_nvlink / (compute_only + shared_only); "
             "`vs baseline` = baseline / ep_nvlink; % floor = the slower rank's "
             "expert-compute floor / ep_nvlink; imbalance = max/mean tokens received.", "",
             "| model | routing | T/rank | " + " | ".join(SYSTEMS)
             + " | x compute | x comp+shared | vs baseline | % floor | imbalance |",
             "|---|---|---:|" + "---:|" * (len(SYSTEMS) + 5)]
    cells = {}
    for r in rows:
        cells.setdefault((r["model"], r["routing"], r["tokens_per_rank"]), {})[r["system"]] = r
    for (model, routing, T), by in cells.items():
        def ms(system):
            row = by.get(system)
            if row is None:
                return "-"
            return f"{row['ms']:.3f}" + (f" ({row['note']})" if row.get("note") else "")

        nv, comp, base, shared = (by[s]["ms"] if s in by else None
                                  for s in ("ep_nvlink", "compute_only", "baseline", "shared_only"))
        first = next(iter(by.values()))
        ratios = [f"{nv / comp:.2f}" if nv and comp else "-",
                  f"{nv / (comp + (shared or 0)):.2f}" if nv and comp else "-",
                  f"{base / nv:.2f}" if nv and base else "-",
                  f"{100 * first['floor_ms'] / nv:.0f}%" if nv else "-",
                  f"{first['imbalance']:.2f}"]
        lines.append(f"| {model} | {routing} | {T} | " + " | ".join(ms(s) for s in SYSTEMS)
                     + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, stamp, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for system in SYSTEMS:
            pts = sorted((r["tokens_per_rank"], r["ms"]) for r in rows
                         if r["model"] == model and r["system"] == system and r["routing"] == "uniform")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system)
        ax.set(xscale="log", yscale="log", title=f"{model} (uniform)", xlabel="tokens per rank",
               ylabel="ms (slower rank)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{stamp['gpu']} x{stamp['world_size']}, {stamp['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--tokens", nargs="+", type=int, default=None)
    parser.add_argument("--routing", nargs="+", default=["uniform", "zipf"])
    parser.add_argument("--zipf-s", type=float, default=1.2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if ON_GPU:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if ON_GPU else "gloo")
    device = torch.device("cuda", local_rank) if ON_GPU else torch.device("cpu")
    tokens = args.tokens or (TOKENS if ON_GPU else [1, 9])
    out_dir = args.out or REPO_ROOT / ("benchmarks/results" if ON_GPU else "benchmarks/results-cpu-interpreter")
    gpu = torch.cuda.get_device_name(device) if ON_GPU else "cpu-interpreter"
    W = dist.get_world_size()
    stamp = dict(gpu=gpu, world_size=W, date=datetime.date.today().isoformat(),
                 torch=torch.__version__, triton=triton.__version__,
                 command="torchrun --nproc_per_node=%d benchmarks/bench_ep.py %s" % (W, " ".join(argv or sys.argv[1:])))
    ceilings = measure_ceilings(device)
    stamp.update(bandwidth_tbs=ceilings.bandwidth / 1e12, matmul_tflops=ceilings.matmul_rate / 1e12)
    log(f"{gpu} x{W}: copy {ceilings.bandwidth / 1e12:.2f} TB/s, matmul "
        f"{ceilings.matmul_rate / 1e12:.0f} TFLOP/s")
    stem = "ep_" + re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") + f"x{W}"
    rows: list[dict] = []
    for model in args.models:
        config = get_config(model) if ON_GPU else shrink(model)
        layer = ExpertParallelMoE.from_config(config, dtype=torch.bfloat16 if ON_GPU else torch.float32,
                                              device=device, transport="all_to_all", seed=0)
        for routing in args.routing:
            apply_routing(layer, routing, args.zipf_s)
            for T in tokens:
                bench_cell(layer, model, routing, T, args, ceilings, rows, stamp)
            if dist.get_rank() == 0:
                write_outputs(rows, stamp, out_dir, stem)
        del layer
        torch.cuda.empty_cache() if ON_GPU else None
    log(f"wrote {out_dir / stem}.{{json,md,png}}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
