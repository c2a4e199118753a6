"""The main job: time every MoE forward system against the measured roofline floor.

For each model config and token count T this times, in one process, the systems of
``benchmarks/systems.py``: our ops given the routing and with it (eager and as CUDA-graph
replays), PyTorch's grouped GEMM, the naive reference loop, and vLLM's Triton
``fused_experts`` and Megablocks' dMoE where they are installed (skipped, with the
reason printed, where not). Per cell (``benchmarks/cell_timing.py``):

Timing: median of per-call CUDA-event timings from ``triton.testing.do_bench`` (L2
flushed before every call). Floor: ``tools.roofline`` with the copy bandwidth and matmul
rate measured in this run and the distinct experts this routing actually hits; % of
floor = floor_ms / ms * 100 (100 = at the floor). Launches: GPU activities in one
forward, counted with torch.profiler outside the timing. Correctness is checked once per
(model, T <= --check-max-t) against the reference (relative L2, printed; NaN aborts).
Run from the checkout root::

    python -m benchmarks.bench_moe                        # 4 models x 7 T, ~5-8 min on an H100
    python -m benchmarks.bench_moe --routing zipf --zipf-s 1.2
    python -m benchmarks.bench_moe --quick                # 2 models x 3 T (CPU: shrunk, interpreter)

Writes ``moe_<gpu>_<routing>.{json,md,png}`` under --out (``benchmarks/report.py``;
rewritten after each cell, so an interrupted run keeps what it measured). Without CUDA
it runs the shrunk configs through the Triton interpreter: it exercises the code paths,
its numbers are not performance, and they go to ``benchmarks/results-cpu-interpreter/``
(ignored by git) instead of ``benchmarks/results/``.
"""
from __future__ import annotations

from tools.cli import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before anything imports triton

import argparse  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

import moe_ops  # noqa: E402
from benchmarks.cell_timing import time_cell  # noqa: E402
from benchmarks.inputs import random_layer, routed_cell  # noqa: E402
from benchmarks.other_systems import Unavailable  # noqa: E402
from benchmarks.report import add_speedups, write_outputs  # noqa: E402
from benchmarks.run_info import command_line, default_out_dir, device_label, utc_now  # noqa: E402
from benchmarks.systems import SYSTEMS  # noqa: E402
from moe_ops.dtypes import BY_NAME  # noqa: E402
from tools.ceilings import measure_ceilings  # noqa: E402
from tools.cli import log, on_gpu, slug  # noqa: E402
from tools.timing import Timer  # noqa: E402
from tools.workloads import MODELS, TOKEN_COUNTS, layer_config  # noqa: E402

CPU_TOKENS = [1, 5, 33]
SYSTEM_NAMES = [s.name for s in SYSTEMS]


