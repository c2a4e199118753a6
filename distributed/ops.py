"""``tritonmoe::expert_parallel_moe``: one ``ExpertParallelMoE`` forward as a
``torch.library`` op, so that ``torch.compile(fullgraph=True)`` captures the layer as one
node (communication included) with static, dynamic or unbacked token counts.

The op takes the layer's id (an int baked into the graph) instead of its weights and
process group, which a schema cannot carry. It communicates, so it must never be dropped
when its output is unused, nor reordered against another call: it declares that it
mutates the layer's protocol state (call count and failure record, which it does), so
compilers keep every call and order the calls of one layer by that dependency. The fake
implementation only describes the output (static, dynamic or unbacked counts trace): the
input checks run in the real one, which takes part in the exchange with a rejected input
so that every rank raises (a check at trace time would end the bad rank's call alone and
leave its peers one call ahead). A mutating op cannot take an autograd formula: a
backward through it raises PyTorch's "no autograd formula" error (forward-only, like
every tritonmoe op).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layer import layer_by_id


@torch.library.custom_op("tritonmoe::expert_parallel_moe", mutates_args=("state",))
def expert_parallel_moe(hidden_states: Tensor, state: Tensor, layer_id: int) -> Tensor:
    """The layer's output [T, H] for this rank's hidden_states [T, H]; ``state`` is the
    layer's ``protocol_state``."""
    return layer_by_id(layer_id).forward_impl(hidden_states, state)


@expert_parallel_moe.register_fake
def _expert_parallel_moe_fake(hidden_states, state, layer_id):
    return torch.empty_like(hidden_states, memory_format=torch.contiguous_format)
