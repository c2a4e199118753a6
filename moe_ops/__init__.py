"""TritonMoE: a fused Mixture-of-Experts forward in Triton, as torch.library ops.

Importing the package checks the torch and Triton versions (``moe_ops.versions``) and
registers ``torch.ops.tritonmoe.route``, ``fused_experts`` and ``fused_moe``. The
project's README.md gives the op signatures, supported versions and, under "How it
works", the data flow; each file of ``moe_ops/kernels/`` opens with the computation,
layouts and grid of its kernels.
"""
from .versions import check_installed

check_installed()  # before anything imports what an older Triton lacks

from . import configs, ops, reference  # noqa: E402
from .configs import CONFIGS, MoEConfig, get_config, shrink  # noqa: E402
from .eager_graphs import set_eager_graphs  # noqa: E402
from .hf_patch import patch_hf_model  # noqa: E402
from .module import FusedMoE  # noqa: E402
from .ops import fused_experts, fused_moe, route  # noqa: E402
from .validation import set_topk_ids_check  # noqa: E402

__all__ = [
    "CONFIGS", "FusedMoE", "MoEConfig", "configs", "fused_experts", "fused_moe", "get_config", "ops",
    "patch_hf_model", "reference", "route", "set_eager_graphs", "set_topk_ids_check", "shrink",
]
