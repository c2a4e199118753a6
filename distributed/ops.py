"""``tritonmoe::expert_parallel_moe``: one ``ExpertParallelMoE`` forward as a
``torch.library`` op, so that ``torch.compile(fullgraph=True)`` captures the layer as one
node (communication included) with static or dynamic shapes.

The op takes the layer's id (an int baked into the graph) instead of its weights and
process group, which a schema cannot carry; the fake implementation checks the same
metadata as the real one and describes the output.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moe_ops.ops import register_forward_only

from .layer import layer_by_id


@torch.library.custom_op("tritonmoe::expert_parallel_moe", mutates_args=())
def expert_parallel_moe(hidden_states: Tensor, layer_id: int) -> Tensor:
    """The layer's output [T, H] for this rank's hidden_states [T, H]."""
    return layer_by_id(layer_id).forward_impl(hidden_states)


@expert_parallel_moe.register_fake
def _expert_parallel_moe_fake(hidden_states, layer_id):
    layer_by_id(layer_id).check_input(hidden_states)
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)


register_forward_only(expert_parallel_moe)