def parse_args(argv=None, gpu: bool | None = None):
    """The benchmark's arguments; defaults differ on a CPU (shrunk models, few T)."""
    gpu = on_gpu() if gpu is None else gpu
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help=f"config names (default {' '.join(MODELS)})")
    p.add_argument("--tokens", nargs="+", type=int, default=None,
                   help=f"token counts (default {TOKEN_COUNTS}; CPU {CPU_TOKENS})")
    p.add_argument("--routing", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--zipf-s", type=float, default=1.2)
    p.add_argument("--dtype", choices=sorted(BY_NAME), default="bfloat16")
    p.add_argument("--out", default=str(default_out_dir(gpu)),
                   help="output folder (default benchmarks/results on a GPU; on CPU the "
                        "git-ignored benchmarks/results-cpu-interpreter, not GPU results)")
    p.add_argument("--quick", action="store_true",
                   help="GPU: mixtral-8x7b, qwen3-30b-a3b at T=1,32,512; CPU: mixtral at T=1,5")
    p.add_argument("--systems", nargs="+", default=SYSTEM_NAMES, choices=SYSTEM_NAMES)
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
        quick_models = ["mixtral-8x7b", "qwen3-30b-a3b"] if gpu else ["mixtral-8x7b"]
        args.models = quick_models if args.quick else MODELS
    if args.tokens is None:
        if gpu:
            args.tokens = [1, 32, 512] if args.quick else TOKEN_COUNTS
        else:
            args.tokens = [1, 5] if args.quick else CPU_TOKENS
    args.routing_name = args.routing if args.routing == "uniform" else f"zipf(s={args.zipf_s})"
    return args


def prepare_systems(systems, layer, told: set) -> dict:
    """family -> ``prepare(layer)`` or the ``Unavailable`` it raised; each reason is
    printed once per run (``told``)."""
    prepared = {}
    for system in systems:
        if system.family in prepared:
            continue
        try:
            prepared[system.family] = system.prepare(layer)
        except Unavailable as why:
            prepared[system.family] = why
            if str(why) not in told:
                told.add(str(why))
                log(f"skipping {system.family}: {why}")
    return prepared


@torch.no_grad()
def main(argv=None) -> None:
    """Time every selected system in every (model, T) and write the outputs."""
    gpu = on_gpu()
    args = parse_args(argv, gpu)
    dtype = BY_NAME[args.dtype]
    device = torch.device("cuda" if gpu else "cpu")
    if not args.check_ids:
        moe_ops.set_topk_ids_check(False)
    gpu_name = device_label(gpu)
    if not gpu:
        log("NO CUDA: running shrunk configs through the Triton interpreter "
            "(TRITON_INTERPRET=1). This exercises the code paths; the numbers are NOT performance.")
    t0 = time.time()
    log(f"measuring ceilings on {gpu_name} ...")
    ceilings = measure_ceilings(device, dtype)
    log(f"ceilings: copy {ceilings.bandwidth / 1e12:.3f} TB/s, matmul "
        f"{ceilings.matmul_rate / 1e12:.1f} TFLOP/s ({ceilings.note})")
    timer = Timer(args.warmup_ms, args.rep_ms, cpu_reps=1)
    stamp = dict(
        gpu=gpu_name, routing=args.routing_name, dtype=args.dtype, torch=torch.__version__,
        triton=triton.__version__, mode="gpu" if gpu else "cpu-interpreter", date=utc_now(),
        command=command_line("python", "benchmarks.bench_moe", argv), timing=timer.describe(),
        ceilings=dict(bandwidth=ceilings.bandwidth, matmul_rate=ceilings.matmul_rate,
                      note=ceilings.note),
        id_check=("fused_experts timings include its eager topk_ids range check (--check-ids)"
                  if args.check_ids else "fused_experts' eager topk_ids range check (a host "
                  "sync) is switched off for timing, as a caller passing trusted ids would"),
    )
    routing_slug = slug(args.routing if args.routing == "uniform" else f"zipf{args.zipf_s}")
    stem = f"moe_{slug(gpu_name)}_{routing_slug}" + ("_quick" if args.quick else "")
    out_dir = Path(args.out)
    systems = [s for s in SYSTEMS if s.name in args.systems]
    zipf_s = args.zipf_s if args.routing == "zipf" else 0.0

    rows: list[dict] = []
    model_names: list[str] = []
    told: set = set()
    for name in args.models:
        cfg = layer_config(name, gpu)
        model_names.append(cfg.name)
        log(f"\n=== {cfg.name}: E={cfg.num_experts} K={cfg.top_k} H={cfg.hidden_size} "
            f"I={cfg.intermediate_size} ({time.time() - t0:.0f} s elapsed)")
        gen = torch.Generator(device=device).manual_seed(args.seed)
        layer = random_layer(cfg, dtype, device, zipf_s, gen)
        prepared = prepare_systems(systems, layer, told)
        for t in args.tokens:
            cell = time_cell(routed_cell(layer, t, gen), systems, prepared, timer, ceilings, args)
            for row in cell:
                row.update(E=cfg.num_experts, K=cfg.top_k, H=cfg.hidden_size,
                           I=cfg.intermediate_size, routing=args.routing_name, gpu=gpu_name)
            rows += cell
            add_speedups(rows)
            write_outputs(rows, stamp, out_dir, stem, model_names, SYSTEM_NAMES, with_plot=False)
            if gpu:
                torch.cuda.empty_cache()
        del layer, prepared
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        write_outputs(rows, stamp, out_dir, stem, model_names, SYSTEM_NAMES)
    log(f"\nwrote {out_dir / stem}.{{json,md,png}} in {time.time() - t0:.0f} s")
    if not gpu:
        log("(CPU / Triton interpreter: the numbers above are NOT performance.)")


if __name__ == "__main__":
    main()
