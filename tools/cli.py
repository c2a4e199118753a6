"""What every command-line entry point of tools/ and benchmarks/ shares.

Triton chooses between compiled kernels and its CPU interpreter when it is first imported,
so a script decides before that, by calling ``use_interpreter_without_gpu()`` at the top of
its ``__main__`` path; importing a script as a module (tests) changes nothing. Once Triton
may be imported, ``on_gpu()`` answers which of the two runs.
"""
from __future__ import annotations

import os
import re
import sys


def use_interpreter_without_gpu() -> None:
    """Switch Triton's interpreter on when no CUDA (or ROCm) device is usable.

    Call before anything imports triton (or moe_ops, which imports it); raises where it
    would have to switch the interpreter on and triton is already imported.
    """
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    if "triton" in sys.modules:
        raise RuntimeError("no GPU and triton already imported without TRITON_INTERPRET=1: "
                           "call use_interpreter_without_gpu() before importing triton")
    os.environ["TRITON_INTERPRET"] = "1"


def on_gpu() -> bool:
    """True when kernels run compiled on a GPU, False under the interpreter (CPU)."""
    import torch

    from moe_ops.interpreter import interpreter_active

    return torch.cuda.is_available() and not interpreter_active()


def slug(text: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: a device or routing name as a file-name part."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def log(msg: str) -> None:
    """Print at once (the runs are long and their output is often piped to a log)."""
    print(msg, flush=True)


def leave_process_group() -> None:
    """End a torchrun script's default process group, every rank together: free what still
    holds the group or its finished works (layers in reference cycles), wait for the peers
    (one still writing its results), then destroy the group. A rank that tore gloo down
    while its peer was still busy aborted once in CI ("terminate called without an active
    exception") after all its work had succeeded."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
