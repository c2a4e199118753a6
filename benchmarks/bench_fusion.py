"""What fusing gate and up into one GEMM saves, measured on a GPU beside the byte model.

Gate+up three ways, uniform routing, L2 flushed between calls:

    unfused   gate GEMM, up GEMM (``torch._grouped_mm``), SiLU*mul in eager PyTorch
    concat    one grouped GEMM over [gate; up] -> [R, 2I], then SiLU*mul
    fused     our gate_up kernel: the first grouped-GEMM kernel of ``fused_experts``, its
              duration from the profiler (median of 5 L2-flushed calls)

unfused and concat are ``triton.testing.do_bench`` medians, with their kernels listed from
the profiler; the byte model's saving (``tools.roofline.fusion_savings``) is printed with
each cell. Run from the checkout root on a GPU::

    python -m benchmarks.bench_fusion --models mixtral-8x7b qwen3-30b-a3b --tokens 1 32 512 8192
"""
from __future__ import annotations

from tools.cli import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before anything imports triton

import argparse  # noqa: E402
import functools  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.grouped_baseline import sort_by_expert  # noqa: E402
from moe_ops.configs import MoEConfig, get_config  # noqa: E402
from moe_ops.dtypes import BY_NAME  # noqa: E402
from moe_ops.pipeline import fused_experts_impl  # noqa: E402
from tools.cli import on_gpu  # noqa: E402
from tools.profiler import profile_kernels  # noqa: E402
from tools.roofline import distinct_experts, fusion_savings  # noqa: E402
from tools.timing import Timer  # noqa: E402
from tools.workloads import random_expert_weights, random_routing  # noqa: E402

VARIANTS = ("unfused", "concat", "fused")


def measure_gate_up_fusion(config: str | MoEConfig, num_tokens: int,
                           dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                           seed: int = 0) -> dict:
    """Time gate+up three ways (see the module docstring) at one (model, T) on a GPU.

    Returns milliseconds, kernel breakdowns and model bytes per variant; a variant that
    can not run here has ms None and an ``<variant>_error``.
    """
    cfg = get_config(config)
    e, k, i = cfg.num_experts, cfg.top_k, cfg.intermediate_size
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, cfg.hidden_size, dtype=dtype, device=device, generator=gen)
    topk_weights, topk_ids = random_routing(num_tokens, e, k, 0.0, device, gen)
    w_gate_up, w_down = random_expert_weights(cfg, dtype, device, gen)
    distinct = distinct_experts(topk_ids)

    _, token_of_slot, offs = sort_by_expert(topk_ids, e)
    xs = x[token_of_slot]
    w_gate, w_up = w_gate_up[:, :i].transpose(1, 2), w_gate_up[:, i:].transpose(1, 2)
    w_both = w_gate_up.transpose(1, 2)

    def unfused():
        gate = torch._grouped_mm(xs, w_gate, offs=offs)
        up = torch._grouped_mm(xs, w_up, offs=offs)
        return F.silu(gate) * up

    def concat():
        gu = torch._grouped_mm(xs, w_both, offs=offs)
        return F.silu(gu[:, :i]) * gu[:, i:]

    timer = Timer(warmup_ms=25, rep_ms=100)
    result = {"model": cfg.name, "T": num_tokens, "distinct_experts": distinct,
              "gpu": torch.cuda.get_device_name(),
              "model_bytes": fusion_savings(cfg, num_tokens, distinct, x.element_size())}
    for name, fn in (("unfused", unfused), ("concat", concat)):
        try:
            fn()
            result[f"{name}_ms"] = timer(fn)
            result[f"{name}_kernels"] = profile_kernels(fn, runs=3)
        except Exception as exc:  # torch._grouped_mm missing or refusing this layout
            result[f"{name}_ms"], result[f"{name}_kernels"] = None, []
            result[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    fused = functools.partial(fused_experts_impl, x, topk_weights, topk_ids, w_gate_up, w_down)
    fused()
    kernels = profile_kernels(fused, runs=5)
    gemms = [us for name, us in kernels if "grouped_gemm" in name]  # issue order: gate_up first
    result.update(fused_kernels=kernels, fused_ms=gemms[0] * 1e-3 if gemms else None)
    if not gemms:
        result["fused_error"] = "the profiler saw no grouped_gemm kernel"
    del w_gate_up, w_down
    torch.cuda.empty_cache()
    return result


def print_cell(m: dict) -> None:
    """The byte model's saving and the measured times of one cell."""
    sav = m["model_bytes"]
    print(f"\n== {m['model']}  T={m['T']}: {m['distinct_experts']} experts hit; the byte model "
          f"saves {sav['bytes_saved'] / 1e6:.2f} MB ({sav['saved_pct_of_gate_up']:.1f}% of "
          f"gate+up traffic) and {sav['launches_saved']} launches")
    print("  measured gate+up (median, L2 flushed; fused = its kernel's duration):")
    for name in VARIANTS:
        if m.get(f"{name}_ms"):
            kernels = m.get(f"{name}_kernels", [])
            print(f"    {name} {m[f'{name}_ms']:.4f} ms ({len(kernels)} kernels: "
                  + ", ".join(f"{n[:40]} {us:.1f} us" for n, us in kernels) + ")")
        else:
            print(f"    {name}: {m.get(f'{name}_error', 'n/a')}")


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    """Measure every (model, T) and print it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mixtral-8x7b", "qwen3-30b-a3b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 32, 512, 8192])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(BY_NAME))
    args = parser.parse_args(argv)
    if not on_gpu():
        raise SystemExit("benchmarks.bench_fusion times GPU kernels: it needs CUDA (or ROCm)")
    for name in args.models:
        for t in args.tokens:
            print_cell(measure_gate_up_fusion(name, t, BY_NAME[args.dtype]))


if __name__ == "__main__":
    main()
