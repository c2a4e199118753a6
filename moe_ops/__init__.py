"""TritonMoE: a fused Mixture-of-Experts forward in Triton, as torch.library ops.

Importing the package registers ``torch.ops.tritonmoe.route``, ``fused_experts`` and
``fused_moe``. See README.md for the op signatures and ../DESIGN.md for the data flow.
"""
from . import configs, ops, reference
from .configs import CONFIGS, MoEConfig, get_config, shrink
from .hf_patch import patch_hf_model
from .module import FusedMoE
from .ops import fused_experts, fused_moe, route
from .validation import set_topk_ids_check

__all__ = [
    "CONFIGS", "FusedMoE", "MoEConfig", "configs", "fused_experts", "fused_moe", "get_config", "ops",
    "patch_hf_model", "reference", "route", "set_topk_ids_check", "shrink",
]
