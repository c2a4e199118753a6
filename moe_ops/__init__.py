"""TritonMoE: a fused Mixture-of-Experts forward in Triton, as torch.library ops.

Importing the package checks the torch and Triton versions (``moe_ops.versions``) and
registers ``torch.ops.tritonmoe.route``, ``fused_experts`` and ``fused_moe``. The
project's README.md gives the op signatures, supported versions and, under "How it
works", the data flow; each file of ``moe_ops/kernels/`` opens with the computation,
layouts and grid of its kernels.

Where transformers is installed, importing the package also arranges that transformers'
experts interfaces accept ``experts_implementation="tritonmoe"`` once transformers imports
them, without importing transformers itself (``moe_ops.hf_experts``);
``register_hf_experts()`` registers explicitly.
"""
from .versions import check_installed

check_installed()  # before anything imports what an older Triton lacks

from . import configs, ops, reference  # noqa: E402
from .configs import CONFIGS, MoEConfig, get_config, shrink  # noqa: E402
from .eager_graphs import set_eager_graphs  # noqa: E402
from .fp8 import set_fp8_fast_accumulation  # noqa: E402
from .hf_experts import install_import_hook, register_hf_experts  # noqa: E402
from .hf_patch import patch_hf_model  # noqa: E402
from .module import FusedMoE  # noqa: E402
from .ops import fused_experts, fused_moe, route  # noqa: E402
from .validation import set_topk_ids_check  # noqa: E402

install_import_hook()

__all__ = [
    "CONFIGS", "FusedMoE", "MoEConfig", "configs", "fused_experts", "fused_moe", "get_config", "ops",
    "patch_hf_model", "reference", "register_hf_experts", "route", "set_eager_graphs",
    "set_fp8_fast_accumulation", "set_topk_ids_check", "shrink",
]
