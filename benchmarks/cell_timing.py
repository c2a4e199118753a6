"""Time every selected system at one (model, T) and return one row per system.

Per system family (an eager system and its "+graph" replay), outside every timing: one
warm-up call, the correctness check against the reference (relative L2, printed; NaN or
inf aborts the run), the launches of one forward (GPU activities from torch.profiler) and
the family's extra row fields. Then each selected row is timed (``tools.timing.Timer``):
the eager call, or the replay of one captured CUDA graph after checking that the replay
matches the eager output. Floors (``tools.roofline.floor``) use the distinct experts this
routing hits; a system that routes by itself is held to the floor that includes the router.
"""
from __future__ import annotations

import math

import torch

from benchmarks.inputs import Cell
from benchmarks.other_systems import Unavailable
from moe_ops.reference import fused_experts_reference, moe_reference, rel_l2
from tools.cli import log
from tools.profiler import count_launches
from tools.roofline import floor
from tools.timing import capture_graph

CHECK_TOL = 2e-2  # relative L2 against the reference above which a row is flagged
REPLAY_TOL = 1e-3  # relative L2 between a graph replay and the eager call


def time_cell(cell: Cell, systems: list, prepared: dict, timer, ceilings, args) -> list[dict]:
    """Rows of every system in ``systems`` (registry order) at this cell. ``prepared`` maps
    each family to ``prepare(layer)``'s result or the ``Unavailable`` it raised; ``args``
    (bench_moe's) gives check_max_t, reference_max_t and routing_name."""
    cfg, t = cell.layer.cfg, cell.num_tokens
    counts = torch.bincount(cell.topk_ids.reshape(-1).long(), minlength=cfg.num_experts)
    distinct = int((counts > 0).sum())
    hottest = float(counts.max()) / (t * cfg.top_k)
    b = cell.x.element_size()
    floors = {with_router: floor(cfg, t, ceilings, distinct=distinct, bytes_per_elem=b,
                                 include_router=with_router) for with_router in (False, True)}
    tag = f"[{cfg.name} T={t}]"
    log(f"{tag} routing {args.routing_name}: {distinct}/{cfg.num_experts} experts hit, hottest has "
        f"{100 * hottest:.1f}% of slots; floor {floors[False].floor_s * 1e3:.4f} ms "
        f"({floors[False].bound}-bound)")
    rows: list[dict] = []

    def add(system, ms, launches=None, kernels=(), note="", rel_err=None, extra=None):
        fl = floors[system.with_router]
        note = "; ".join(n for n in (system.note, note) if n)
        row = dict(model=cfg.name, T=t, system=system.name, ms=ms, floor_ms=fl.floor_s * 1e3,
                   pct_floor=(100.0 * fl.floor_s * 1e3 / ms) if ms else None,
                   bound=fl.bound, launches=launches, kernels=list(kernels),
                   distinct_experts=distinct, hottest_expert_share=hottest,
                   rel_l2=rel_err, note=note, **(extra or {}))
        rows.append(row)
        shown = f"{ms:9.4f} ms {row['pct_floor']:6.1f}% of floor" if ms else "      --"
        lc = f"  {launches} launches" if launches is not None else ""
        log(f"{tag} {system.name:20s}{shown}{lc}{'  (' + note + ')' if note else ''}")

    references = {}

    def reference(kind: str) -> torch.Tensor:
        if kind not in references:
            layer = cell.layer
            references[kind] = (
                moe_reference(cell.x, layer.router, layer.w_gate_up, layer.w_down, **layer.moe_kwargs)
                if kind == "moe" else
                fused_experts_reference(cell.x, cell.topk_weights, cell.topk_ids,
                                        layer.w_gate_up, layer.w_down))
        return references[kind]

    families: dict[str, list] = {}
    for system in systems:
        families.setdefault(system.family, []).append(system)
    for family, members in families.items():
        first = members[0]
        made = prepared[family]
        if isinstance(made, Unavailable):
            for system in members:
                add(system, None, note=str(made))
            continue
        if first.slow and t > args.reference_max_t:
            for system in members:
                add(system, None, note=f"skipped above T={args.reference_max_t} (too slow)")
            continue
        fn = made(cell)
        try:
            out = fn()
            err = None
            if first.checked_against and t <= args.check_max_t:
                err = rel_l2(out, reference(first.checked_against))
                flag = "" if err <= CHECK_TOL else "   <-- MISMATCH"
                log(f"{tag} check {family:14s} rel L2 vs reference = {err:.2e}{flag}")
                if math.isnan(err):
                    raise SystemExit(f"{tag} {family} produced NaN/inf: aborting the benchmark")
            launches, kernels = count_launches(fn)
            extra = first.extras(cell, timer) if first.extras else {}
        except Exception as exc:
            if not first.external:
                raise
            for system in members:
                add(system, None, note=f"failed: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        for system in members:
            if system.graph and not timer.gpu:
                add(system, None, note="no CUDA")
                continue
            ms, note = time_replay(fn, timer) if system.graph else (timer(fn), "")
            fields = dict(extra)
            if "route_ms" in extra and ms and not system.graph:  # routing's share of the eager op
                fields["route_pct"] = 100.0 * extra["route_ms"] / ms
            add(system, ms, launches, kernels, note=note, rel_err=err, extra=fields)
    return rows


def time_replay(fn, timer) -> tuple[float | None, str]:
    """(ms per replay of one captured call of ``fn``, a note): the note says where the
    replay differs from an eager call or why capture failed (ms None)."""
    try:
        graph, static_out = capture_graph(fn)
        graph.replay()
        diff = rel_l2(static_out, fn())
        ms = timer(graph.replay)
        del graph, static_out
    except Exception as exc:
        return None, f"capture failed: {type(exc).__name__}: {str(exc)[:160]}"
    return ms, "" if diff <= REPLAY_TOL else f"replay differs from eager by rel L2 {diff:.1e}"
