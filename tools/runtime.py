"""What the command-line tools (benchmark, tuner, probe) share; import it before Triton.

Without a usable CUDA device the Triton interpreter is switched on, which must happen
before the first import of triton. Also: CUDA-graph capture, the relative error and
random expert weights.
"""
import math
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"


def capture_graph(fn):
    """Warm ``fn`` up on a side stream, capture one call; returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN when either holds a NaN or an inf."""
    out, ref = out.double(), ref.double()
    if not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
        return math.nan
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def random_expert_weights(cfg, dtype: torch.dtype, device, gen: torch.Generator | None = None):
    """(w_gate_up [E, 2I, H], w_down [E, H, I]) of N(0, 1/fan_in) entries for a MoE config."""
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    w_gate_up = torch.randn(e, 2 * i, h, dtype=dtype, device=device, generator=gen).mul_(h**-0.5)
    w_down = torch.randn(e, h, i, dtype=dtype, device=device, generator=gen).mul_(i**-0.5)
    return w_gate_up, w_down
