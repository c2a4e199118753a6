"""The expert-parallel forward users write today, step by step (the benchmark's baseline).

    route (our router, the same for every system)
    one row per (token, expert) pair, sorted by owner rank; split sizes to the host
    all_to_all_single of the counts, then of the rows, ids and weights
    torch._grouped_mm experts on the received rows (benchmarks/grouped_baseline.py)
    all_to_all_single back, un-sort, weighted sum per token (index_add), + shared expert

Two host synchronisations per forward (the split sizes) and every pair sent on its own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from benchmarks.grouped_baseline import grouped_mm_moe
from moe_ops.module import shared_expert_output


def sequential_ep_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for x [T, H] (an ``ExpertParallelMoE``, its weights and group)."""
    c, group, world = layer.config, layer.group, layer.world_size
    per_rank = c.num_experts // world
    bias = None if layer.score_bias is None else layer.score_bias.float()
    weights, ids = torch.ops.tritonmoe.route(
        x, layer.router_weight, c.top_k, c.scoring, c.renormalize, c.n_group, c.topk_group,
        bias, c.routed_scaling_factor)
    flat_ids = ids.reshape(-1).long()
    owner = flat_ids // per_rank
    order = torch.sort(owner, stable=True).indices
    token_of_pair = order // c.top_k
    send_counts = torch.bincount(owner, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_rows, recv_rows = send_counts.tolist(), recv_counts.tolist()

    send_x = x.index_select(0, token_of_pair)
    send_ids = (flat_ids[order] - owner[order] * per_rank).to(torch.int32)
    send_w = weights.reshape(-1)[order]
    recv_x = x.new_empty(sum(recv_rows), x.shape[1])
    recv_ids = send_ids.new_empty(sum(recv_rows))
    recv_w = send_w.new_empty(sum(recv_rows))
    for out, inp in ((recv_x, send_x), (recv_ids, send_ids), (recv_w, send_w)):
        dist.all_to_all_single(out, inp, recv_rows, send_rows, group=group)

    y = grouped_mm_moe(recv_x, recv_w[:, None], recv_ids[:, None], layer.w_gate_up, layer.w_down)
    back = y.new_empty(sum(send_rows), x.shape[1])
    dist.all_to_all_single(back, y, send_rows, recv_rows, group=group)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_pair, back.float())
    shared = shared_expert_output(x, layer.shared_gate_up, layer.shared_down, layer.shared_gate)
    if shared is not None:
        out += shared.float()
    return out.to(x.dtype)
