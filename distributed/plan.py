"""Who goes where: the dispatch plan of one forward, and the send blocks it packs.

Rank d owns the experts ``[d*E_l, (d+1)*E_l)``. A token is sent once to every rank that
owns at least one of its top-k experts, with all K ids rewritten to that rank's local
numbering (-1 for the experts it does not own, which the kernels skip) and its K
weights. Per destination the tokens keep their order; each block ends with
``header_rows`` rows for the transport's header (ids -1: no token); block d starts at
row ``d * (capacity + header_rows)`` with fixed buffers, right after block d-1's tokens
and header otherwise.
Planning is one launch (``kernels.plan_pack_kernel``; over nvlink it also starts the
forward), packing the rows of x one more (``kernels.gather_rows_kernel``); no host sync.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from moe_ops.interpreter import BLOCKS

from .kernels import gather_rows_kernel, plan_pack_kernel


class DispatchPlan(NamedTuple):
    counts: torch.Tensor  # int32 [W]: tokens sent to each destination (on the device)
    rows: torch.Tensor  # int32 [W, T]: token t's row among rank d's partial sums, or -1
    # (its row in the send blocks; with ``reserve``, its row in rank d's receive buffer)
    send: tuple | None  # (send_x, send_ids, send_weights) packed, or None: not packed
    experts_per_rank: int


def plan_dispatch(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  experts_per_rank: int, world_size: int, capacity: int | None,
                  header_rows: int = 0, send: tuple | None = None,
                  reserve: torch.Tensor | None = None, state: torch.Tensor | None = None,
                  bump: tuple | None = None) -> DispatchPlan:
    """Plan the dispatch of x [T, H] and, given ``send`` = (send_x [R, H], send_ids and
    send_weights [R, K]) with R = W * (capacity + header_rows) (W * (T + header_rows)
    without a capacity), pack the send blocks there: rows past a block's tokens get ids
    -1 and their x is not written. Without ``send`` only the plan is made (a transport
    that moves the rows of x itself); with ``reserve`` (int64 [W]: the address of each
    rank's int32 fill counter, in its memory) each block's rows are reserved in its
    destination's receive buffer of W * capacity rows instead, and ``rows`` name them
    there (a block without room is not sent, and the layer ``state`` records it). With
    ``bump`` = (epoch, failed) (the nvlink workspace's int64 words) the same launch first
    starts the forward: epoch and the ``state``'s call count bumped on the device."""
    num_tokens, top_k = topk_ids.shape
    device = x.device
    counts = torch.empty(world_size, dtype=torch.int32, device=device)
    rows = torch.empty(world_size, num_tokens, dtype=torch.int32, device=device)
    pack = send is not None
    total_rows = send[0].shape[0] if pack else 0
    src_token = torch.empty(total_rows, dtype=torch.int32, device=device)
    send_ids, send_weights = (send[1], send[2]) if pack else (topk_ids, topk_weights)  # unread
    plan_pack_kernel[(1,)](
        topk_ids, topk_weights, counts, rows, send_ids, send_weights, src_token,
        num_tokens, (capacity or 0) + header_rows, experts_per_rank, total_rows,
        reserve if reserve is not None else counts,  # these two unread without RESERVE
        world_size * (capacity or 0), state if state is not None else counts,
        *(bump if bump is not None else (counts, counts)),  # unread without BUMP
        WORLD=world_size, W_PAD=triton.next_power_of_2(world_size), TOP_K=top_k,
        K_PAD=triton.next_power_of_2(top_k), FIXED=capacity is not None,
        HEADER_ROWS=header_rows, PACK=pack, RESERVE=reserve is not None, BUMP=bump is not None,
        BLOCK_T=BLOCKS.plan_block_t,
        num_warps=4,
    )
    if pack and total_rows and num_tokens:
        block_r, block_h = BLOCKS.gather_rows, BLOCKS.gather_h
        gather_rows_kernel[(triton.cdiv(total_rows, block_r), triton.cdiv(x.shape[1], block_h))](
            x, src_token, send[0], total_rows, x.shape[1], BLOCK_R=block_r, BLOCK_H=block_h)
    return DispatchPlan(counts, rows, send, experts_per_rank)
