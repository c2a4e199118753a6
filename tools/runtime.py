"""Device selection shared by the command-line tools; import it before Triton.

Without a usable CUDA device the Triton interpreter is switched on, which must happen
before the first import of triton.
"""
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
