"""The MoE forward systems the benchmark times, as data.

Each ``System`` says how to build, for one model's layer, a function that makes a
cell's forward (``prepare(layer)(cell)() -> out [T, H]``), whether its rows are CUDA-graph
replays, whether it routes by itself (its floor then includes the router), which
reference its output is checked against, and what else a row records. ``prepare``
raises ``Unavailable`` where the system cannot run here (not installed, no CUDA, an
unsupported dtype); the row then carries the reason.

    fused_experts[+graph]   our op given the routing
    fused_moe[+graph]       our op with routing included
    grouped_mm[+graph]      PyTorch: sort by expert, torch._grouped_mm x2, SiLU*mul,
                            weighted index_add (benchmarks/grouped_baseline.py)
    reference               the per-expert loop of moe_ops.reference (naive, slow)
    megablocks              Megablocks' dMoE where installed (own router, random weights)
    vllm[+graph]            vLLM's Triton fused_experts where installed, given the routing
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

import moe_ops  # noqa: F401  (registers torch.ops.tritonmoe)
from benchmarks.grouped_baseline import grouped_mm_available, grouped_mm_moe
from benchmarks.inputs import Cell, Layer
from benchmarks.other_systems import Unavailable, megablocks_dmoe, vllm_fused_experts
from moe_ops.reference import fused_experts_reference
from moe_ops.tiles import get_tile_config


@dataclass(frozen=True)
class System:
    """One column of the benchmark tables."""

    name: str
    prepare: Callable[[Layer], Callable[[Cell], Callable[[], torch.Tensor]]]
    graph: bool = False  # timed as a CUDA-graph replay of one captured call
    with_router: bool = False  # routes by itself: its floor adds the router's bytes and flops
    checked_against: str | None = "experts"  # "experts", "moe" (with routing) or None
    slow: bool = False  # skipped above --reference-max-t
    external: bool = False  # another project's code: a failure is a note, not a stop
    note: str = ""  # said in every row
    extras: Callable[[Cell, Callable], dict] | None = None  # (cell, timer) -> row fields

    @property
    def family(self) -> str:
        """The eager system a "+graph" row replays (its own name otherwise)."""
        return family(self.name)


def family(name: str) -> str:
    """``"fused_moe+graph"`` -> ``"fused_moe"``: the eager system a graph row replays."""
    return name.removesuffix("+graph")


def _given_routing(forward):
    """``prepare`` of a forward taking (x, topk_weights, topk_ids, w_gate_up, w_down)."""
    def prepare(layer: Layer):
        return lambda cell: functools.partial(forward, cell.x, cell.topk_weights, cell.topk_ids,
                                              layer.w_gate_up, layer.w_down)
    return prepare


def _fused_moe(layer: Layer):
    return lambda cell: functools.partial(torch.ops.tritonmoe.fused_moe, cell.x, layer.router,
                                          layer.w_gate_up, layer.w_down, **layer.moe_kwargs)


def _grouped_mm(layer: Layer):
    works, why = grouped_mm_available(layer.w_gate_up.device, layer.w_gate_up.dtype)
    if not works:
        raise Unavailable(why)
    return _given_routing(grouped_mm_moe)(layer)


def _tiles(cell: Cell, timer) -> dict:
    """The tiles the op looks up for this cell, per stage."""
    cfg, w = cell.layer.cfg, cell.layer.w_gate_up
    return {f"tile_{stage}": get_tile_config(stage, cfg.num_experts, cfg.hidden_size,
                                             cfg.intermediate_size, cell.num_tokens, cfg.top_k,
                                             w.dtype, w.device).as_dict()
            for stage in ("gate_up", "down")}


def _route_ms(cell: Cell, timer) -> dict:
    """The eager router alone, to say what share of fused_moe routing takes."""
    layer = cell.layer
    return {"route_ms": timer(lambda: torch.ops.tritonmoe.route(cell.x, layer.router,
                                                                 **layer.moe_kwargs))}


_fused_experts = _given_routing(torch.ops.tritonmoe.fused_experts)
SYSTEMS = [
    System("fused_experts", _fused_experts, extras=_tiles),
    System("fused_experts+graph", _fused_experts, graph=True, extras=_tiles),
    System("fused_moe", _fused_moe, with_router=True, checked_against="moe", extras=_route_ms),
    System("fused_moe+graph", _fused_moe, graph=True, with_router=True, checked_against="moe",
           extras=_route_ms),
    System("grouped_mm", _grouped_mm),
    System("grouped_mm+graph", _grouped_mm, graph=True),
    System("reference", _given_routing(fused_experts_reference), checked_against=None, slow=True),
    System("megablocks", megablocks_dmoe, with_router=True, checked_against=None, external=True,
           note="own router and random weights; dropless dMoE"),
    System("vllm", vllm_fused_experts, external=True),
    System("vllm+graph", vllm_fused_experts, graph=True, external=True),
]
