"""One suite for CPU (Triton interpreter, small shapes) and GPU (compiled, real shapes).

Without CUDA, TRITON_INTERPRET=1 is set before anything imports Triton. Run from the
checkout root (``python -m pytest``), which puts the checkout's moe_ops, tools and
benchmarks first on the path, here and in the ranks the distributed tests spawn.
"""
import os

import pytest

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moe_ops.interpreter import interpreter_active  # noqa: E402  (after TRITON_INTERPRET is set)

ON_GPU = torch.cuda.is_available() and not interpreter_active()


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
