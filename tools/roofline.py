"""Roofline of one MoE layer: the bytes it must move, the flops it must do, and the floor
they set on a device's ceilings (``tools.ceilings``).

For T tokens, top-k K, E experts, hidden H, intermediate I and b bytes per element::

    distinct experts  D = E * (1 - (1 - K/E)^T)        (expected, uniform routing)
                        = |unique(topk_ids)|           (exact, given the routing)
    bytes             = D * 3*H*I*b  +  T*H*b (x read)  +  T*H*b (out written)
    flops             = 2 * T*K * 3*H*I
    floor             = max(bytes / copy bandwidth, flops / matmul rate)

The per-stage traffic model (``stage_traffic``) follows the pipeline of DESIGN.md and
contrasts the fused gate+up (SiLU*mul in registers) with the unfused one (separate gate
and up GEMMs writing [T*K, I] each, read back by an elementwise SiLU*mul); the measured
counterpart is ``benchmarks/bench_fusion.py``. Run from the checkout root::

    python -m tools.roofline --model deepseek-v3 --tokens 128
    python -m tools.roofline --model mixtral-8x7b --tokens 1 512 --bandwidth-tbs 4.2 --tflops 700
"""
from __future__ import annotations

from tools.cli import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()  # before moe_ops imports triton

import argparse  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

from moe_ops.configs import MoEConfig, get_config  # noqa: E402
from moe_ops.dtypes import BY_NAME  # noqa: E402
from tools.ceilings import Ceilings, measure_ceilings  # noqa: E402


