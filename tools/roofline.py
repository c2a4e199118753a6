"""Roofline of one MoE layer: the bytes it must move, the flops it must do, the device's
measured ceilings, and the floor they set.

For T tokens, top-k K, E experts, hidden H, intermediate I and b bytes per element::

    distinct experts  D = E * (1 - (1 - K/E)^T)        (expected, uniform routing)
                        = |unique(topk_ids)|           (exact, given the routing)
    bytes             = D * 3*H*I*b  +  T*H*b (x read)  +  T*H*b (out written)
    flops             = 2 * T*K * 3*H*I
    floor             = max(bytes / copy bandwidth, flops / matmul rate)

Both ceilings are measured on the device in the same process (``measure_ceilings``):
a large device-to-device copy (bytes read + written) and an 8192^3 matmul, each the
median of CUDA-event timings. The per-stage traffic model (``stage_traffic``) follows
the pipeline of DESIGN.md and contrasts the fused gate+up (SiLU*mul in registers)
with the unfused one (separate gate and up GEMMs writing [T*K, I] each, read back by an
elementwise SiLU*mul); ``measure_gate_up_fusion`` times the unfused and concatenated
PyTorch forms and our fused kernel on a GPU.

CLI::

    python -m tools.roofline --model deepseek-v3 --tokens 128
    python -m tools.roofline --model mixtral-8x7b qwen3-30b-a3b --tokens 1 32 512 --measure-fusion
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from moe_ops.configs import MoEConfig, get_config  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------- the model

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
class Ceilings:
    """A device's measured copy bandwidth (bytes/s) and matmul rate (flop/s)."""

    device: str
    bandwidth: float
    matmul_rate: float
    dtype: str
    note: str = ""


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


# ------------------------------------------------------------------ measured ceilings

_CEILINGS: dict[tuple[str, torch.dtype], Ceilings] = {}


