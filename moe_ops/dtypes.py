"""The floating dtypes the ops take, by name and as Triton types (one table for the package,
its tools and its benchmarks)."""
from __future__ import annotations

import torch
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRITON = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the names of ``BY_NAME`` and the tile tables)."""
    return str(dtype).replace("torch.", "")
