"""Where the grouped GEMMs lose time: the same kernel as a MoE stage, as a plain dense
GEMM, and cuBLAS's dense GEMM of that shape, against the matmul-rate floor.

For a model and T, with R = T*K routed rows (uniform routing):

    moe     our kernel in ``fused_experts`` (E experts, rows gathered by slot, blocks
            padded per expert, the tile order of the grid);
    dense   the same kernel and tile over one expert and R identity rows (every row to
            expert 0): a plain [R, K] x [K, N] GEMM, so moe/dense is what the MoE
            structure costs (padding, gather, tile order, weights per expert) and
            dense/cublas what the main loop costs against the vendor GEMM;
    cublas  ``torch.matmul`` of that dense shape;
    floor   flops / the measured matmul rate (``tools.ceilings``).

Kernel times are medians of torch.profiler GPU activities (L2 flushed before each
call). Variants re-run the same rows with the weights (``desc``) or also down's A
tiles (``desc+a``) through tensor descriptors. Run from the checkout root::

    python -m tools.gemm_probe --models mixtral-8x7b deepseek-v3 --tokens 2048 8192
"""
from __future__ import annotations

from tools.cli import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before anything imports triton

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from moe_ops.configs import get_config  # noqa: E402
from moe_ops.pipeline import fused_experts_impl  # noqa: E402
from moe_ops.tiles import get_tile_config  # noqa: E402
from tools.ceilings import measure_ceilings  # noqa: E402
from tools.cli import on_gpu  # noqa: E402
from tools.profiler import profile_kernels  # noqa: E402
from tools.workloads import MODELS, random_expert_weights, random_routing  # noqa: E402

VARIANTS = {
    "lookup": lambda gu, dn: (gu, dn),
    "desc": lambda gu, dn: (replace(gu, B_DESC=True), replace(dn, B_DESC=True)),
    "desc+a": lambda gu, dn: (replace(gu, B_DESC=True), replace(dn, B_DESC=True, A_DESC=True)),
}


def stage_us(fn, runs: int) -> tuple[float, float]:
    """(gate_up us, down us): the two grouped-GEMM kernels of one profiled call."""
    fn()
    gemms = [us for name, us in profile_kernels(fn, runs=runs) if "grouped_gemm" in name]
    if len(gemms) != 2:
        raise RuntimeError(f"expected 2 grouped-GEMM kernels, profiled {len(gemms)}")
    return gemms[0], gemms[1]


def matmul_us(a: torch.Tensor, b_t: torch.Tensor, runs: int) -> float:
    """One ``a @ b_t.T`` (cuBLAS), profiled."""
    def fn():
        return a @ b_t.T
    fn()
    return sum(us for _, us in profile_kernels(fn, runs=runs))


def probe(name: str, num_tokens: int, variants: list[str], runs: int, dtype, device) -> list[dict]:
    """Rows of (variant, stage) times at one (model, T), printed as they come."""
    cfg = get_config(name)
    e, k, h, i = cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size
    rows = num_tokens * k
    w_gate_up, w_down = random_expert_weights(cfg, dtype, device)
    x = torch.randn(num_tokens, h, device=device, dtype=dtype)
    weights, ids = random_routing(num_tokens, e, k, 0.0, device)
    x_rows = torch.randn(rows, h, device=device, dtype=dtype)
    h_rows = torch.randn(rows, i, device=device, dtype=dtype)
    one_ids = torch.zeros(rows, 1, dtype=torch.int32, device=device)
    one_weights = torch.ones(rows, 1, device=device)
    rate = measure_ceilings(device, dtype).matmul_rate
    floors = (2 * rows * h * 2 * i / rate * 1e6, 2 * rows * i * h / rate * 1e6)
    cublas = (matmul_us(x_rows, w_gate_up[0], runs), matmul_us(h_rows, w_down[0], runs))
    looked_up = tuple(get_tile_config(stage, e, h, i, num_tokens, k, dtype, device)
                      for stage in ("gate_up", "down"))
    out = []
    for variant in variants:
        gu, dn = VARIANTS[variant](*looked_up)
        try:
            moe = stage_us(lambda: fused_experts_impl(x, weights, ids, w_gate_up, w_down,
                                                      gate_up_tile=gu, down_tile=dn), runs)
            dense = stage_us(lambda: fused_experts_impl(x_rows, one_weights, one_ids, w_gate_up[:1],
                                                        w_down[:1], gate_up_tile=gu, down_tile=dn), runs)
        except Exception as exc:  # a tile the backend can not compile (shared memory, descriptor)
            print(f"{name:15s} T={num_tokens:<5d} {variant:7s} FAILED {type(exc).__name__}: "
                  f"{str(exc)[:300]}", flush=True)
            out.append({"model": name, "T": num_tokens, "variant": variant,
                        "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        for j, stage in enumerate(("gate_up", "down")):
            row = {"model": name, "T": num_tokens, "rows": rows, "variant": variant,
                   "stage": stage, "tile": (gu, dn)[j].as_dict(), "moe_us": moe[j],
                   "dense_us": dense[j], "cublas_us": cublas[j], "floor_us": floors[j]}
            out.append(row)
            print(f"{name:15s} T={num_tokens:<5d} {variant:7s} {stage:7s} "
                  f"moe {moe[j]:9.1f} us ({floors[j] / moe[j]:4.0%})  "
                  f"dense {dense[j]:9.1f} us ({floors[j] / dense[j]:4.0%})  "
                  f"cublas {cublas[j]:9.1f} us ({floors[j] / cublas[j]:4.0%})  "
                  f"moe/dense {moe[j] / dense[j]:.2f}  dense/cublas {dense[j] / cublas[j]:.2f}",
                  flush=True)
    return out


@torch.no_grad()
def main(argv=None) -> None:
    """Probe every (model, T) and write the rows, stamped, to --out."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--runs", type=int, default=5, help="profiled calls per measurement")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not on_gpu():
        raise SystemExit("tools.gemm_probe times GPU kernels: it needs CUDA (or ROCm)")
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for name in args.models:
        for t in args.tokens:
            rows += probe(name, t, args.variants, args.runs, dtype, device)
            torch.cuda.empty_cache()
    if args.out:
        stamp = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "triton": triton.__version__,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python -m tools.gemm_probe " + " ".join(argv or sys.argv[1:])}
        Path(args.out).write_text(json.dumps({**stamp, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
