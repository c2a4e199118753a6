#!/usr/bin/env python
"""The main job: time every MoE forward system against the measured roofline floor.

For each model config and token count T this times, in one process:

    fused_experts, fused_experts+graph   our op given the routing (eager / CUDA-graph replay)
    fused_moe, fused_moe+graph           our op with routing included
    grouped_mm, grouped_mm+graph         PyTorch: sort by expert, torch._grouped_mm x2,
                                         SiLU*mul, weighted index_add (benchmarks/grouped_baseline.py)
    reference                            the per-expert loop of moe_ops.reference (naive)
    megablocks                           dMoE if it imports (own router, random weights)

Timing: median of per-call CUDA-event timings from ``triton.testing.do_bench`` (L2
flushed before every call). Floor: ``tools.roofline`` with the copy bandwidth and matmul
rate measured in this run and the distinct experts this routing actually hits; % of
floor = floor_ms / ms * 100 (100 = at the floor). Launches: GPU activities in one
forward, counted with torch.profiler outside the timing. Correctness is checked once per
(model, T <= --check-max-t) against the reference (relative L2, printed; NaN aborts).

    python benchmarks/bench_moe.py                        # 4 models x 7 T, ~5-8 min on an H100
    python benchmarks/bench_moe.py --routing zipf --zipf-s 1.2
    python benchmarks/bench_moe.py --quick                # 2 models x 3 T
    TRITON_INTERPRET=1 python benchmarks/bench_moe.py --quick   # CPU: shrunk, interpreter

Writes ``moe_<gpu>_<routing>.{json,md,png}`` under --out (rewritten after each model,
so an interrupted run keeps what it measured). Without CUDA it runs the shrunk
configs through the Triton interpreter: it exercises the code paths, its numbers
are not performance, and they go to ``benchmarks/results-cpu-interpreter/`` (ignored
by git) instead of ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from tools.runtime import ON_GPU, capture_graph, random_expert_weights, rel_l2  # noqa: E402  (before triton: may switch the interpreter on)

import triton  # noqa: E402

import moe_ops  # noqa: E402  (registers torch.ops.tritonmoe)
from benchmarks.grouped_baseline import grouped_mm_available, grouped_mm_moe  # noqa: E402
from moe_ops.configs import MoEConfig, get_config, shrink  # noqa: E402
from moe_ops.reference import fused_experts_reference, moe_reference, route_reference  # noqa: E402
from moe_ops.tiles import get_tile_config  # noqa: E402
from tools.roofline import floor, measure_ceilings, profile_kernels  # noqa: E402

DEFAULT_MODELS = ["mixtral-8x7b", "deepseek-v3", "qwen2-57b-a14b", "qwen3-30b-a3b"]
DEFAULT_TOKENS = [1, 8, 32, 128, 512, 2048, 8192]
CPU_TOKENS = [1, 5, 33]
SYSTEMS = ["fused_experts", "fused_experts+graph", "fused_moe", "fused_moe+graph",
           "grouped_mm", "grouped_mm+graph", "reference", "megablocks"]
COLORS = {"fused_experts": "C0", "fused_moe": "C1", "grouped_mm": "C2", "reference": "C3",
          "megablocks": "C4"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def log(msg: str) -> None:
    print(msg, flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ------------------------------------------------------------------------ inputs

def make_layer(cfg: MoEConfig, dtype: torch.dtype, device: torch.device, routing: str,
               zipf_s: float, gen: torch.Generator) -> dict:
    """Random expert weights, a router and (for DeepSeek-V3) a zero score bias.

    Router column 0 carries a per-expert logit bias (hidden column 0 is set to 1), so
    logits = N(0, 1) noise + log popularity: zero for uniform routing, -s*log(rank) for
    Zipf(s), ranks a random permutation of the experts.
    """
    e, h = cfg.num_experts, cfg.hidden_size
    w_gate_up, w_down = random_expert_weights(cfg, dtype, device, gen)
    router = torch.randn(e, h, device=device, generator=gen) * (h - 1) ** -0.5
    log_pop = torch.zeros(e, device=device)
    if routing == "zipf":
        rank = torch.randperm(e, device=device, generator=gen).float() + 1
        log_pop = -zipf_s * rank.log()
    router[:, 0] = log_pop
    score_bias = torch.zeros(e, dtype=torch.float32, device=device) if cfg.score_bias else None
    return dict(w_gate_up=w_gate_up, w_down=w_down, router=router.to(dtype), score_bias=score_bias)


def make_tokens(cfg: MoEConfig, num_tokens: int, dtype, device, gen) -> torch.Tensor:
    x = torch.randn(num_tokens, cfg.hidden_size, device=device, generator=gen)
    x[:, 0] = 1.0  # the router's bias input
    return x.to(dtype)


# ------------------------------------------------------------------------ timing

class Timer:
    """do_bench (CUDA events, L2 flushed, median) on a GPU; perf_counter medians on CPU."""

    def __init__(self, warmup_ms: float, rep_ms: float, cpu_reps: int):
        self.warmup_ms, self.rep_ms, self.cpu_reps = warmup_ms, rep_ms, cpu_reps

    def __call__(self, fn) -> float:
        if ON_GPU:
            return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                           return_mode="median")
        fn()
        times = []
        for _ in range(self.cpu_reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def describe(self) -> str:
        if ON_GPU:
            return (f"median of per-call CUDA-event timings, triton.testing.do_bench "
                    f"(warmup {self.warmup_ms} ms, rep {self.rep_ms} ms), L2 flushed between calls")
        return f"median of {self.cpu_reps} time.perf_counter timings after 1 warm-up call (CPU)"


def count_launches(fn) -> tuple[int | None, list]:
    """GPU activities of one call and their names (None on CPU)."""
    if not ON_GPU:
        return None, []
    kernels = profile_kernels(fn, runs=1, flush=False)
    if not kernels:  # CUPTI unavailable or not permitted: say so rather than report 0
        return None, [["torch.profiler saw no GPU activity", 0]]
    names = Counter(name for name, _ in kernels)
    return len(kernels), [[n, c] for n, c in names.most_common(12)]


# ------------------------------------------------------------------- megablocks

def megablocks_factory(cfg: MoEConfig, dtype, device):
    """A callable x -> out from Megablocks' dMoE with this config's shapes, or a reason."""
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as exc:  # ImportError, or a broken install
        return None, f"not installed ({type(exc).__name__})"
    try:
        args = Arguments(
            hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
            moe_num_experts=cfg.num_experts, moe_top_k=cfg.top_k, mlp_type="glu",
            mlp_impl="grouped", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            device=device, return_bias=False)
        layer = dMoE(args).eval()
        return (lambda x: layer(x.unsqueeze(1))), "own router and random weights; dropless dMoE"
    except Exception as exc:
        return None, f"megablocks setup failed: {type(exc).__name__}: {str(exc)[:160]}"


# --------------------------------------------------------------------- one cell

def bench_cell(cfg, layer, num_tokens, args, timer, ceilings, gen, dtype, device, mega):
    """All systems at one (model, T); returns rows (without speedups) and notes."""
    t = num_tokens
    x = make_tokens(cfg, t, dtype, device, gen)
    routing = cfg.routing_kwargs()
    topk_weights, topk_ids = route_reference(x, layer["router"], score_bias=layer["score_bias"],
                                             **routing)
    counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=cfg.num_experts)
    distinct = int((counts > 0).sum())
    hottest = float(counts.max()) / (t * cfg.top_k)
    b = x.element_size()
    floor_experts = floor(cfg, t, ceilings, distinct=distinct, bytes_per_elem=b)
    floor_moe = floor(cfg, t, ceilings, distinct=distinct, bytes_per_elem=b, include_router=True)
    tag = f"[{cfg.name} T={t}]"
    log(f"{tag} routing {args.routing}: {distinct}/{cfg.num_experts} experts hit, hottest has "
        f"{100 * hottest:.1f}% of slots; floor {floor_experts.floor_s * 1e3:.4f} ms "
        f"({floor_experts.bound}-bound)")

    wg, wd = layer["w_gate_up"], layer["w_down"]
    moe_kwargs = dict(routing, score_bias=layer["score_bias"])
    fns = {
        "fused_experts": lambda: torch.ops.tritonmoe.fused_experts(x, topk_weights, topk_ids, wg, wd),
        "fused_moe": lambda: torch.ops.tritonmoe.fused_moe(x, layer["router"], wg, wd, **moe_kwargs),
        "grouped_mm": lambda: grouped_mm_moe(x, topk_weights, topk_ids, wg, wd),
        "reference": lambda: fused_experts_reference(x, topk_weights, topk_ids, wg, wd),
    }
    notes = {}
    grouped_ok, grouped_why = grouped_mm_available(device, dtype)
    if not grouped_ok:
        notes["grouped_mm"] = notes["grouped_mm+graph"] = grouped_why
        del fns["grouped_mm"]

    # Correctness, once, outside timing.
    checks = {}
    if t <= args.check_max_t:
        ref = fused_experts_reference(x, topk_weights, topk_ids, wg, wd)
        ref_moe = moe_reference(x, layer["router"], wg, wd, **moe_kwargs)
        checked = {s.split("+")[0] for s in args.systems} - {"reference", "megablocks"}
        for name, fn in fns.items():
            if name not in checked:
                continue
            err = rel_l2(fn(), ref_moe if name == "fused_moe" else ref)
            checks[name] = err
            flag = "" if err <= 2e-2 else "   <-- MISMATCH"
            log(f"{tag} check {name:14s} rel L2 vs reference = {err:.2e}{flag}")
            if math.isnan(err):
                raise SystemExit(f"{tag} {name} produced NaN/inf: aborting the benchmark")
        del ref, ref_moe

    rows = []

    def add(system, ms, launches=None, kernels=(), note="", fl=floor_experts, extra=None):
        row = dict(model=cfg.name, T=t, system=system, ms=ms, floor_ms=fl.floor_s * 1e3,
                   pct_floor=(100.0 * fl.floor_s * 1e3 / ms) if ms else None,
                   bound=fl.bound, launches=launches, kernels=list(kernels),
                   distinct_experts=distinct, hottest_expert_share=hottest,
                   rel_l2=checks.get(system.split("+")[0]), note=note)
        row.update(extra or {})
        rows.append(row)
        shown = f"{ms:9.4f} ms {row['pct_floor']:6.1f}% of floor" if ms else "      --"
        lc = f"  {launches} launches" if launches is not None else ""
        log(f"{tag} {system:20s}{shown}{lc}{'  (' + note + ')' if note else ''}")

    selected = set(args.systems)
    route_ms = None
    for base in ("fused_experts", "fused_moe", "grouped_mm"):
        fl = floor_moe if base == "fused_moe" else floor_experts
        extra = {}
        if base == "fused_experts":
            extra = {f"tile_{stage}": get_tile_config(stage, cfg.num_experts, cfg.hidden_size,
                                                      cfg.intermediate_size, t, cfg.top_k,
                                                      dtype, device).as_dict()
                     for stage in ("gate_up", "down")}
        if base == "fused_moe" and base in selected:
            route = lambda: torch.ops.tritonmoe.route(x, layer["router"], **moe_kwargs)  # noqa: E731
            route_ms = timer(route)
            extra = {"route_ms": route_ms}
        launches, kernels = None, []
        if base in selected or f"{base}+graph" in selected:
            if base not in fns:
                for system in (base, f"{base}+graph"):
                    if system in selected:
                        add(system, None, note=notes[base], fl=fl)
                continue
            fn = fns[base]
            fn()
            launches, kernels = count_launches(fn)
        if base in selected:
            ms = timer(fn)
            pct = {"route_pct": 100.0 * route_ms / ms} if base == "fused_moe" else {}
            add(base, ms, launches, kernels, fl=fl, extra=dict(extra, **pct))
        if f"{base}+graph" in selected:
            if not ON_GPU:
                add(f"{base}+graph", None, note="no CUDA", fl=fl)
                continue
            try:
                graph, static_out = capture_graph(fn)
                graph.replay()
                diff = rel_l2(static_out, fn())
                ms = timer(graph.replay)
                note = "" if diff <= 1e-3 else f"replay differs from eager by rel L2 {diff:.1e}"
                add(f"{base}+graph", ms, launches, kernels, note=note, fl=fl, extra=extra)
                del graph, static_out
            except Exception as exc:
                add(f"{base}+graph", None, note=f"capture failed: {type(exc).__name__}: "
                    f"{str(exc)[:160]}", fl=fl)

    if "reference" in selected:
        if t > args.reference_max_t:
            add("reference", None, note=f"skipped above T={args.reference_max_t} (too slow)")
        else:
            fn = fns["reference"]
            fn()
            launches, kernels = count_launches(fn)
            add("reference", timer(fn), launches, kernels[:5])

    if "megablocks" in selected:
        factory, why = mega
        if factory is None:
            add("megablocks", None, note=why, fl=floor_moe)
        else:
            try:
                fn = lambda: factory(x)  # noqa: E731
                fn()
                launches, kernels = count_launches(fn)
                add("megablocks", timer(fn), launches, kernels[:5], note=why, fl=floor_moe)
            except Exception as exc:
                add("megablocks", None, note=f"failed: {type(exc).__name__}: {str(exc)[:160]}",
                    fl=floor_moe)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs[other] = other's ms / this row's ms, within each (model, T)."""
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["model"], row["T"]), []).append(row)
    for cell in cells.values():
        for row in cell:
            row["speedup_vs"] = {o["system"]: o["ms"] / row["ms"] for o in cell
                                 if o is not row and o["ms"] and row["ms"]}


