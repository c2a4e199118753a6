"""What the expert-parallel layer asks of a transport: the ``Transport`` interface.

``all_to_all.AllToAllTransport`` (``torch.distributed`` collectives, any backend) and
``nvlink.NVLinkTransport`` (symmetric memory, one node) implement it; the layer calls
only these steps, in this order per forward (``call`` is the forward's ``protocol.Call``)::

    plan(x, topk_weights, topk_ids, experts_per_rank, call=) -> plan.DispatchPlan
    exchange_counts(call, counts) -> (send_rows, recv_rows)   without fixed buffers only
    dispatch(x, topk_weights, topk_ids, plan, send_rows, recv_rows, call=) -> pending
    receive(pending, call=, early=) -> Received                     waits for the dispatch
    partials_out(rows, hidden, dtype, device) -> where the expert output goes (or None)
    send_back(partials, send_rows, recv_rows, call=) -> pending
    receive_back(pending, call=) -> PartialSums                     waits for the partials
    end(call)
    abort(call, hidden, top_k, dtype, device)   after a failure on this rank: finish the
                                                forward's exchanges carrying its status
    reset()                     collective: drain what failed forwards left (``layer.reset``)
    failure_record()            what failed a buffer set shared by several layers (or None)

``send_rows[d]`` rows go to rank d and ``recv_rows[s]`` come from rank s, blocks in rank
order; each block is its tokens followed by ``header_rows`` rows of protocol header
(``protocol``); a transport that places the rows itself (``nvlink``: its plan reserves
them in the receiver's buffer) ignores both. ``order`` (``streams.StreamOrder``) orders
forwards issued from several CUDA streams. ``wire_rows`` says what one forward moves
(for the benchmark's bytes).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from .streams import StreamOrder


class PartialSums(NamedTuple):
    """Where the combine reads rank d's partial sum of token t: row ``rows_of[d, t]`` (the
    dispatch plan's) of ``back``, or, with ``peer_bases``, of the [rows, hidden] buffer
    at address ``peer_bases[d]`` (int64 [W] on the device: other ranks' memory, mapped)."""
    back: torch.Tensor
    peer_bases: torch.Tensor | None = None


class Received(NamedTuple):
    """The rows this rank received: x [R, H], ids [R, K] in its numbering (-1: not its
    expert, or no token), weights [R, K] fp32, ``rows``: None, or int32 [1] on the
    device, the rows in use (the ones after it hold no token), and ``landing``: None, or
    how the rows of x still landing are waited for (``moe_ops.pipeline.Landing``; ids and
    weights are in)."""
    x: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    rows: torch.Tensor | None = None
    landing: object = None


class Transport(ABC):
    """One way of moving the layer's token blocks to the ranks and the partial sums back."""

    name: str
    header_rows: int  # protocol rows after each block's tokens (0: the transport checks otherwise)
    order: StreamOrder

    @abstractmethod
    def plan(self, x, topk_weights, topk_ids, experts_per_rank: int, call=None):
        """Once per forward, before anything moves: who goes where
        (``plan.plan_dispatch``), packed into send blocks where this transport sends
        packed blocks."""

    @abstractmethod
    def wire_rows(self, routed: list[int]) -> tuple[list[int], list[int]]:
        """(rows sent to each rank, rows coming back from it) in one forward, headers
        included, when ``routed[d]`` of this rank's tokens need rank d's experts."""

    def exchange_counts(self, call, counts):
        """Block sizes without fixed buffers: (send_rows, recv_rows) lists, host-known."""
        raise ValueError(f"transport {self.name!r} needs max_tokens_per_rank (fixed buffers)")

    @abstractmethod
    def dispatch(self, x, topk_weights, topk_ids, plan, send_rows, recv_rows, call=None):
        """Start moving every token to the ranks the plan names; returns what ``receive``
        waits on."""

    @abstractmethod
    def receive(self, pending, call=None, early: bool = False) -> Received:
        """Every source's rows, once they are here; ``early``: once their ids and weights
        are, where the transport can say how to wait for the rows (``Received.landing``)."""

    def partials_out(self, rows: int, hidden: int, dtype, device) -> torch.Tensor | None:
        """The [rows, hidden] buffer the expert pipeline writes the partial sums into, or
        None for a fresh one."""
        return None

    @abstractmethod
    def send_back(self, partials, send_rows, recv_rows, call=None):
        """Start moving the partial sums back; returns what ``receive_back`` waits on."""

    @abstractmethod
    def receive_back(self, pending, call=None) -> PartialSums:
        """The partial sums of this rank's tokens from every rank, once they are ready."""

    @abstractmethod
    def end(self, call) -> None:
        """Once per forward, after the partial sums are read."""

    @abstractmethod
    def abort(self, call, hidden: int, top_k: int, dtype, device) -> None:
        """After an exception inside a forward: let the peers' waits end with the failure."""

    @abstractmethod
    def reset(self) -> None:
        """Collective: make the transport usable again after a failed forward."""

    def failure_record(self) -> list[int] | None:
        """The first failure of state shared by several layers (``protocol.SHARED``
        quotes it); None where layers share none."""
        return None
