"""fp8 experts against bf16 and against the fp8 anchors: every cell of the fp8 issue.

For each model and T this times, in one process and from given routing (CUDA-graph
replays, ``triton.testing.do_bench`` median, L2 flushed): the project's bf16
``fused_experts``, and the same op with the layer's experts quantised to fp8 in both
schemes (``moe_ops.fp8``: 128x128 blocks, per channel), each with the tiles the op looks
up, and per channel again with ``moe_ops.set_fp8_fast_accumulation(True)``. Per row: ms, % of the fp8 floor (1 byte per weight plus float32 scales, bf16 x and
out, over the measured copy bandwidth; flops over a measured fp8 ``torch._scaled_mm``
rate), launches per forward, the tiles, and the error against the bf16 reference on
the dequantised weights (T <= --check-max-t). On an H200 each cell also shows the best
fp8 anchor and the issue's target (``benchmarks/results/anchors-h200-2026-12-02/
fp8_targets.json``, measured elsewhere: vLLM's Triton fused_moe and torch's scaled
grouped GEMM). Run from the checkout root::

    python -m benchmarks.bench_fp8                     # uniform, then Zipf(1.2) for DeepSeek-V3
    python -m benchmarks.bench_fp8 --models mixtral-8x7b --tokens 1 8192

Writes ``fp8_<gpu>.{json,md,png}`` under --out. Without CUDA it runs shrunk configs through
the Triton interpreter (code paths only; results-cpu-interpreter/).
"""
from __future__ import annotations

from tools.cli import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before anything imports triton

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

import moe_ops  # noqa: E402
from benchmarks.inputs import random_layer, routed_cell  # noqa: E402
from benchmarks.run_info import command_line, default_out_dir, device_label, utc_now  # noqa: E402
from moe_ops.fp8 import dequantize_weight, quantize_weight  # noqa: E402
from moe_ops.reference import fused_experts_reference, rel_l2  # noqa: E402
from moe_ops.tiles import get_tile_config  # noqa: E402
from tools.ceilings import measure_ceilings, measure_fp8_rate  # noqa: E402
from tools.cli import log, on_gpu, slug  # noqa: E402
from tools.profiler import count_launches  # noqa: E402
from tools.roofline import distinct_experts, layer_traffic  # noqa: E402
from tools.timing import Timer  # noqa: E402
from tools.workloads import layer_config  # noqa: E402

MODELS = ["deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b", "qwen2-57b-a14b"]
TOKENS = [1, 32, 128, 512, 2048, 8192]
ZIPF_CELLS = {"deepseek-v3": [128, 2048]}  # the Zipf(1.2) cells
SCHEMES = ("block", "channel")
ANCHORS = Path(__file__).parent / "results" / "anchors-h200-2026-12-02" / "fp8_targets.json"


def parse_args(argv=None, gpu: bool = True):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--no-zipf", action="store_true", help="skip the Zipf(1.2) cells")
    p.add_argument("--check-max-t", type=int, default=512)
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--out", default=str(default_out_dir(gpu)))
    args = p.parse_args(argv)
    args.models = args.models or (MODELS if gpu else ["deepseek-v3"])
    args.tokens = args.tokens or (TOKENS if gpu else [1, 33])
    return args


def fp8_floor_ms(cfg, num_tokens, distinct, bandwidth, fp8_rate) -> float:
    """max(bytes / bandwidth, flops / fp8 rate) of the routed experts in fp8: 1 byte per
    weight plus a float32 scale per 128x128 block, bf16 x and out (``tools.roofline``'s
    traffic, its weights at 1 byte)."""
    traffic = layer_traffic(cfg, num_tokens, distinct, bytes_per_elem=1)
    weights = traffic.weight_bytes * (1 + 4 / (128 * 128))
    activations = 2 * traffic.activation_bytes  # counted at 1 byte there; bf16 here
    return 1e3 * max((weights + activations) / bandwidth, traffic.flops / fp8_rate)


