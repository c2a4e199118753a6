"""Expert-parallel benchmark, from the checkout root:
``torchrun --nproc_per_node=N -m benchmarks.bench_ep``.

For each model (routed + shared experts, bf16), routing (uniform, Zipf) and tokens per
rank T, every rank brings T tokens and times, in one run, the slower rank's median of
per-call CUDA-event timings:

    ep_nvlink            ExpertParallelMoE, nvlink transport (gate_up starts on the rows
                         as they land, the default)
    ep_nvlink_all_rows   the same with gate_up after every row has landed
                         (``early_gate_up = False``)
    ep_all_to_all        all_to_all transport with max_tokens_per_rank=T (fixed splits)
    ep_nvlink_serving    nvlink with a serving capacity max_tokens_per_rank=max(T, --capacity)
    ep_nvlink_serving_one_set  the same without the receiver's second tile set for
                         uneven batches (``uneven_batches = False``)
    ep_all_to_all_serving  all_to_all with that capacity (what a server sized once pays)
    ep_all_to_all_sync   all_to_all without it (one count exchange, host-synced), eager
    compute_only         this rank's fused_experts on exactly the rows it receives
    shared_only          the shared expert of this rank's tokens (part of every ep_* row)
    comm_only            the nvlink transport alone: plan, push of the routed rows, flags
                         both ways (no expert compute, no combine)
    baseline             what users write today: per-pair all_to_all_single with host-synced
                         splits, torch._grouped_mm experts, un-sort, weighted sum (eager)

With ``--rank0-tokens N`` rank 0 brings N tokens and the others T (uneven batches, as
under data-parallel attention; outputs ``ep_<gpu>x<W>_rank0-N``): rank 0's receiver then
holds far more rows than its own N, the case ``uneven_batches`` is for.

Every ep_* row also records ``wire_bytes``, the bytes its forward moves between ranks
(``Transport.wire_rows``: over nvlink the routed rows there and back, over all_to_all
capacity-sized blocks with fixed buffers and the routed rows without, headers included),
beside each cell's ``routed_bytes`` (each routed token row once to each other owning
rank and back: the least any transport can move), and on a GPU its ``launches`` (GPU
activities of one eager forward, torch.profiler).

Systems marked "graph" in the JSON are CUDA-graph replays (the no-sync ones). Floor: the
slower rank's expert compute at the measured copy bandwidth / matmul rate
(``tools.ceilings``): max(distinct local experts hit x 3*H*I*2 bytes / bandwidth,
2 * received (token, expert) pairs * 3*H*I / rate). Writes ``ep_<gpu>x<W>.{json,md,png}``
(``benchmarks/ep_report.py``).
Without GPUs (gloo, interpreter) it runs shrunk configs at tiny T to exercise the code.
"""
from __future__ import annotations

from tools.cli import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before anything imports triton

import argparse  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import triton  # noqa: E402

import moe_ops  # noqa: E402,F401
from benchmarks.ep_baseline import sequential_ep_forward  # noqa: E402
from benchmarks.ep_report import write_outputs  # noqa: E402
from benchmarks.run_info import command_line, default_out_dir, device_label, utc_now  # noqa: E402
from moe_ops.distributed import ExpertParallelMoE  # noqa: E402
from moe_ops.module import shared_expert_output  # noqa: E402
from moe_ops.pipeline import fused_experts_impl  # noqa: E402
from moe_ops.reference import rel_l2  # noqa: E402
from tools.ceilings import measure_ceilings  # noqa: E402
from tools.cli import leave_process_group, on_gpu, slug  # noqa: E402
from tools.profiler import count_launches  # noqa: E402
from tools.timing import capture_graph, median_event_ms, median_wall_ms  # noqa: E402
from tools.workloads import bias_column, layer_config, log_popularity, tokens_with_bias_input  # noqa: E402

# Never NVLink multicast (see README); set before the process group starts.
NO_MULTICAST = {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NCCL_NVLS_ENABLE": "0",
                "NVSHMEM_DISABLE_NVLS": "1"}
MODELS = ["deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"]
TOKENS = [1, 128, 1024, 8192]


def log(msg: str) -> None:
    """Print on rank 0 only."""
    if dist.get_rank() == 0:
        print(msg, flush=True)


