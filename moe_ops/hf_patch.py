"""Hugging Face transformers (5.x) drop-in: ``patch_hf_model`` swaps a model's supported MoE
blocks (``moe_ops.hf_blocks`` lists them) for ``FusedMoE`` layers sharing their weights.

Float and fp8 (``FineGrainedFP8Config``) models both convert. The other way in, which keeps
transformers' blocks and routers and swaps only the experts' computation, is
``experts_implementation="tritonmoe"`` (``moe_ops.hf_experts``).
"""
from __future__ import annotations

import torch
from torch import nn

from .hf_blocks import MOE_NAME, SUPPORTED, kind_of
from .module import FusedMoE


class PatchedMoEBlock(nn.Module):
    """Stands in for a transformers MoE block: same input, same return convention.

    ``moe`` is the converted ``FusedMoE``. Mixtral's router jitter only acts in training
    mode, which the fused op cannot reproduce, so a block converted with
    ``jitter_noise > 0`` refuses to run in training mode.
    """

    def __init__(self, moe: FusedMoE, block_name: str, jitter_noise: float = 0.0):
        super().__init__()
        self.moe = moe
        self.block_name = block_name
        self.jitter_noise = float(jitter_noise)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            raise RuntimeError(
                f"{self.block_name}: router_jitter_noise={self.jitter_noise} in training mode "
                "is not supported by the fused op; call model.eval() or set the jitter to 0")
        return self.moe(hidden_states)

    def extra_repr(self) -> str:
        return f"replaces {self.block_name}"


def patch_hf_model(model: nn.Module) -> int:
    """Replace every supported MoE block of a transformers model in place; return the count.

    Blocks patched before are kept, so patching a patched model again changes nothing
    and returns 0. All blocks are converted (and so validated) before any is replaced, so
    a refusal leaves the model unchanged. The new modules share the old blocks' expert and router
    storage (no second copy of the experts; an fp8 shared expert is dequantised). fp8
    experts run in the dtype of the input embeddings. Raises ``TypeError`` for an MoE block of a
    type this package does not know, ``ValueError`` for an option the ops cannot
    reproduce (the message names the block and the option).
    """
    if kind_of(model) is not None:
        raise TypeError(f"{type(model).__name__} is itself an MoE block: pass the model that "
                        "contains it, or convert it with FusedMoE.from_hf(block)")
    config = getattr(model, "config", None)
    if getattr(config, "output_router_logits", False):
        raise ValueError(
            f"{type(model).__name__}: config.output_router_logits=True is not supported: patched "
            "MoE blocks do not record router logits (no auxiliary loss); set it to False")

    hidden_dtype = _activation_dtype(model)
    replacements = []
    for parent, attr, path, block in _find_blocks(model, ""):
        moe = FusedMoE.from_hf(block, copy=False, where=path, hidden_dtype=hidden_dtype)
        wrapper = PatchedMoEBlock(moe, f"{path} ({type(block).__name__})",
                                  jitter_noise=getattr(block, "jitter_noise", 0.0) or 0.0)
        wrapper.train(block.training)
        replacements.append((parent, attr, wrapper))
    for parent, attr, wrapper in replacements:
        setattr(parent, attr, wrapper)
    return len(replacements)


def _activation_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's input embeddings when 16-bit (that of fp8 experts' inputs), else
    None (the blocks tell it themselves)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    dtype = getattr(getattr(embeddings, "weight", None), "dtype", None)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _find_blocks(module: nn.Module, prefix: str):
    """Yield (parent, attribute, path, block) for each supported block; refuse unknown ones.
    Blocks already patched (or already a ``FusedMoE``) are left as they are."""
    for attr, child in module.named_children():
        path = f"{prefix}.{attr}" if prefix else attr
        if isinstance(child, (PatchedMoEBlock, FusedMoE)):
            continue
        if kind_of(child) is not None:
            yield module, attr, path, child
        elif MOE_NAME.search(type(child).__name__) or isinstance(
                getattr(child, "experts", None), nn.Module):
            raise TypeError(
                f"{path} ({type(child).__module__}.{type(child).__name__}): unsupported MoE "
                f"block type; supported: {sorted(SUPPORTED)}")
        else:
            yield from _find_blocks(child, path)