def cell_rows(cell, routing, fp8_layers, timer, ceilings, fp8_rate, anchors, args) -> list[dict]:
    """One row per system at this cell."""
    layer, t = cell.layer, cell.num_tokens
    cfg = layer.cfg
    distinct = distinct_experts(cell.topk_ids)
    floor = fp8_floor_ms(cfg, t, distinct, ceilings.bandwidth, fp8_rate)
    anchor = anchors.get(f"{cfg.name}|{t}|{routing.split('(')[0]}", {})
    rows = []
    systems = {"bf16": (layer.w_gate_up, layer.w_down, None, None)}
    systems.update({f"fp8-{s}": fp8_layers[s] for s in SCHEMES})
    systems["fp8-channel-fast"] = fp8_layers["channel"]
    for name, (w_gate_up, w_down, gate_up_scale, down_scale) in systems.items():
        moe_ops.set_fp8_fast_accumulation(name.endswith("-fast"))

        def forward():
            return moe_ops.fused_experts(cell.x, cell.topk_weights, cell.topk_ids, w_gate_up,
                                         w_down, gate_up_scale, down_scale)
        err = None
        if t <= args.check_max_t:
            w_gu = w_gate_up if gate_up_scale is None else dequantize_weight(w_gate_up, gate_up_scale,
                                                                             torch.bfloat16)
            w_d = w_down if down_scale is None else dequantize_weight(w_down, down_scale, torch.bfloat16)
            err = rel_l2(forward(), fused_experts_reference(cell.x, cell.topk_weights, cell.topk_ids,
                                                            w_gu, w_d))
            if not err <= 6e-2:
                raise SystemExit(f"[{cfg.name} T={t}] {name}: rel L2 {err} against the reference")
        ms = timer.replayed(forward)
        launches, _ = count_launches(forward)
        scheme = None if gate_up_scale is None else name[4:].removesuffix("-fast")
        tiles = {stage: get_tile_config(stage, cfg.num_experts, cfg.hidden_size,
                                        cfg.intermediate_size, t, cfg.top_k, cell.x.dtype,
                                        cell.x.device, scheme).as_dict()
                 for stage in ("gate_up", "down")}
        row = dict(model=cfg.name, T=t, routing=routing, system=name, ms=ms, fp8_floor_ms=floor,
                   pct_fp8_floor=100 * floor / ms, launches=launches, rel_l2_dequantised=err,
                   distinct_experts=distinct, tiles=tiles, anchor=anchor.get("best_anchor"),
                   anchor_who=anchor.get("who"), target=anchor.get("target"))
        log(f"[{cfg.name} T={t} {routing}] {name:12s} {ms:8.4f} ms  {row['pct_fp8_floor']:5.1f}% of "
            f"fp8 floor  {launches} launches  err {err if err is None else f'{err:.2e}'}"
            + (f"  (target {row['target']})" if row["target"] else ""))
        rows.append(row)
    moe_ops.set_fp8_fast_accumulation(False)
    return rows


