"""One suite for CPU (Triton interpreter, small shapes) and GPU (compiled, real shapes).

Without CUDA, TRITON_INTERPRET=1 is set before anything imports Triton.
"""
import os
import sys
from pathlib import Path

import pytest

import torch

# tools/ and benchmarks/ import from the checkout; appended, not prepended, so that an
# installed moe_ops (the one with moe_ops.distributed) stays first, here and in the
# ranks the distributed tests spawn with this path.
REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)

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


@pytest.fixture
def poison_allocations():
    """Make torch.empty fill floats with NaN (ints with their max): unwritten rows fail."""
    import torch.utils.deterministic as deterministic

    previous = (torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0])
    deterministic.fill_uninitialized_memory = previous[1]
