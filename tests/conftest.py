"""One suite for CPU (Triton interpreter, small shapes) and GPU (compiled, real shapes).

Without CUDA, TRITON_INTERPRET=1 is set before anything imports Triton.
"""
import os
import sys

import pytest

if "torch" not in sys.modules:
    import torch  # noqa: E402  (CUDA availability decides the interpreter)
else:
    import torch
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random data every run; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"seed={seed}")
    yield
