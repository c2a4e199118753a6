"""transformers' experts interface: ``experts_implementation="tritonmoe"``.

transformers (5.x) runs every ``@use_experts_implementation`` experts module (the
``experts`` of Mixtral, Qwen2/3-MoE, DeepSeek-V3 and others) through a function looked up
by ``config._experts_implementation`` in ``ExpertsInterface``, or, for the ``FP8Experts``
of fp8 checkpoints, in ``FP8ExpertsInterface`` (``transformers.integrations.moe`` and
``.finegrained_fp8``). Each takes ``(experts, hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K])``. This module registers "tritonmoe" in both, so that

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="tritonmoe")
    model.set_experts_implementation("tritonmoe")          # or on a loaded model

runs the experts in ``moe_ops.fused_experts`` (fp8 ones with their 128x128 block scales)
while the blocks, routers and shared experts stay transformers'. ``patch_hf_model`` is the
other way in: it replaces whole blocks, routing included.

Registration: importing transformers' interfaces takes about 2 s (measured here), so
``import moe_ops`` does not import them. It calls ``install_import_hook``, which registers
at once in those already imported and, where transformers is installed, in the others as
soon as transformers imports them (a ``sys.meta_path`` finder that removes itself when
done). ``moe_ops.register_hf_experts()`` imports and registers explicitly.

What converts is what ``moe_ops.hf_blocks`` accepts: SwiGLU experts with [gate; up] rows,
no bias, all local, gated by transformers' default ``_apply_gate``; fp8 ones with float32 scales per 128x128 block and dynamic
activations. Anything else raises ``ValueError`` naming the experts module and option at
its first call (the check runs once per module).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

import torch
from torch import nn

from .hf_blocks import _check_experts, check_fp8_experts
from .ops import fused_experts

NAME = "tritonmoe"


def tritonmoe_experts_forward(experts: nn.Module, hidden_states: torch.Tensor,
                              top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' float experts forward through ``moe_ops.fused_experts``: [T, H] -> [T, H]."""
    _check_once(experts, fp8=False)
    return fused_experts(hidden_states, top_k_weights.float(), top_k_index, experts.gate_up_proj,
                         experts.down_proj)


def tritonmoe_fp8_experts_forward(experts: nn.Module, hidden_states: torch.Tensor,
                                  top_k_index: torch.Tensor,
                                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' ``FP8Experts`` forward through ``moe_ops.fused_experts`` with the
    weights' ``*_scale_inv``: [T, H] -> [T, H]."""
    _check_once(experts, fp8=True)
    return fused_experts(hidden_states, top_k_weights.float(), top_k_index, experts.gate_up_proj,
                         experts.down_proj, experts.gate_up_proj_scale_inv,
                         experts.down_proj_scale_inv)


def _check_once(experts: nn.Module, fp8: bool) -> None:
    # The module's options do not change between calls; the tensors are checked per call
    # by fused_experts itself.
    if experts.__dict__.get("_tritonmoe_checked"):
        return
    name = f"{type(experts).__name__} (experts_implementation={NAME!r})"
    (check_fp8_experts if fp8 else _check_experts)(name, experts)
    experts._tritonmoe_checked = True


# transformers module -> (its interface class, our function).
_INTERFACES = {
    "transformers.integrations.moe": ("ExpertsInterface", tritonmoe_experts_forward),
    "transformers.integrations.finegrained_fp8": ("FP8ExpertsInterface",
                                                  tritonmoe_fp8_experts_forward),
}


def _register(module) -> None:
    class_name, forward = _INTERFACES[module.__name__]
    getattr(module, class_name).register(NAME, forward)


def register_hf_experts() -> None:
    """Import transformers' experts interfaces and register "tritonmoe" in both (idempotent)."""
    for module_name in _INTERFACES:
        _register(importlib.import_module(module_name))


def install_import_hook() -> None:
    """Register "tritonmoe" in the interfaces transformers has imported, and in the others
    when it imports them; never imports transformers. Called by ``import moe_ops``."""
    pending = []
    for module_name in _INTERFACES:
        if module_name in sys.modules:
            _register(sys.modules[module_name])
        else:
            pending.append(module_name)
    if pending and importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterOnImport(pending))


class _RegisterOnImport:
    """A ``sys.meta_path`` finder for transformers' interface modules: it finds them with
    the finders after it and wraps their loader so that the module registers "tritonmoe"
    once it has run. It leaves ``sys.meta_path`` once every module is seen."""

    def __init__(self, pending: list[str]):
        self.pending = set(pending)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader:
    """Runs the wrapped loader, then registers; everything else is the wrapped loader's."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)
