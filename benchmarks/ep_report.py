"""The expert-parallel benchmark's outputs: ``<stem>.json`` (stamp and rows), a markdown
table (one line per model, routing and T per rank, with the ratios that matter) and a
plot of ms against T per model (uniform routing)."""
from __future__ import annotations

import json
from pathlib import Path

SYSTEMS = ["ep_nvlink", "ep_nvlink_all_rows", "ep_nvlink_serving", "ep_nvlink_serving_one_set",
           "ep_all_to_all", "ep_all_to_all_serving", "ep_all_to_all_sync", "compute_only",
           "shared_only", "comm_only", "baseline"]


def write_outputs(rows, stamp, out_dir: Path, stem: str) -> None:
    """The JSON, the markdown and (with matplotlib) the plot, under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(dict(stamp=stamp, rows=rows), indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(rows, stamp))
    try:
        plot(rows, stamp, out_dir / f"{stem}.png")
    except ImportError:
        pass


def markdown(rows, stamp) -> str:
    """The table of every cell."""
    lines = [f"# Expert-parallel MoE, {stamp['gpu']} x{stamp['world_size']}",
             "", f"{stamp['date']}, torch {stamp['torch']}, Triton {stamp['triton']}, "
             f"bf16; command: `{stamp['command']}`", "",
             "Slower rank's median ms (CUDA events; every no-sync system as a CUDA-graph "
             "replay, ep_all_to_all_sync and baseline eager). `x compute` = ep_nvlink / "
             "compute_only; `x comp+shared` = ep_nvlink / (compute_only + shared_only); "
             "`vs baseline` = baseline / ep_nvlink; % floor = the slower rank's "
             "expert-compute floor / ep_nvlink; imbalance = max/mean tokens received; "
             "exposed = ep_nvlink - compute_only - shared_only (ms); MB moved = this rank's "
             "wire bytes per forward, routed rows only / ep_nvlink / ep_nvlink_serving "
             "(ep_all_to_all_serving where nvlink is absent); launches of ep_nvlink's forward.",
             "", "| model | routing | T/rank | " + " | ".join(SYSTEMS)
             + " | x compute | x comp+shared | vs baseline | % floor | imbalance | exposed "
             "| MB moved | launches |",
             "|---|---|---:|" + "---:|" * (len(SYSTEMS) + 8)]
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
        fixed = by.get("ep_nvlink") or by.get("ep_all_to_all") or {}
        serving = by.get("ep_nvlink_serving") or by.get("ep_all_to_all_serving") or {}
        moved = " / ".join(f"{b / 1e6:.2f}" if b is not None else "-" for b in (
            first.get("routed_bytes"), fixed.get("wire_bytes"), serving.get("wire_bytes")))
        ratios = [f"{nv / comp:.2f}" if nv and comp else "-",
                  f"{nv / (comp + (shared or 0)):.2f}" if nv and comp else "-",
                  f"{base / nv:.2f}" if nv and base else "-",
                  f"{100 * first['floor_ms'] / nv:.0f}%" if nv else "-",
                  f"{first['imbalance']:.2f}",
                  f"{nv - comp - (shared or 0):.3f}" if nv and comp else "-", moved,
                  str(fixed.get("launches") or "-")]
        lines.append(f"| {model} | {routing} | {T} | " + " | ".join(ms(s) for s in SYSTEMS)
                     + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, stamp, path: Path) -> None:
    """ms of the slower rank against T per rank, one panel per model, uniform routing."""
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