def markdown(rows: list[dict], stamp: dict) -> str:
    """One line per cell: bf16, both fp8 schemes, the anchor, the target and whether it is met."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["model"], r["T"], r["routing"]), {})[r["system"]] = r
    lines = [f"# fp8 experts on {stamp['gpu']} ({stamp['date']})", "",
             f"torch {stamp['torch']}, Triton {stamp['triton']}; `{stamp['command']}`; "
             f"{stamp['timing']}. Ceilings: copy {stamp['bandwidth'] / 1e12:.2f} TB/s, fp8 "
             f"matmul {stamp['fp8_rate'] / 1e12:.0f} TFLOP/s. ms of CUDA-graph replays from "
             "given routing; [n%] of the fp8 floor. Anchor and target: the issue's "
             "(vLLM / torch, measured elsewhere on an H200).", "",
             "| model | T | routing | fp8 floor | bf16 | fp8-block | fp8-channel | fp8-channel "
             "fast acc. | launches (block / channel) | best fp8 anchor | target | fastest fp8 / target |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, t, routing), systems in cells.items():
        b, blk, ch = systems["bf16"], systems["fp8-block"], systems["fp8-channel"]
        fast = systems["fp8-channel-fast"]
        best = min(blk["ms"], ch["ms"], fast["ms"])
        ratio = f"{best / blk['target']:.2f}" + (" met" if best <= blk["target"] else " MISSED") \
            if blk["target"] else "-"
        lines.append(
            f"| {model} | {t} | {routing} | {blk['fp8_floor_ms']:.3f} | {b['ms']:.3f} | "
            f"{blk['ms']:.3f} [{blk['pct_fp8_floor']:.0f}%] | {ch['ms']:.3f} [{ch['pct_fp8_floor']:.0f}%] | "
            f"{fast['ms']:.3f} [{fast['pct_fp8_floor']:.0f}%] | {blk['launches']} / {ch['launches']} | "
            f"{blk['anchor'] or '-'} | {blk['target'] or '-'} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], stamp: dict, path: Path) -> None:
    """ms against T (log-log), one panel per model (uniform routing): bf16, the fp8
    schemes, and the best fp8 anchor where known."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["routing"] == "uniform"]
        for system in dict.fromkeys(r["system"] for r in mine):
            points = [(r["T"], r["ms"]) for r in mine if r["system"] == system]
            ax.plot(*zip(*points), marker="o", label=system)
        anchors = sorted({(r["T"], r["anchor"]) for r in mine if r["anchor"]})
        if anchors:
            ax.plot(*zip(*anchors), "k--", marker="x", label="best fp8 anchor")
        ax.set(xscale="log", yscale="log", title=model, xlabel="tokens", ylabel="ms")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fp8 experts, {stamp['gpu']}, {stamp['date']} (CUDA-graph replay)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def main(argv=None) -> None:
    gpu = on_gpu()
    args = parse_args(argv, gpu)
    device = torch.device("cuda" if gpu else "cpu")
    moe_ops.set_topk_ids_check(False)
    ceilings = measure_ceilings(device, torch.bfloat16)
    fp8_rate = measure_fp8_rate(device) or 2 * ceilings.matmul_rate
    gpu_name = device_label(gpu)
    anchors = json.loads(ANCHORS.read_text()) if gpu_name == "NVIDIA H200" else {}
    timer = Timer(args.warmup_ms, args.rep_ms, cpu_reps=1)
    stamp = dict(gpu=gpu_name, date=utc_now(), torch=torch.__version__, triton=triton.__version__,
                 command=command_line("python", "benchmarks.bench_fp8", argv),
                 timing=timer.describe(), bandwidth=ceilings.bandwidth, fp8_rate=fp8_rate)
    log(f"{gpu_name}: copy {ceilings.bandwidth / 1e12:.2f} TB/s, fp8 {fp8_rate / 1e12:.0f} TFLOP/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"fp8_{slug(gpu_name)}"
    rows: list[dict] = []
    for name in args.models:
        cfg = layer_config(name, gpu)
        routings = [("uniform", 0.0, args.tokens)]
        if not args.no_zipf and name in ZIPF_CELLS:
            routings.append(("zipf(s=1.2)", 1.2, ZIPF_CELLS[name] if gpu else args.tokens[-1:]))
        for routing, zipf_s, tokens in routings:
            gen = torch.Generator(device=device).manual_seed(0)
            layer = random_layer(cfg, torch.bfloat16, device, zipf_s, gen)
            fp8_layers = {}
            for scheme in SCHEMES:  # in the op's order: w_gate_up, w_down, then their scales
                (gate_up8, gate_up_scale), (down8, down_scale) = (
                    quantize_weight(w, scheme) for w in (layer.w_gate_up, layer.w_down))
                fp8_layers[scheme] = (gate_up8, down8, gate_up_scale, down_scale)
            for t in tokens:
                cell = routed_cell(layer, t, gen)
                rows += cell_rows(cell, routing, fp8_layers, timer, ceilings, fp8_rate, anchors, args)
                stem.with_suffix(".json").write_text(json.dumps(dict(stamp, rows=rows), indent=1))
                stem.with_suffix(".md").write_text(markdown(rows, stamp))
            del layer, fp8_layers
            if gpu:
                torch.cuda.empty_cache()
    plot(rows, stamp, stem.with_suffix(".png"))
    log(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
