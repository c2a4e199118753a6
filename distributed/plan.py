"""Who goes where: the dispatch plan of one forward, packed into the send blocks.

Rank d owns the experts ``[d*E_l, (d+1)*E_l)``. A token is sent once to every rank that
owns at least one of its top-k experts, with all K ids rewritten to that rank's local
numbering (-1 for the experts it does not own, which the kernels skip) and its K
weights. Per destination the tokens keep their order; each block ends with
``header_rows`` rows for the transport's header (ids -1: no token); block d of the send
buffer starts at row ``d * (capacity + header_rows)`` with fixed buffers, right after
block d-1's tokens and header otherwise.
Two launches (``kernels.plan_pack_kernel``, ``kernels.gather_rows_kernel``), no host sync.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from moe_ops.interpreter import BLOCKS

from .kernels import gather_rows_kernel, plan_pack_kernel


class DispatchPlan(NamedTuple):
    counts: torch.Tensor  # int32 [W]: tokens sent to each destination (on the device)
    own_ids: torch.Tensor  # int32 [T, K]: ids in this rank's numbering, or -1
    rows: torch.Tensor  # int32 [W, T]: token t's row in the returned partials, or -1


def plan_and_pack(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  experts_per_rank: int, rank: int, world_size: int, capacity: int | None,
                  send_x: torch.Tensor, send_ids: torch.Tensor, send_weights: torch.Tensor,
                  skip_own: bool, header_rows: int = 0, sent_rows: int | None = None
                  ) -> DispatchPlan:
    """Plan the dispatch of x [T, H] and pack the send blocks (send_x [R, H], send_ids
    and send_weights [R, K], R = W * (capacity + header_rows), or W * (T + header_rows)
    without a capacity). With
    ``skip_own`` this rank sends itself nothing (it computes its tokens in place from
    ``own_ids``). Rows of a block past its tokens get ids -1; their x is not written.
    ``sent_rows``: with a capacity, how many rows of each block travel (default all):
    rows past them are left alone."""
    num_tokens, top_k = topk_ids.shape
    device = x.device
    counts = torch.empty(world_size, dtype=torch.int32, device=device)
    own_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    rows = torch.empty(world_size, num_tokens, dtype=torch.int32, device=device)
    src_token = torch.empty(send_x.shape[0], dtype=torch.int32, device=device)
    block_rows = (capacity or 0) + header_rows
    sent = block_rows if capacity is None or sent_rows is None else min(sent_rows, block_rows)
    plan_pack_kernel[(1,)](
        topk_ids, topk_weights, counts, own_ids, rows, send_ids, send_weights, src_token,
        num_tokens, block_rows, sent, experts_per_rank, rank, send_x.shape[0],
        WORLD=world_size, W_PAD=triton.next_power_of_2(world_size), TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k), FIXED=capacity is not None, SKIP_OWN=skip_own,
        HEADER_ROWS=header_rows, BLOCK_T=BLOCKS.plan_block_t,
        num_warps=4,
    )
    gathered = world_size * sent if capacity is not None else send_x.shape[0]
    if gathered and num_tokens:
        block_r, block_h = BLOCKS.gather_rows, BLOCKS.gather_h
        gather_rows_kernel[(triton.cdiv(gathered, block_r), triton.cdiv(x.shape[1], block_h))](
            x, src_token, send_x, gathered, sent if capacity is not None else gathered,
            block_rows if capacity is not None else gathered, x.shape[1],
            BLOCK_R=block_r, BLOCK_H=block_h)
    return DispatchPlan(counts, own_ids, rows)
