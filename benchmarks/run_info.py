"""What every benchmark result says about the run that made it, and where it goes.

GPU runs write to ``benchmarks/results/`` (tracked); interpreter runs on a CPU are not
performance and go to ``benchmarks/results-cpu-interpreter/`` (ignored by git), so they
never land beside the GPU tables.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent


def default_out_dir(gpu: bool) -> Path:
    """benchmarks/results on a GPU, benchmarks/results-cpu-interpreter otherwise."""
    return BENCHMARKS_DIR / ("results" if gpu else "results-cpu-interpreter")


def device_label(gpu: bool, device: torch.device | None = None) -> str:
    """The GPU's name, or "cpu-interpreter"."""
    return torch.cuda.get_device_name(device) if gpu else "cpu-interpreter"


def utc_now() -> str:
    """The date and minute, UTC, as the result files write it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line(launcher: str, module: str, argv: list[str] | None) -> str:
    """The command that reruns this: ``launcher -m module`` and the arguments given
    (``argv`` when called as a function, else the process's)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([launcher, "-m", module, *args])