def expected_distinct_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Experts hit at least once when each token picks top_k of num_experts uniformly."""
    if num_tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def distinct_experts(topk_ids: torch.Tensor) -> int:
    """Experts hit at least once by this routing (reads the ids: not for hot paths)."""
    return int(torch.unique(topk_ids).numel())


@dataclass(frozen=True)
class Traffic:
    """What one forward must move and compute, at the least."""

    distinct_experts: float
    weight_bytes: float
    activation_bytes: float
    flops: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes


def layer_traffic(config: str | MoEConfig, num_tokens: int, distinct: float | None = None,
                  bytes_per_elem: int = 2, include_router: bool = False) -> Traffic:
    """Minimum HBM bytes and flops of the routed experts for ``num_tokens`` tokens.

    ``distinct`` defaults to the uniform-routing expectation. ``include_router`` adds
    the router's weight read (E*H*b) and its flops (2*T*H*E), for ``fused_moe``.
    """
    cfg = get_config(config)
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k
    if distinct is None:
        distinct = expected_distinct_experts(e, k, num_tokens)
    weight_bytes = distinct * 3 * h * i * bytes_per_elem
    activation_bytes = 2 * num_tokens * h * bytes_per_elem
    flops = 2 * num_tokens * k * 3 * h * i
    if include_router:
        weight_bytes += e * h * bytes_per_elem
        flops += 2 * num_tokens * h * e
    return Traffic(float(distinct), float(weight_bytes), float(activation_bytes), float(flops))


@dataclass(frozen=True)
class Floor:
    """The time no implementation can beat, and which ceiling sets it."""

    traffic: Traffic
    memory_s: float
    compute_s: float

    @property
    def floor_s(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "memory" if self.memory_s >= self.compute_s else "compute"


def floor(config: str | MoEConfig, num_tokens: int, ceilings: Ceilings,
          topk_ids: torch.Tensor | None = None, distinct: float | None = None,
          bytes_per_elem: int = 2, include_router: bool = False) -> Floor:
    """max(bytes / bandwidth, flops / rate); distinct experts from ``topk_ids`` when given."""
    if topk_ids is not None:
        distinct = distinct_experts(topk_ids)
    traffic = layer_traffic(config, num_tokens, distinct, bytes_per_elem, include_router)
    return Floor(traffic, traffic.bytes / ceilings.bandwidth, traffic.flops / ceilings.matmul_rate)


# ------------------------------------------------------------- per-stage traffic model

@dataclass(frozen=True)
class StageTraffic:
    """Bytes read and written from HBM, flops and launches of one pipeline stage."""

    stage: str
    bytes_read: float
    bytes_written: float
    flops: float
    launches: int = 1

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written


def stage_traffic(config: str | MoEConfig, num_tokens: int, distinct: float | None = None,
                  bytes_per_elem: int = 2, fused_gate_up: bool = True) -> list[StageTraffic]:
    """Per-stage traffic of the pipeline (route, align, gate+up, down, combine).

    Activation rows are counted once per routed slot (R = T*K rows): x is gathered per
    slot by gate+up, h [R, I] and y [R, H] make a round trip through HBM. Unfused
    gate+up runs a gate GEMM and an up GEMM (each reads the gathered x and writes
    [R, I]) and an elementwise SiLU*mul that reads both back and writes h.
    """
    cfg = get_config(config)
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k
    b, t = bytes_per_elem, num_tokens
    r = t * k
    if distinct is None:
        distinct = expected_distinct_experts(e, k, t)
    stages = [
        StageTraffic("route", t * h * b + e * h * b, r * 8, 2 * t * h * e),
        StageTraffic("align", r * 4, r * 4 + e * 4, 0),
    ]
    if fused_gate_up:
        stages.append(StageTraffic("gate_up", r * h * b + distinct * 2 * i * h * b,
                                   r * i * b, 2 * r * h * 2 * i))
    else:
        for name in ("gate", "up"):
            stages.append(StageTraffic(name, r * h * b + distinct * i * h * b,
                                       r * i * b, 2 * r * h * i))
        stages.append(StageTraffic("silu_mul", 2 * r * i * b, r * i * b, 0))
    stages += [
        StageTraffic("down", r * i * b + distinct * h * i * b + r * 4, r * h * b, 2 * r * i * h),
        StageTraffic("combine", r * h * b + r * 4, t * h * b, 0),
    ]
    return stages


def fusion_savings(config: str | MoEConfig, num_tokens: int, distinct: float | None = None,
                   bytes_per_elem: int = 2) -> dict:
    """What fusing SiLU*mul into one gate+up GEMM saves, by the byte model."""
    fused = stage_traffic(config, num_tokens, distinct, bytes_per_elem, True)
    unfused = stage_traffic(config, num_tokens, distinct, bytes_per_elem, False)
    gate_up_names = ("gate_up", "gate", "up", "silu_mul")
    fused_gu = sum(s.bytes for s in fused if s.stage in gate_up_names)
    unfused_gu = sum(s.bytes for s in unfused if s.stage in gate_up_names)
    layer_unfused = sum(s.bytes for s in unfused)
    return {
        "gate_up_bytes_fused": fused_gu,
        "gate_up_bytes_unfused": unfused_gu,
        "bytes_saved": unfused_gu - fused_gu,
        "saved_pct_of_gate_up": 100.0 * (unfused_gu - fused_gu) / unfused_gu,
        "saved_pct_of_layer": 100.0 * (unfused_gu - fused_gu) / layer_unfused,
        "launches_saved": sum(s.launches for s in unfused) - sum(s.launches for s in fused),
    }


# ------------------------------------------------------------------------------ CLI

def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _report(cfg: MoEConfig, num_tokens: int, ceilings: Ceilings | None, bytes_per_elem: int) -> None:
    t = num_tokens
    traffic = layer_traffic(cfg, t, None, bytes_per_elem)
    print(f"\n== {cfg.name}  T={t}  (E={cfg.num_experts} K={cfg.top_k} H={cfg.hidden_size} "
          f"I={cfg.intermediate_size}, {bytes_per_elem} B/elem)")
    print(f"  distinct experts (uniform, expected): {traffic.distinct_experts:.2f} of {cfg.num_experts}")
    print(f"  bytes: weights {_fmt_bytes(traffic.weight_bytes)} + activations "
          f"{_fmt_bytes(traffic.activation_bytes)} = {_fmt_bytes(traffic.bytes)}")
    print(f"  flops: {traffic.flops / 1e9:.3f} GFLOP   intensity {traffic.flops / traffic.bytes:.1f} flop/B")
    if ceilings is not None:
        fl = floor(cfg, t, ceilings, None, None, bytes_per_elem)
        print(f"  floor: memory {fl.memory_s * 1e3:.4f} ms, compute {fl.compute_s * 1e3:.4f} ms "
              f"-> {fl.floor_s * 1e3:.4f} ms ({fl.bound}-bound)")
    print("  per-stage traffic model (fused gate+up | unfused gate, up, silu_mul):")
    for label, fused in (("fused", True), ("unfused", False)):
        stages = stage_traffic(cfg, t, None, bytes_per_elem, fused)
        parts = ", ".join(f"{s.stage} {_fmt_bytes(s.bytes)}" for s in stages)
        total = sum(s.bytes for s in stages)
        launches = sum(s.launches for s in stages)
        print(f"    {label:8s} {_fmt_bytes(total):>10s} in {launches} launches: {parts}")
    sav = fusion_savings(cfg, t, None, bytes_per_elem)
    print(f"  fusion saves {_fmt_bytes(sav['bytes_saved'])} "
          f"({sav['saved_pct_of_gate_up']:.1f}% of gate+up traffic, "
          f"{sav['saved_pct_of_layer']:.1f}% of the layer's) and {sav['launches_saved']} launches")


def main(argv: list[str] | None = None) -> None:
    """Print the byte/flop model, and the floors where ceilings are measured or given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["deepseek-v3"], help="config names")
    parser.add_argument("--tokens", nargs="+", type=int, default=[128])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(BY_NAME))
    parser.add_argument("--bandwidth-tbs", type=float, default=None,
                        help="assume this copy bandwidth (TB/s) instead of measuring")
    parser.add_argument("--tflops", type=float, default=None,
                        help="assume this matmul rate (TFLOP/s) instead of measuring")
    args = parser.parse_args(argv)
    dtype = BY_NAME[args.dtype]
    bytes_per_elem = torch.empty((), dtype=dtype).element_size()

    ceilings = None
    if args.bandwidth_tbs and args.tflops:
        ceilings = Ceilings("assumed", args.bandwidth_tbs * 1e12, args.tflops * 1e12, args.dtype,
                            "given on the command line")
    elif torch.cuda.is_available():
        ceilings = measure_ceilings("cuda", dtype)
    if ceilings is None:
        print("no CUDA device: floors need ceilings; pass --bandwidth-tbs and --tflops to "
              "assume some. Bytes and flops below are exact.")
    else:
        print(f"ceilings ({ceilings.device}; {ceilings.note}): copy "
              f"{ceilings.bandwidth / 1e12:.3f} TB/s, matmul {ceilings.matmul_rate / 1e12:.1f} TFLOP/s")
    for name in args.model:
        for t in args.tokens:
            _report(get_config(name), t, ceilings, bytes_per_elem)


if __name__ == "__main__":
    main()
