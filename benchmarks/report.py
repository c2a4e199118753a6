"""The main benchmark's outputs: JSON rows, a markdown table and a plot per run.

Rows are those of ``benchmarks/cell_timing.py`` plus the run's stamp (gpu, routing,
dtype, versions, date, command, mode) and ``speedup_vs``; the markdown has, per model,
ms and % of floor per system, launches per forward, our speed-up over each system, the
routing share of fused_moe, correctness and notes; the plot is % of floor against T.
Columns follow the order of ``systems`` (names, registry order); a "+graph" system is
drawn dashed in its family's colour.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.systems import family
from tools.cli import log


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs[other] = other's ms / this row's ms, within each (model, T)."""
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["model"], row["T"]), []).append(row)
    for cell in cells.values():
        for row in cell:
            row["speedup_vs"] = {o["system"]: o["ms"] / row["ms"] for o in cell
                                 if o is not row and o["ms"] and row["ms"]}


def write_outputs(rows, stamp, out_dir: Path, stem: str, models: list[str], systems: list[str],
                  with_plot: bool = True) -> None:
    """``<stem>.json`` and ``<stem>.md`` under ``out_dir`` and, if asked, ``<stem>.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    full = [dict(stamp_fields(stamp), **row) for row in rows]
    (out_dir / f"{stem}.json").write_text(json.dumps(full, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(rows, stamp, models, systems))
    if not with_plot:
        return
    try:
        plot(rows, stamp, models, systems, out_dir / f"{stem}.png")
    except Exception as exc:  # matplotlib missing or headless trouble: tables still stand
        log(f"plot skipped: {type(exc).__name__}: {exc}")


def stamp_fields(stamp: dict) -> dict:
    """The stamp's fields every JSON row repeats."""
    keys = ("gpu", "routing", "dtype", "torch", "triton", "date", "command", "mode")
    return {k: stamp[k] for k in keys}


def _ms(row) -> str:
    if not row or not row["ms"]:
        return "--"
    return f"{row['ms']:.4g} ({row['pct_floor']:.0f}%)"


def markdown(rows, stamp, models, systems: list[str]) -> str:
    """The run's tables, one section per model."""
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
    systems = [s for s in systems if any(r["system"] == s for r in rows)]
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
        checks = sorted({(r["T"], family(r["system"]), r["rel_l2"]) for r in mrows
                         if r["rel_l2"] is not None})
        if checks:
            lines += ["", "Correctness (relative L2 vs the reference): " + ", ".join(
                f"T={t} {s} {e:.1e}" for t, s, e in checks)]
        if notes:
            lines += ["", "Notes:"] + [f"- {s}: {n}" for s, n in notes]
        lines += ["", f"(E={any_row['E']}, K={any_row['K']}, H={any_row['H']}, I={any_row['I']})", ""]
    return "\n".join(lines) + "\n"


def plot(rows, stamp, models, systems: list[str], path: Path) -> None:
    """% of floor against T, one panel per model, to ``path``."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in models if any(r["model"] == m for r in rows)]
    colors = {f: f"C{n}" for n, f in enumerate(dict.fromkeys(map(family, systems)))}
    ncols = min(2, len(models))
    nrows = math.ceil(len(models) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.5 * nrows), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for system in systems:
            pts = sorted((r["T"], r["pct_floor"]) for r in rows
                         if r["model"] == model and r["system"] == system and r["pct_floor"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system, color=colors[family(system)],
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