def slowest(value: float) -> float:
    """The largest ``value`` over the ranks (every rank calls it)."""
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if on_gpu() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median of per-call timings (CUDA events on a GPU), every rank starting together."""
    for _ in range(warmup):
        fn()
    dist.barrier()
    if not on_gpu():
        return median_wall_ms(fn, iters, warmup=0)
    return median_event_ms(fn, iters, warmup=0)


def apply_routing(layer, routing: str, zipf_s: float) -> None:
    """Router column 0 carries a per-expert logit bias (token column 0 is 1): zero for
    uniform routing, -s*log(rank) for Zipf(s); the same on every rank."""
    device = layer.router_weight.device
    gen = torch.Generator(device=device).manual_seed(1234)
    skew = zipf_s if routing == "zipf" else 0.0
    bias_column(layer.router_weight, log_popularity(layer.config.num_experts, skew, device, gen))


def route(layer, x):
    """(topk_weights, topk_ids) of this rank's tokens under the layer's router."""
    c = layer.config
    bias = None if layer.score_bias is None else layer.score_bias.float()
    return torch.ops.tritonmoe.route(x, layer.router_weight, c.top_k, c.scoring, c.renormalize,
                                     c.n_group, c.topk_group, bias, c.routed_scaling_factor)


def gather_rows(t, world: int):
    """Every rank's t [rows, ...] stacked in rank order; the ranks' row counts may differ
    (host-synced; outside any timing)."""
    count = torch.tensor([t.shape[0]], device=t.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    padded = t.new_zeros(max(counts), *t.shape[1:])
    padded[:t.shape[0]] = t
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)])


def received_rows(layer, x):
    """(rows x, weights, local ids, pairs): the tokens of every rank that need this
    rank's experts, as this rank receives them (host-synced; outside any timing)."""
    weights, ids = route(layer, x)
    all_x, all_w, all_ids = (gather_rows(t, layer.world_size) for t in (x, weights, ids))
    first = layer.expert_range.start
    local = all_ids - first
    owned = (local >= 0) & (local < len(layer.expert_range))
    keep = owned.any(dim=1).nonzero().flatten()
    local_ids = torch.where(owned, local, -1).to(torch.int32)[keep].contiguous()
    distinct = int(torch.unique(local_ids[local_ids >= 0]).numel())
    return (all_x[keep].contiguous(), all_w[keep].contiguous(), local_ids,
            int(owned.sum()), distinct)


def rows_to_ranks(layer, x) -> list[int]:
    """How many of this rank's tokens need each rank's experts (host-synced; untimed)."""
    _, ids = route(layer, x)
    owner = ids.long() // (layer.config.num_experts // layer.world_size)
    return [int((owner == d).any(dim=1).sum()) for d in range(layer.world_size)]


def wire_bytes(layer, out_rows: list[int], back_rows: list[int]) -> int:
    """Bytes one forward moves between this rank and the others: out_rows[d] rows to each
    other rank d (token, ids, weights) and back_rows[d] rows back (partial sums)."""
    c, r = layer.config, layer.rank
    elem = layer.router_weight.element_size()
    out_row = c.hidden_size * elem + c.top_k * (4 + 4)
    back_row = c.hidden_size * elem
    return sum(out_rows[d] * out_row + back_rows[d] * back_row
               for d in range(len(out_rows)) if d != r)


def bench_cell(layer, model, routing, T, args, ceilings, rows, stamp):
    """Time every system at T tokens per rank, append their rows, check they agree."""
    c, W = layer.config, layer.world_size
    device = layer.router_weight.device
    torch.manual_seed(1000 + dist.get_rank() + T)
    uneven = args.rank0_tokens is not None
    own = args.rank0_tokens if uneven and dist.get_rank() == 0 else T
    x = tokens_with_bias_input(own, c.hidden_size, layer.router_weight.dtype, device)
    cell = dict(stamp, model=model, tokens_per_rank=T, routing=routing,
                **(dict(rank0_tokens=args.rank0_tokens) if uneven else {}))
    results, outputs = {}, {}

    def record(system, ms, graph, note="", **extra):
        results[system] = ms
        rows.append(dict(cell, system=system, ms=ms, graph=graph, note=note, **extra))

    rx, rw, rids, pairs, distinct = received_rows(layer, x)
    H, I = c.hidden_size, c.intermediate_size
    floor_ms = slowest(max(distinct * 3 * H * I * 2 / ceilings.bandwidth,
                           2 * pairs * 3 * H * I / ceilings.matmul_rate) * 1e3)
    recv_tokens = torch.tensor([rx.shape[0]], device=device, dtype=torch.float64)
    gathered = [torch.empty_like(recv_tokens) for _ in range(W)]
    dist.all_gather(gathered, recv_tokens)
    received = [int(g.item()) for g in gathered]
    to_ranks = rows_to_ranks(layer, x)
    cell.update(floor_ms=floor_ms, received_tokens=received,
                imbalance=max(received) / max(1e-9, sum(received) / W),
                routed_bytes=wire_bytes(layer, to_ranks, to_ranks))
    capacity = max(T, args.capacity)

    def compute():
        return fused_experts_impl(rx, rw, rids, layer.w_gate_up, layer.w_down,
                                  w_gate_up_scale=layer.w_gate_up_scale,
                                  w_down_scale=layer.w_down_scale)

    def timed(system, fn, graph):
        extra = {}
        if system.startswith("ep_"):
            extra["wire_bytes"] = wire_bytes(layer, *layer.transport.wire_rows(to_ranks))
            extra["launches"] = count_launches(fn)[0]
        if graph and on_gpu():
            graph, out = capture_graph(fn)
            ms = slowest(median_ms(graph.replay, args.iters))
        else:
            out = fn()
            ms = slowest(median_ms(fn, args.iters))
        record(system, ms, graph and on_gpu(), **extra)
        return out

    with torch.no_grad():
        timed("compute_only", compute, True)
        if layer.shared_gate_up is not None:
            timed("shared_only", lambda: shared_expert_output(
                x, layer.shared_gate_up, layer.shared_down, layer.shared_gate), True)
        if on_gpu():
            layer.set_transport("nvlink", T)
            for system, early in (("ep_nvlink", True), ("ep_nvlink_all_rows", False)):
                layer.early_gate_up = early
                outputs[system] = timed(system, lambda: layer.forward_impl(x), True).clone()
            layer.early_gate_up = True
            timed("comm_only", lambda: comm_round_trip(layer, x), True)
            layer.set_transport("nvlink", capacity)
            for system, uneven in (("ep_nvlink_serving", True),
                                   ("ep_nvlink_serving_one_set", False)):
                layer.uneven_batches = uneven
                outputs[system] = timed(system, lambda: layer.forward_impl(x), True).clone()
            layer.uneven_batches = True
        layer.set_transport("all_to_all", T)
        outputs["ep_all_to_all"] = timed("ep_all_to_all", lambda: layer.forward_impl(x), True).clone()
        layer.set_transport("all_to_all", capacity)
        outputs["ep_all_to_all_serving"] = timed("ep_all_to_all_serving",
                                                 lambda: layer.forward_impl(x), True).clone()
        layer.set_transport("all_to_all", None)
        outputs["ep_all_to_all_sync"] = timed("ep_all_to_all_sync", lambda: layer.forward_impl(x), False)
        if on_gpu():
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
    if on_gpu():
        torch.cuda.empty_cache()


