"""The torch, Triton and (for the CPU interpreter) numpy versions this package needs.

Checked when ``moe_ops`` is imported, so an unsupported install fails at once with the
version to install, not later inside a kernel. The floors are the versions the suite
has run on: torch 2.11 + Triton 3.6 (Python 3.12, NVIDIA H100/H200) and torch 2.13 CPU +
Triton 3.6 through its interpreter (Python 3.11). Older Triton lacks what the kernels use
(3.2 and 3.3 have no ``triton.tools.tensor_descriptor``), and torch 2.6 to 2.10 ship an
older Triton. Triton 3.6's interpreter fails with numpy 2.4 (triton-lang/triton#9171):
the ``cpu`` extra of pyproject.toml pins ``numpy<2.4``.
"""
from __future__ import annotations

import re

MIN_TORCH = (2, 11)
MIN_TRITON = (3, 6)
INTERPRETER_NUMPY_BELOW = (2, 4)  # with Triton 3.6


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ImportError(f"cannot read the version {version!r}")
    return int(match.group(1)), int(match.group(2))


def _dotted(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def check_versions(torch_version: str, triton_version: str, numpy_version: str | None = None,
                   interpreter: bool = False) -> None:
    """Raise ImportError naming the version needed when one is unsupported.

    ``numpy_version`` is checked only for Triton 3.6's interpreter (``interpreter``)."""
    if _major_minor(torch_version) < MIN_TORCH:
        raise ImportError(f"moe_ops needs torch>={_dotted(MIN_TORCH)}, found torch {torch_version}")
    if _major_minor(triton_version) < MIN_TRITON:
        raise ImportError(
            f"moe_ops needs triton>={_dotted(MIN_TRITON)}, found triton {triton_version} "
            "(torch 2.11 and later ship it)")
    if (interpreter and numpy_version is not None and _major_minor(triton_version) == (3, 6)
            and _major_minor(numpy_version) >= INTERPRETER_NUMPY_BELOW):
        raise ImportError(
            f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) needs "
            f"numpy<{_dotted(INTERPRETER_NUMPY_BELOW)}, found numpy {numpy_version}: "
            "pip install 'numpy<2.4' (the package's `cpu` extra)")


def check_installed() -> None:
    """``check_versions`` on what is installed; the interpreter as TRITON_INTERPRET says."""
    import numpy
    import torch
    import triton

    from .interpreter import interpreter_active

    check_versions(torch.__version__, triton.__version__, numpy.__version__, interpreter_active())
