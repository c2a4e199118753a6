"""Who goes where: the dispatch plan of one forward, and the send blocks it packs.

Rank d owns the experts ``[d*E_l, (d+1)*E_l)``. A token is sent once to every rank that
owns at least one of its top-k experts, with all K ids rewritten to that rank's local
numbering (-1 for the experts it does not own, which the kernels skip) and its K
weights. Per destination the tokens keep their order; block d of the send buffer starts
at row ``offsets[d]`` (``d * capacity`` with fixed buffers, the running sum of the
counts otherwise). Everything is computed on the device from shapes: no host sync.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class DispatchPlan(NamedTuple):
    order: torch.Tensor  # int64 [W, T]: per destination, the tokens it needs first, in order
    counts: torch.Tensor  # int64 [W]: tokens sent to each destination (on the device)
    local_ids: torch.Tensor  # int32 [W, T, K]: ids in each destination's numbering, or -1
    rows: torch.Tensor  # int32 [W, T]: token t's row in the returned partials, or -1


def plan_dispatch(topk_ids: torch.Tensor, experts_per_rank: int, world_size: int,
                  capacity: int | None, skip_rank: int | None = None) -> DispatchPlan:
    """The plan for topk_ids [T, K]. Block d of the send buffer starts at ``d * capacity``,
    or, with ``capacity=None``, right after block d-1's tokens. ``skip_rank`` (this
    rank, when it computes its own tokens in place) is sent nothing and has rows -1;
    its ``local_ids`` are still filled, for the in-place computation."""
    ranks = torch.arange(world_size, device=topk_ids.device)
    local = topk_ids.long()[None] - (ranks * experts_per_rank)[:, None, None]  # [W, T, K]
    owned = (local >= 0) & (local < experts_per_rank)
    local_ids = torch.where(owned, local, -1).to(torch.int32)
    needed = owned.any(dim=-1)  # [W, T]
    if skip_rank is not None:
        needed[skip_rank] = False
    counts = needed.sum(dim=1)
    offsets = ranks * capacity if capacity is not None else counts.cumsum(0) - counts
    order = torch.sort((~needed).to(torch.uint8), dim=1, stable=True).indices
    position = needed.long().cumsum(dim=1) - 1
    rows = torch.where(needed, offsets[:, None] + position, -1).to(torch.int32)
    return DispatchPlan(order, counts, local_ids, rows)


def pack_send_blocks(x: torch.Tensor, topk_weights: torch.Tensor, plan: DispatchPlan,
                     block_rows: list[int], offsets: list[int], send_x: torch.Tensor,
                     send_ids: torch.Tensor, send_weights: torch.Tensor,
                     skip_rank: int | None = None) -> None:
    """Fill block d (rows ``offsets[d] : offsets[d] + block_rows[d]``) of send_x [R, H],
    send_ids [R, K] and send_weights [R, K] with the first block_rows[d] tokens of
    ``plan.order[d]``. Every other row gets ids -1 (never computed); their x and
    weights are left as they were and never read."""
    send_ids.fill_(-1)
    for dest, (first, count) in enumerate(zip(offsets, block_rows)):
        if count == 0 or dest == skip_rank:
            continue
        tokens = plan.order[dest, :count]
        send_ids[first:first + count] = plan.local_ids[dest].index_select(0, tokens)
        torch.index_select(x, 0, tokens, out=send_x[first:first + count])
        torch.index_select(topk_weights, 0, tokens, out=send_weights[first:first + count])
