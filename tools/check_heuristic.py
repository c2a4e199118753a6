"""Time the heuristic tiles against the tuned table's in every cell, no search: how far an
untuned GPU of this kind would land from its tuned numbers.

Each cell times ``fused_experts_impl`` twice under uniform routing, replayed from a CUDA
graph (``tools.tune``'s timer): with ``moe_ops.tiles.heuristic_tile`` and with the tiles
``get_tile_config`` looks up. One JSON line per cell goes to ``<out stem>.heuristic.jsonl``
(--out names the table as for the tuner; the table itself is not written). Run from the
checkout root::

    python -m tools.check_heuristic --out benchmarks/results/nvidia-h200.json

Without CUDA it runs shrunk configs through the Triton interpreter: a check of the code
path, not a measurement.
"""
from __future__ import annotations

from tools.cli import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before anything imports triton

import json  # noqa: E402

import torch  # noqa: E402

from moe_ops.dtypes import BY_NAME  # noqa: E402
from moe_ops.pipeline import fused_experts_impl  # noqa: E402
from moe_ops.tiles import get_tile_config, has_tma, heuristic_tile  # noqa: E402
from tools.cli import log, on_gpu  # noqa: E402
from tools.tune import CPU_NOTICE, cell_arguments, device_and_table, resolve_cells, tile_timer  # noqa: E402
from tools.workloads import layer_config, random_expert_weights, random_routing  # noqa: E402

STAGES = ("gate_up", "down")


@torch.no_grad()
def main(argv=None) -> None:
    """Time both tile choices in every cell and append one record per cell."""
    gpu = on_gpu()
    args = cell_arguments(__doc__.split("\n\n")[0]).parse_args(argv)
    resolve_cells(args, gpu)
    dtype = BY_NAME[args.dtype]
    device, gpu_name, table = device_and_table(args.out, gpu)
    path = table.with_name(table.stem + ".heuristic.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not gpu:
        log(CPU_NOTICE)
    timer = tile_timer(args)
    for name in args.models:
        cfg = layer_config(name, gpu)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        e, k, h, i = cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size
        w_gate_up, w_down = random_expert_weights(cfg, dtype, device, gen)
        for t in args.tokens:
            x = torch.randn(t, h, device=device, generator=gen).to(dtype)
            topk_weights, topk_ids = random_routing(t, e, k, 0.0, device, gen)
            tiles = {"heuristic": [heuristic_tile(s, e, h, i, t, k, dtype, has_tma(device))
                                   for s in STAGES],
                     "table": [get_tile_config(s, e, h, i, t, k, dtype, device) for s in STAGES]}
            ms = {}
            for kind, (gu, dn) in tiles.items():
                def run(gu=gu, dn=dn):
                    return fused_experts_impl(x, topk_weights, topk_ids, w_gate_up, w_down,
                                              gate_up_tile=gu, down_tile=dn)
                ms[kind] = timer.replayed(run)
            log(f"[{cfg.name} T={t}] heuristic {ms['heuristic']:.4f} ms, table {ms['table']:.4f} ms: "
                f"heuristic/table {ms['heuristic'] / ms['table']:.3f}")
            with path.open("a") as f:
                f.write(json.dumps({"model": cfg.name, "T": t, "gpu": gpu_name, "ms": ms,
                                    **{kind: [tl.as_dict() for tl in v] for kind, v in tiles.items()}}) + "\n")
        if gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
