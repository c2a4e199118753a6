"""Comparison helpers shared by the tests."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_ops.interpreter import interpreter_active
from moe_ops.reference import rel_l2


def assert_close_l2(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Fail on a shape mismatch, any NaN/inf, or relative L2 error above tol."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_l2(out, ref)
    assert err <= tol, f"relative L2 error {err:.3e} > {tol:.1e}"


def assert_rows_unchanged(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Rows that another token's routing must not change: bit for bit when compiled. Under
    the interpreter a row may move to another place in its expert block, and numpy's
    matmul (OpenBLAS) rounds a row differently by its place, so there: within 1e-5."""
    if interpreter_active():
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(out, expected)


# NaN and Inf inputs make the interpreter's numpy warn; the tests check the values.
ALLOW_NON_FINITE = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def drop_routing_near_ties(x, router_weight, top_k, margin=0.05):
    """The tokens of x [..., H] (as [N, H]) whose k-th and (k+1)-th router logits differ
    by more than ``margin``.

    Softmax routers round logits to the hidden dtype; in bf16 ties at the top-k boundary
    are common, and a GPU's torch.topk may break them differently from our kernel, so
    bf16 parity is checked on tokens whose routing is unambiguous.
    """
    flat = x.reshape(-1, x.shape[-1])
    logits = F.linear(flat, router_weight).float().sort(dim=-1, descending=True).values
    return flat[logits[:, top_k - 1] - logits[:, top_k] > margin]


def skip_bf16_on_cpu(dtype, device):
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("the Triton interpreter computes bf16 wrongly; bf16 runs on GPU")


def capture(fn):
    """Warm fn up on a side stream, capture one call: (graph, its static output). Unlike
    ``tools.timing.capture_graph`` it never synchronises, so a test can run it under
    ``torch.cuda.set_sync_debug_mode("error")``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()
    return graph, static_out


def compile_for_sm90(code: str, cache_dir) -> None:
    """Run ``code`` (Python that calls ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``)
    in a fresh interpreter without TRITON_INTERPRET, so a CPU-only CI catches kernels the
    interpreter accepts and the H100/H200 compiler would not; fails with its stderr."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])),
               TRITON_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
