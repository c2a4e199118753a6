"""The ``all_to_all`` transport: ``torch.distributed.all_to_all_single`` on the group's
backend (NCCL between GPUs on any number of nodes, gloo on CPU).

Every transport offers the same four steps, each returning at once (the data moves
asynchronously) except the two that wait::

    begin()                                                   once per forward
    send_buffers(rows, hidden, top_k, dtype, device) -> (send_x, send_ids, send_weights)
    dispatch(send_x, send_ids, send_weights, send_rows, recv_rows, filled_rows) -> pending
    receive(pending) -> (recv_x, recv_ids, recv_weights)      waits for the dispatch
    send_back(partials, send_rows, recv_rows, filled_rows) -> pending
    receive_back(pending) -> back                             waits for the partials
    end()                                                     once per forward

``send_rows[d]`` rows go to rank d, ``recv_rows[s]`` come from rank s, blocks in rank
order; only the first ``filled_rows[d]`` rows of block d hold data (a transport may
skip the rest, whose ids are -1). With fixed buffers every block is
``max_tokens_per_rank`` rows (no host synchronisation, capturable in a CUDA graph);
otherwise the sizes come from ``exchange_counts``, one small collective that the host
waits for.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from moe_ops.profiling import stage_range


class Pending(NamedTuple):
    works: list
    tensors: tuple


class AllToAllTransport:
    name = "all_to_all"

    def __init__(self, group, world_size: int):
        self.group, self.world_size = group, world_size

    def begin(self) -> None:
        """Nothing to prepare: the collectives order themselves."""

    def send_buffers(self, rows: int, hidden: int, top_k: int, dtype, device):
        return (torch.empty(rows, hidden, dtype=dtype, device=device),
                torch.empty(rows, top_k, dtype=torch.int32, device=device),
                torch.empty(rows, top_k, dtype=torch.float32, device=device))

    def exchange_counts(self, send_counts: torch.Tensor, failed: bool) -> list[int]:
        """Rows this rank will receive from each rank (a host sync). A rank that
        ``failed`` its argument checks says so here, and every rank raises."""
        status = torch.full_like(send_counts, int(failed))
        send = torch.stack([send_counts, status], dim=1).flatten()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        recv = recv.view(self.world_size, 2).tolist()
        bad = [src for src, (_, flag) in enumerate(recv) if flag]
        if bad:
            raise RuntimeError(
                f"ExpertParallelMoE: rank(s) {bad} of the group rejected their input "
                f"(see the error raised there); this rank stops too")
        return [count for count, _ in recv]

    def dispatch(self, send_x, send_ids, send_weights, send_rows, recv_rows, filled_rows=None) -> Pending:
        meta = torch.cat([send_ids, send_weights.view(torch.int32)], dim=1)
        recv_x = send_x.new_empty(sum(recv_rows), send_x.shape[1])
        recv_meta = meta.new_empty(sum(recv_rows), meta.shape[1])
        with stage_range("dispatch"):
            works = [
                dist.all_to_all_single(recv_x, send_x, recv_rows, send_rows,
                                       group=self.group, async_op=True),
                dist.all_to_all_single(recv_meta, meta, recv_rows, send_rows,
                                       group=self.group, async_op=True),
            ]
        return Pending(works, (recv_x, recv_meta))

    def receive(self, pending: Pending):
        with stage_range("dispatch_wait"):
            for work in pending.works:
                work.wait()
        recv_x, recv_meta = pending.tensors
        top_k = recv_meta.shape[1] // 2
        return (recv_x, recv_meta[:, :top_k].contiguous(),
                recv_meta[:, top_k:].contiguous().view(torch.float32))

    def send_back(self, partials, send_rows, recv_rows, filled_rows=None) -> Pending:
        back = partials.new_empty(sum(send_rows), partials.shape[1])
        with stage_range("combine"):
            work = dist.all_to_all_single(back, partials, send_rows, recv_rows,
                                          group=self.group, async_op=True)
        return Pending([work], (back,))

    def receive_back(self, pending: Pending) -> torch.Tensor:
        with stage_range("combine_wait"):
            pending.works[0].wait()
        return pending.tensors[0]

    def end(self) -> None:
        """Nothing to join."""