def comm_round_trip(layer, x):
    """The nvlink transport moving this rank's routed rows to their owners and raising the
    flags back, no expert compute (the way back's rows are pulled by the layer's combine
    kernel)."""
    t, C, W, c = layer.transport, layer.max_tokens_per_rank, layer.world_size, layer.config
    weights, ids = route(layer, x)
    plan = t.plan(x, weights, ids, len(layer.expert_range))
    t.dispatch(x, weights, ids, plan, [C] * W, [C] * W)
    rows = t.receive(None).x.shape[0]
    back = t.receive_back(t.send_back(t.partials_out(rows, c.hidden_size, x.dtype, x.device),
                                      [C] * W, [C] * W))
    t.end()
    return back


def main(argv=None) -> None:
    """Join the torchrun group, time every (model, routing, T) and write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--tokens", nargs="+", type=int, default=None)
    parser.add_argument("--routing", nargs="+", default=["uniform", "zipf"])
    parser.add_argument("--zipf-s", type=float, default=1.2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--capacity", type=int, default=None,
                        help="serving max_tokens_per_rank of the *_serving rows (default 4096; "
                             "CPU 16)")
    parser.add_argument("--rank0-tokens", type=int, default=None,
                        help="uneven batches: rank 0 brings this many tokens (at most each "
                             "--tokens value), the others T")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    os.environ.update(NO_MULTICAST)
    gpu = on_gpu()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if gpu else "gloo")
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    tokens = args.tokens or (TOKENS if gpu else [1, 9])
    args.capacity = args.capacity or (4096 if gpu else 16)
    out_dir = args.out or default_out_dir(gpu)
    gpu_name = device_label(gpu, device)
    W = dist.get_world_size()
    stamp = dict(gpu=gpu_name, world_size=W, date=utc_now(), torch=torch.__version__,
                 triton=triton.__version__,
                 command=command_line(f"torchrun --nproc_per_node={W}", "benchmarks.bench_ep", argv))
    ceilings = measure_ceilings(device)
    stamp.update(bandwidth_tbs=ceilings.bandwidth / 1e12, matmul_tflops=ceilings.matmul_rate / 1e12)
    log(f"{gpu_name} x{W}: copy {ceilings.bandwidth / 1e12:.2f} TB/s, matmul "
        f"{ceilings.matmul_rate / 1e12:.0f} TFLOP/s")
    stem = f"ep_{slug(gpu_name)}x{W}" + (f"_rank0-{args.rank0_tokens}"
                                         if args.rank0_tokens is not None else "")
    rows: list[dict] = []
    for model in args.models:
        layer = ExpertParallelMoE.from_config(layer_config(model, gpu),
                                              dtype=torch.bfloat16 if gpu else torch.float32,
                                              device=device, transport="all_to_all", seed=0)
        for routing in args.routing:
            apply_routing(layer, routing, args.zipf_s)
            for T in (t for t in tokens if (args.rank0_tokens or 0) <= t):
                bench_cell(layer, model, routing, T, args, ceilings, rows, stamp)
            if dist.get_rank() == 0:
                write_outputs(rows, stamp, out_dir, stem)
        del layer
        if gpu:
            torch.cuda.empty_cache()
    log(f"wrote {out_dir / stem}.{{json,md,png}}")
    leave_process_group()


if __name__ == "__main__":
    main()