def _median_event_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median of per-call CUDA-event timings (ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def median_wall_ms(fn, iters: int, warmup: int = 1) -> float:
    """Median wall-clock ms of ``iters`` calls after ``warmup`` (for CPU runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.bfloat16) -> Ceilings:
    """Copy bandwidth (1 GiB device-to-device copy, read + written) and matmul rate
    (8192^3 in ``dtype``), medians of CUDA-event timings; cached per process.

    On a CPU both are measured small (32 MiB, 512^3 in float32) so code paths run;
    they say nothing about a GPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key in _CEILINGS:
        return _CEILINGS[key]
    if device.type == "cuda":
        with torch.cuda.device(device):
            copy_bytes = 1 << 30
            src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy_ms = _median_event_ms(lambda: dst.copy_(src), iters=20)
            del src, dst
            n = 8192
            a = torch.randn(n, n, dtype=dtype, device=device)
            b = torch.randn(n, n, dtype=dtype, device=device)
            mm_ms = _median_event_ms(lambda: torch.mm(a, b), iters=10)
            del a, b
            torch.cuda.empty_cache()
        name = torch.cuda.get_device_name(device)
        note = f"copy {copy_bytes >> 20} MiB, matmul {n}^3 {str(dtype).replace('torch.', '')}"
        mm_dtype = dtype
    else:
        copy_bytes, n, mm_dtype = 32 << 20, 512, torch.float32
        src = torch.empty(copy_bytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_ms = median_wall_ms(lambda: dst.copy_(src), iters=5)
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm_ms = median_wall_ms(lambda: torch.mm(a, b), iters=5)
        name = "cpu"
        note = "CPU, tiny sizes: not a GPU ceiling"
    ceilings = Ceilings(name, 2 * copy_bytes / (copy_ms * 1e-3), 2 * n**3 / (mm_ms * 1e-3),
                        str(mm_dtype).replace("torch.", ""), note)
    _CEILINGS[key] = ceilings
    return ceilings


# ------------------------------------------------------- profiled kernels of a forward

def flush_l2(device: torch.device | str = "cuda") -> None:
    """Overwrite a 256 MiB buffer so no operand stays in L2 (the flush of do_bench)."""
    buf = getattr(flush_l2, "_buf", None)
    if buf is None or buf.device != torch.device(device):
        buf = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        flush_l2._buf = buf
    buf.zero_()


def profile_kernels(fn, runs: int = 1, flush: bool = True) -> list[tuple[str, float]]:
    """GPU activities (kernels, memsets, memcpys) of one call of ``fn``, in issue order,
    as (name, median duration in us over ``runs`` profiled calls). Empty without CUDA.

    Call ``fn`` once before (compilation, caches): this only observes.
    """
    if not torch.cuda.is_available():
        return []
    from torch.profiler import ProfilerActivity, profile
    from torch.autograd import DeviceType

    per_run = []
    for _ in range(runs):
        if flush:
            flush_l2()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        events.sort(key=lambda e: e.time_range.start)
        per_run.append([(e.name, e.time_range.elapsed_us()) for e in events])
    names = [name for name, _ in per_run[0]]
    if any([n for n, _ in run] != names for run in per_run):
        return per_run[0]  # a data-dependent number of launches: report the first call
    return [(name, statistics.median(run[j][1] for run in per_run))
            for j, name in enumerate(names)]


# ------------------------------------------------- measured: fused vs unfused gate+up

def measure_gate_up_fusion(config: str | MoEConfig, num_tokens: int,
                           dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                           seed: int = 0) -> dict:
    """Time gate+up three ways on a GPU, uniform routing, L2 flushed between calls:

    - ``unfused``: gate GEMM, up GEMM (``torch._grouped_mm``), SiLU*mul in eager PyTorch;
    - ``concat``: one grouped GEMM over [gate; up] -> [R, 2I], then SiLU*mul;
    - ``fused``: our gate_up kernel (the first grouped-GEMM kernel of ``fused_experts``,
      its duration from the profiler, median of 5 L2-flushed calls).

    Returns milliseconds, kernel breakdowns and model bytes per variant.
    """
    import triton.testing

    from benchmarks.grouped_baseline import sort_by_expert

    cfg = get_config(config)
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(num_tokens, h, dtype=dtype, device=device, generator=gen)
    topk_ids = torch.rand(num_tokens, e, device=device, generator=gen).topk(k, dim=1).indices
    topk_ids = topk_ids.to(torch.int32)
    topk_weights = torch.rand(num_tokens, k, device=device, generator=gen)
    w_gate_up = torch.randn(e, 2 * i, h, dtype=dtype, device=device, generator=gen).mul_(h**-0.5)
    w_down_shape = (e, h, i)
    distinct = distinct_experts(topk_ids)

    order, token_of_slot, offs = sort_by_expert(topk_ids, e)
    xs = x[token_of_slot]
    w_gate = w_gate_up[:, :i].transpose(1, 2)
    w_up = w_gate_up[:, i:].transpose(1, 2)
    w_both = w_gate_up.transpose(1, 2)
    silu = torch.nn.functional.silu

    def unfused():
        gate = torch._grouped_mm(xs, w_gate, offs=offs)
        up = torch._grouped_mm(xs, w_up, offs=offs)
        return silu(gate) * up

    def concat():
        gu = torch._grouped_mm(xs, w_both, offs=offs)
        return silu(gu[:, :i]) * gu[:, i:]

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    result = {"model": cfg.name, "T": num_tokens, "distinct_experts": distinct,
              "gpu": torch.cuda.get_device_name()}
    model = fusion_savings(cfg, num_tokens, distinct, x.element_size())
    result["model_bytes"] = model
    for name, fn in (("unfused", unfused), ("concat", concat)):
        try:
            fn()
            result[f"{name}_ms"] = bench(fn)
            result[f"{name}_kernels"] = profile_kernels(fn, runs=3)
        except Exception as exc:  # torch._grouped_mm missing or refusing this layout
            result[f"{name}_ms"], result[f"{name}_kernels"] = None, []
            result[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        from moe_ops.pipeline import fused_experts_impl

        w_down = torch.randn(*w_down_shape, dtype=dtype, device=device, generator=gen).mul_(i**-0.5)
        fused = functools.partial(fused_experts_impl, x, topk_weights, topk_ids, w_gate_up, w_down)
        fused()
        kernels = profile_kernels(fused, runs=5)
        result["fused_kernels"] = kernels
        gemms = [us for name, us in kernels if "grouped_gemm" in name]  # issue order: gate_up first
        result["fused_ms"] = gemms[0] * 1e-3 if gemms else None
        del fused, w_down
    except Exception as exc:  # the kernels are optional for the byte model
        result["fused_ms"] = None
        result["fused_error"] = f"{type(exc).__name__}: {exc}"
    del w_gate_up
    torch.cuda.empty_cache()
    return result


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["deepseek-v3"], help="config names")
    parser.add_argument("--tokens", nargs="+", type=int, default=[128])
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--bandwidth-tbs", type=float, default=None,
                        help="assume this copy bandwidth (TB/s) instead of measuring")
    parser.add_argument("--tflops", type=float, default=None,
                        help="assume this matmul rate (TFLOP/s) instead of measuring")
    parser.add_argument("--measure-fusion", action="store_true",
                        help="on a GPU, time unfused / concatenated / fused gate+up")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
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
        cfg = get_config(name)
        for t in args.tokens:
            _report(cfg, t, ceilings, bytes_per_elem)
            if args.measure_fusion:
                if not torch.cuda.is_available():
                    print("  (--measure-fusion needs a GPU: skipped)")
                    continue
                m = measure_gate_up_fusion(cfg, t, dtype)
                parts = []
                for name in ("unfused", "concat", "fused"):
                    if m.get(f"{name}_ms"):
                        kernels = m.get(f"{name}_kernels", [])
                        parts.append(f"{name} {m[f'{name}_ms']:.4f} ms ({len(kernels)} kernels: "
                                     + ", ".join(f"{n[:40]} {us:.1f} us" for n, us in kernels) + ")")
                    else:
                        parts.append(f"{name}: {m.get(f'{name}_error', 'n/a')}")
                print("  measured gate+up (median, L2 flushed; fused = its kernel's duration):")
                for part in parts:
                    print(f"    {part}")


if __name__ == "__main__":
    main()
