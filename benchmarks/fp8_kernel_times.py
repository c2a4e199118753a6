"""Where an fp8 cell's time goes: each launch of one ``fused_experts`` call, bf16 experts
against the same experts in per-channel fp8, with the bytes each grouped GEMM must read.

Per (model, T) it prints every GPU activity of one call (torch.profiler, L2 flushed,
median of 5 calls) and, for each grouped GEMM, the weight bytes of the experts hit over
its time: the GEMM's own streaming rate, beside the copy bandwidth ``bench_fp8``
measures. Run from the checkout root on a GPU::

    python -m benchmarks.fp8_kernel_times --models deepseek-v3 mixtral-8x7b --tokens 1 128
"""
from __future__ import annotations

import argparse

import torch

import moe_ops
from benchmarks.inputs import random_layer, routed_cell
from moe_ops.fp8 import quantize_weight
from tools.profiler import profile_kernels
from tools.roofline import distinct_experts
from tools.workloads import layer_config


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["deepseek-v3", "mixtral-8x7b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 128])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.fp8_kernel_times profiles GPU kernels: it needs CUDA")
    moe_ops.set_topk_ids_check(False)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.models:
        cfg = layer_config(name, True)
        layer = random_layer(cfg, torch.bfloat16, "cuda", 0.0, gen)
        fp8 = [*zip(*(quantize_weight(w, "channel") for w in (layer.w_gate_up, layer.w_down)))]
        systems = {"bf16": (layer.w_gate_up, layer.w_down, None, None),
                   "fp8-channel": (*fp8[0], *fp8[1])}
        for t in args.tokens:
            cell = routed_cell(layer, t, gen)
            hit = distinct_experts(cell.topk_ids)
            for system, (w_gu, w_d, s_gu, s_d) in systems.items():
                def forward():
                    return moe_ops.fused_experts(cell.x, cell.topk_weights, cell.topk_ids, w_gu,
                                                 w_d, s_gu, s_d)
                forward()
                torch.cuda.synchronize()
                gemm_bytes = iter([w_gu[0].numel() * w_gu.element_size() * hit,
                                   w_d[0].numel() * w_d.element_size() * hit])
                print(f"[{name} T={t} {system}] experts hit {hit}")
                for kernel, us in profile_kernels(forward, runs=5):
                    rate = ""
                    if "grouped_gemm" in kernel:
                        rate = f"  {next(gemm_bytes) / us / 1e6:.2f} TB/s of weights"
                    print(f"    {kernel[:40]:40s} {us:9.1f} us{rate}")


if __name__ == "__main__":
    main()