# ------------------------------------------------------------------------ outputs

def write_outputs(rows, stamp, out_dir: Path, stem: str, models: list[str],
                  with_plot: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    full = [dict(stamp_fields(stamp), **row) for row in rows]
    (out_dir / f"{stem}.json").write_text(json.dumps(full, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(rows, stamp, models))
    if not with_plot:
        return
    try:
        plot(rows, stamp, models, out_dir / f"{stem}.png")
    except Exception as exc:  # matplotlib missing or headless trouble: tables still stand
        log(f"plot skipped: {type(exc).__name__}: {exc}")


def stamp_fields(stamp: dict) -> dict:
    keys = ("gpu", "routing", "dtype", "torch", "triton", "date", "command", "mode")
    return {k: stamp[k] for k in keys}


def _ms(row) -> str:
    if not row or not row["ms"]:
        return "--"
    return f"{row['ms']:.4g} ({row['pct_floor']:.0f}%)"


def markdown(rows, stamp, models) -> str:
    lines = [f"# MoE forward benchmark: {stamp['gpu']}", ""]
    if stamp["mode"] != "gpu":
        lines += ["**CPU run through the Triton interpreter on shrunk configs: these numbers "
                  "are not performance.**", ""]
    c = stamp["ceilings"]
    lines += [
        f"- torch {stamp['torch']}, triton {stamp['triton']}, {stamp['date']}",
        f"- command: `{stamp['command']}`",
        f"- routing: {stamp['routing']}; dtype {stamp['dtype']}; {stamp['timing']}",
        f"- measured ceilings: copy {c['bandwidth'] / 1e12:.3f} TB/s (read + written), "
        f"matmul {c['matmul_rate'] / 1e12:.1f} TFLOP/s ({c['note']})",
        "- floor = max(bytes / copy BW, flops / matmul rate) with bytes = distinct experts hit "
        "x 3*H*I*b + x read + out written, flops = 2*T*K*3*H*I (fused_moe and megablocks rows "
        "add the router); cells show `ms (% of floor)`, 100% = at the floor",
        f"- {stamp['id_check']}",
        "",
    ]
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
    for model in models:
        mrows = [r for r in rows if r["model"] == model]
        if not mrows:
            continue
        tokens = sorted({r["T"] for r in mrows})
        cell = {(r["T"], r["system"]): r for r in mrows}
        any_row = mrows[0]
        lines += [f"## {model}", "",
                  "| T | experts hit | floor ms | bound | " + " | ".join(systems) + " |",
                  "|---:|---:|---:|---|" + "---:|" * len(systems)]
        for t in tokens:
            first = next(r for r in mrows if r["T"] == t)
            lines.append(f"| {t} | {first['distinct_experts']} | {first['floor_ms']:.4f} | "
                         f"{first['bound']} | " + " | ".join(_ms(cell.get((t, s))) for s in systems)
                         + " |")
        lines += ["", "Launches per forward (GPU activities, torch.profiler):", "",
                  "| T | " + " | ".join(systems) + " |", "|---:|" + "---:|" * len(systems)]
        for t in tokens:
            vals = [cell.get((t, s), {}).get("launches") for s in systems]
            lines.append(f"| {t} | " + " | ".join("--" if v is None else str(v) for v in vals) + " |")
        ours = [s for s in ("fused_experts+graph", "fused_experts")
                if any(r["system"] == s and r["ms"] for r in mrows)]
        if ours:
            mine = ours[0]
            others = [s for s in systems if s != mine]
            lines += ["", f"Speedup of {mine} over each system (their ms / ours):", "",
                      "| T | " + " | ".join(others) + " |", "|---:|" + "---:|" * len(others)]
            for t in tokens:
                sp = cell.get((t, mine), {}).get("speedup_vs", {})
                lines.append(f"| {t} | " + " | ".join(
                    f"{sp[o]:.2f}x" if o in sp else "--" for o in others) + " |")
        route = [(t, cell[(t, "fused_moe")]) for t in tokens if (t, "fused_moe") in cell
                 and cell[(t, "fused_moe")].get("route_pct") is not None]
        if route:
            lines += ["", "Routing share of eager fused_moe: " + ", ".join(
                f"T={t}: {r['route_ms']:.4f} ms = {r['route_pct']:.1f}%" for t, r in route)]
        notes = sorted({(r["system"], r["note"]) for r in mrows if r["note"]})
        checks = sorted({(r["T"], r["system"].split("+")[0], r["rel_l2"]) for r in mrows
                         if r["rel_l2"] is not None})
        if checks:
            lines += ["", "Correctness (relative L2 vs the reference): " + ", ".join(
                f"T={t} {s} {e:.1e}" for t, s, e in checks)]
        if notes:
            lines += ["", "Notes:"] + [f"- {s}: {n}" for s, n in notes]
        lines += ["", f"(E={any_row['E']}, K={any_row['K']}, H={any_row['H']}, I={any_row['I']})", ""]
    return "\n".join(lines) + "\n"


def plot(rows, stamp, models, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in models if any(r["model"] == m for r in rows)]
    ncols = min(2, len(models))
    nrows = math.ceil(len(models) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.5 * nrows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for system in SYSTEMS:
            pts = sorted((r["T"], r["pct_floor"]) for r in rows
                         if r["model"] == model and r["system"] == system and r["pct_floor"])
            if pts:
                base = system.split("+")[0]
                ax.plot(*zip(*pts), marker="o", label=system, color=COLORS[base],
                        ls="--" if system.endswith("+graph") else "-")
        ax.axhline(100, color="black", lw=0.8)
        ax.axhline(90, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        tokens = sorted({r["T"] for r in rows if r["model"] == model})
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("% of floor (100 = floor)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(models):]:
        ax.set_visible(False)
    title = (f"{stamp['gpu']} | torch {stamp['torch']} | triton {stamp['triton']} | "
             f"{stamp['routing']} | {stamp['dtype']} | {stamp['date']}\n{stamp['command']}")
    if stamp["mode"] != "gpu":
        title = "CPU / Triton interpreter: NOT performance\n" + title
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main

# Interpreter runs are not performance: they never land beside the GPU tables.
DEFAULT_OUT = REPO_ROOT / "benchmarks" / ("results" if ON_GPU else "results-cpu-interpreter")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help=f"config names (default {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help=f"token counts (default {DEFAULT_TOKENS}; CPU {CPU_TOKENS})")
    p.add_argument("--routing", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--zipf-s", type=float, default=1.2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="output folder (default benchmarks/results on a GPU; on CPU the "
                        "git-ignored benchmarks/results-cpu-interpreter, not GPU results)")
    p.add_argument("--quick", action="store_true",
                   help="GPU: mixtral-8x7b, qwen3-30b-a3b at T=1,32,512; CPU: mixtral at T=1,5")
    p.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    p.add_argument("--reference-max-t", type=int, default=512,
                   help="skip the reference loop above this T")
    p.add_argument("--check-max-t", type=int, default=128,
                   help="check correctness against the reference up to this T")
    p.add_argument("--warmup-ms", type=float, default=25)
    p.add_argument("--rep-ms", type=float, default=100)
    p.add_argument("--check-ids", action="store_true",
                   help="keep fused_experts' eager topk_ids range check (a host sync) in timings")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.models is None:
        if args.quick:
            args.models = ["mixtral-8x7b", "qwen3-30b-a3b"] if ON_GPU else ["mixtral-8x7b"]
        else:
            args.models = DEFAULT_MODELS
    if args.tokens is None:
        if ON_GPU:
            args.tokens = [1, 32, 512] if args.quick else DEFAULT_TOKENS
        else:
            args.tokens = [1, 5] if args.quick else CPU_TOKENS
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    device = torch.device("cuda" if ON_GPU else "cpu")
    torch.set_grad_enabled(False)
    if not args.check_ids:
        moe_ops.set_topk_ids_check(False)
    routing_name = args.routing if args.routing == "uniform" else f"zipf(s={args.zipf_s})"
    gpu = torch.cuda.get_device_name() if ON_GPU else "cpu-interpreter"
    if not ON_GPU:
        log("NO CUDA: running shrunk configs through the Triton interpreter "
            "(TRITON_INTERPRET=1). This exercises the code paths; the numbers are NOT performance.")
    t0 = time.time()
    log(f"measuring ceilings on {gpu} ...")
    ceilings = measure_ceilings(device, dtype)
    log(f"ceilings: copy {ceilings.bandwidth / 1e12:.3f} TB/s, matmul "
        f"{ceilings.matmul_rate / 1e12:.1f} TFLOP/s ({ceilings.note})")
    timer = Timer(args.warmup_ms, args.rep_ms, cpu_reps=1)
    stamp = dict(
        gpu=gpu, routing=routing_name, dtype=args.dtype, torch=torch.__version__,
        triton=triton.__version__, mode="gpu" if ON_GPU else "cpu-interpreter",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else
        "main(" + " ".join(argv) + ")",
        timing=timer.describe(),
        ceilings=dict(bandwidth=ceilings.bandwidth, matmul_rate=ceilings.matmul_rate,
                      note=ceilings.note),
        id_check=("fused_experts timings include its eager topk_ids range check (--check-ids)"
                  if args.check_ids else "fused_experts' eager topk_ids range check (a host "
                  "sync) is switched off for timing, as a caller passing trusted ids would"),
    )
    stem = f"moe_{slug(gpu)}_{slug(args.routing if args.routing == 'uniform' else f'zipf{args.zipf_s}')}"
    if args.quick:
        stem += "_quick"
    out_dir = Path(args.out)

    rows: list[dict] = []
    model_names = []
    for name in args.models:
        cfg = get_config(name) if ON_GPU else shrink(name)
        model_names.append(cfg.name)
        log(f"\n=== {cfg.name}: E={cfg.num_experts} K={cfg.top_k} H={cfg.hidden_size} "
            f"I={cfg.intermediate_size} ({time.time() - t0:.0f} s elapsed)")
        gen = torch.Generator(device=device).manual_seed(args.seed)
        layer = make_layer(cfg, dtype, device, args.routing, args.zipf_s, gen)
        mega = megablocks_factory(cfg, dtype, device) if "megablocks" in args.systems else (None, "")
        for t in args.tokens:
            cell = bench_cell(cfg, layer, t, args, timer, ceilings, gen, dtype, device, mega)
            for row in cell:
                row.update(E=cfg.num_experts, K=cfg.top_k, H=cfg.hidden_size,
                           I=cfg.intermediate_size, routing=routing_name, gpu=gpu)
            rows += cell
            add_speedups(rows)
            write_outputs(rows, stamp, out_dir, stem, model_names, with_plot=False)
            if ON_GPU:
                torch.cuda.empty_cache()
        del layer, mega
        gc.collect()
        if ON_GPU:
            torch.cuda.empty_cache()
        add_speedups(rows)
        write_outputs(rows, stamp, out_dir, stem, model_names)
    log(f"\nwrote {out_dir / stem}.{{json,md,png}} in {time.time() - t0:.0f} s")
    if not ON_GPU:
        log("(CPU / Triton interpreter: the numbers above are NOT performance.)")


if __name__ == "__main__":
    main()
