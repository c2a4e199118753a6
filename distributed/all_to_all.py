"""The ``all_to_all`` transport: ``torch.distributed.all_to_all_single`` on the group's
backend (NCCL between GPUs on any number of nodes, gloo on CPU); the steps are
``transport.Transport``'s.

Each block is its tokens followed by ``header_rows`` rows holding the protocol's header
(``protocol``: layer, call count, status), stamped and checked on the device. With fixed
buffers every block is ``capacity + header_rows`` rows (no host synchronisation,
capturable in a CUDA graph); otherwise ``exchange_counts`` first moves each block's size
with a header, one small collective that the host waits for and checks.

Time-outs: ``timeout`` seconds bound each wait where the host waits anyway (every wait on
CPU, the count exchange on CUDA): ``Work.wait(timeout)``. On CUDA the data waits are
stream waits (a timed wait would block the host), bounded by the process group's own
time-out (NCCL's watchdog). ``timeout=None`` leaves every wait to the group's time-out.
"""
from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from moe_ops.profiling import stage_range

from . import protocol as P
from .kernels import check_headers_kernel, stamp_headers_kernel
from .streams import StreamOrder
from .plan import plan_dispatch
from .transport import PartialSums, Received, Transport

# Failed forwards whose block sizes never arrived (their count exchange timed out), per
# process group, in the order they failed. Their exchanges are issued at reset(), and the
# reset of any layer of the group issues all of them first: a peer that was merely late
# issued those exchanges in its forward, so this rank's next collective on the group, of
# whichever layer, must be them.
_UNFINISHED: dict = {}


class Pending(NamedTuple):
    works: list
    tensors: tuple


class AllToAllTransport(Transport):
    name = "all_to_all"

    def __init__(self, group, rank: int, world_size: int, capacity: int | None, hidden: int,
                 dtype, device, timeout: float | None = None):
        self.group, self.rank, self.world_size = group, rank, world_size
        self.capacity, self.timeout = capacity, timeout
        self.header_rows = P.header_rows(hidden, dtype)
        self.host_waits = torch.device(device).type == "cpu"
        self.order = StreamOrder()
        self._outstanding: list[Pending] = []  # issued by a failed forward, never waited for

    # -- headers -----------------------------------------------------------------------

    def _layout(self, counts):
        """Kernel arguments locating each block's header: fixed blocks, or blocks of
        ``counts[d] + header_rows`` rows (counts: int64 on the device)."""
        C, h = self.capacity, self.header_rows
        if C is not None:
            return dict(block_rows=C + h, capacity=C, FIXED=True), None
        return dict(block_rows=0, capacity=0, FIXED=False), counts

    def _stamp(self, call, rows: torch.Tensor, counts, bump: bool, layout=None,
               report_pending: bool = False):
        words = rows.view(torch.int64)
        kwargs, counts = layout or self._layout(counts)
        stamp_headers_kernel[(1,)](
            words, counts if counts is not None else call.state, call.state, call.layer_id,
            call.status, words.shape[1], WORLD=self.world_size, HEADER_ROWS=self.header_rows,
            BUMP=bump, REPORT_PENDING=report_pending, **kwargs)
        call.stamped = call.stamped or bump

    def _check(self, call, rows: torch.Tensor, counts, phase: int, layout=None, reply=None):
        """Check the headers in ``rows``; with ``reply`` stamp the answer's headers into
        it (same layout) in the same launch."""
        words = rows.view(torch.int64)
        kwargs, counts = layout or self._layout(counts)
        check_headers_kernel[(1,)](
            words, counts if counts is not None else call.state, call.state, call.layer_id,
            self.rank, words.shape[1], phase=phase,
            reply_ptr=reply.view(torch.int64) if reply is not None else words,
            status=call.status, WORLD=self.world_size, HEADER_ROWS=self.header_rows,
            REPLY=reply is not None, **kwargs)

    def _issue(self, call, name, recv, send, recv_rows=None, send_rows=None) -> Pending:
        work = dist.all_to_all_single(recv, send, recv_rows, send_rows, group=self.group,
                                      async_op=True)
        call.done.append(name)
        return work

    def _wait(self, call, pending: Pending, phase: int) -> None:
        """Wait for the works of one exchange; on a time-out or a backend error record it
        (sticky), keep the works alive and raise."""
        host = self.host_waits or phase == P.COUNTS
        try:
            for work in pending.works:
                if host and self.timeout is not None:
                    work.wait(timedelta(seconds=self.timeout))
                else:
                    work.wait()
        except Exception as error:  # gloo: "Operation timed out!"; NCCL: DistBackendError
            self._outstanding.append(pending)
            timed_out = "timed out" in str(error).lower() or isinstance(error, TimeoutError)
            count = int(call.state[P.COUNT])
            P.record_local(call.state, P.TIMEOUT if timed_out else P.TRANSPORT, count, phase)
            call.status = P.TIMED_OUT if timed_out else P.BROKEN
            values = call.state.tolist()
            if timed_out:
                raise P.ExpertParallelTimeout(
                    f"ExpertParallelMoE: rank {self.rank} waited more than {self.timeout} s for "
                    f"the {P.PHASE_NAMES[phase]} of call {count} of layer {call.layer_id}; a "
                    f"peer is late or stopped. The peers are told; layer.reset() on every rank "
                    f"makes the layer usable again") from error
            raise P.failure(values, call.layer_id, self.rank) from error

    # -- the steps of a forward ----------------------------------------------------------

    def exchange_counts(self, call, counts: torch.Tensor) -> tuple[list[int], list[int]]:
        """Without fixed buffers: each block's size, behind a header, to its destination
        (a host sync). Every rank raises here, before any token moves, when a header is
        wrong or any rank reports a failure. Returns (send_rows, recv_rows), headers
        included; sets ``call.send_counts`` and ``call.recv_counts``."""
        W = self.world_size
        payload = torch.zeros(W, 8, dtype=torch.int64, device=counts.device)
        one_row = (dict(block_rows=1, capacity=0, FIXED=True), None)
        self._stamp(call, payload, None, bump=not call.stamped, layout=one_row,
                    report_pending=True)
        payload[:, 4] = counts
        received = torch.empty_like(payload)
        with stage_range("dispatch"):
            pending = Pending([self._issue(call, "counts", received, payload)], (received, payload))
        call.counts_pending = pending
        self._wait(call, pending, P.COUNTS)
        self._check(call, received, None, P.COUNTS, layout=one_row)
        values = torch.cat([received[:, 4], payload[:, 4], call.state]).tolist()
        state = values[2 * W:]
        if state[P.POISON] or state[P.CODE] or call.status:  # what every rank saw
            call.everyone_raised = True
            P.clear_reported(call.state)
            raise P.failure(state, call.layer_id, self.rank) if state[P.CODE] else \
                P.ExpertParallelError(f"ExpertParallelMoE: rank {self.rank} "
                                      f"{P.STATUS_NAMES[call.status]}")
        h = self.header_rows
        call.send_counts = payload[:, 4].contiguous()
        call.recv_counts = received[:, 4].contiguous()
        call.send_rows = [n + h for n in values[W:2 * W]]
        call.recv_rows = [n + h for n in values[:W]]
        return call.send_rows, call.recv_rows

    def plan(self, x, topk_weights, topk_ids, experts_per_rank, call=None):
        """The plan packed into fresh send blocks: W blocks of capacity (else T) rows plus
        a header each."""
        T, H = x.shape
        K = topk_ids.shape[1]
        rows = self.world_size * ((self.capacity if self.capacity is not None else T)
                                  + self.header_rows)
        send = (torch.empty(rows, H, dtype=x.dtype, device=x.device),
                torch.empty(rows, K, dtype=torch.int32, device=x.device),
                torch.empty(rows, K, dtype=torch.float32, device=x.device))
        return plan_dispatch(x, topk_weights, topk_ids, experts_per_rank, self.world_size,
                             self.capacity, self.header_rows, send)

    def wire_rows(self, routed):
        """Whole blocks of capacity rows with fixed buffers, else the routed rows; a
        header behind each block, both ways."""
        h, C = self.header_rows, self.capacity
        rows = [(n if C is None else C) + h for n in routed]
        return rows, rows

    def dispatch(self, x, topk_weights, topk_ids, plan, send_rows, recv_rows,
                 call=None) -> Pending:
        """The packed blocks (their first sum(send_rows) rows), headers stamped first."""
        send_x, send_ids, send_weights = (buf[:sum(send_rows)] for buf in plan.send)
        self._stamp(call, send_x, call.send_counts, bump=call.fixed and not call.stamped)
        meta = torch.cat([send_ids, send_weights.view(torch.int32)], dim=1)
        recv_x = send_x.new_empty(sum(recv_rows), send_x.shape[1])
        recv_meta = meta.new_empty(sum(recv_rows), meta.shape[1])
        with stage_range("dispatch"):
            works = [self._issue(call, "dispatch", recv_x, send_x, recv_rows, send_rows),
                     self._issue(call, "dispatch_meta", recv_meta, meta, recv_rows, send_rows)]
        return Pending(works, (recv_x, recv_meta, send_x, meta))

    def receive(self, pending: Pending, call=None, early: bool = False):
        """Every block, once the collectives are done (``early`` changes nothing: the
        rows come in one collective)."""
        with stage_range("dispatch_wait"):
            self._wait(call, pending, P.DISPATCH)
        recv_x, recv_meta = pending.tensors[:2]
        call.received = recv_x  # its headers are checked with send_back's stamp: one launch
        top_k = recv_meta.shape[1] // 2
        return Received(recv_x, recv_meta[:, :top_k].contiguous(),
                        recv_meta[:, top_k:].contiguous().view(torch.float32))

    def send_back(self, partials, send_rows, recv_rows, call=None) -> Pending:
        self._check(call, call.received, call.recv_counts, P.DISPATCH, reply=partials)
        back = partials.new_empty(sum(send_rows), partials.shape[1])
        with stage_range("combine"):
            work = self._issue(call, "back", back, partials, send_rows, recv_rows)
        return Pending([work], (back, partials))

    def receive_back(self, pending: Pending, call=None) -> torch.Tensor:
        with stage_range("combine_wait"):
            self._wait(call, pending, P.COMBINE)
        back = pending.tensors[0]
        self._check(call, back, call.send_counts, P.COMBINE)
        return PartialSums(back)

    def end(self, call) -> None:
        """Nothing to join; forget the failed forwards' works that have finished."""
        if self._outstanding:
            self._outstanding = [p for p in self._outstanding
                                 if not all(w.is_completed() for w in p.works)]

    # -- failures ----------------------------------------------------------------------

    def abort(self, call, hidden: int, top_k: int, dtype, device) -> None:
        """Finish this forward's exchanges after a failure on this rank, carrying
        ``call.status`` in every header, without waiting: the peers' waits end and they
        raise instead of hanging, and every rank issues the same collectives (gloo aborts
        the process on a size mismatch). When the count exchange timed out the sizes are
        unknown: the rest waits for ``reset()``. Headers are written from the host (the
        failure may have been a kernel's)."""
        if call.everyone_raised or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return
        if not call.fixed and "counts" not in call.done:
            try:  # every rank raises at the count exchange: nothing else moves
                self.exchange_counts(call, torch.zeros(self.world_size, dtype=torch.int64,
                                                       device=device))
            except P.ExpertParallelError:
                pass
            return
        call.shapes = (hidden, top_k, dtype, device)
        if not call.fixed and call.send_rows is None:
            _UNFINISHED.setdefault(self.group, []).append((self, call))
            return
        self._finish(call)

    def _finish(self, call) -> None:
        """Issue the exchanges ``call`` has not issued yet, with empty blocks."""
        hidden, top_k, dtype, device = call.shapes
        W, h, C = self.world_size, self.header_rows, self.capacity
        if not call.stamped:
            count = int(call.state[P.COUNT])
            if count < P.INT64_MAX:
                call.state[P.COUNT] = count + 1
            call.stamped = True
        header = torch.tensor([P.MAGIC, call.layer_id, int(call.state[P.COUNT]), call.status],
                              dtype=torch.int64, device=device)
        send_rows = call.send_rows or [C + h] * W
        recv_rows = call.recv_rows or [C + h] * W

        def blocks(rows_per_block):
            buf = torch.zeros(sum(rows_per_block), hidden, dtype=dtype, device=device)
            ends = torch.tensor(rows_per_block).cumsum(0) - h
            buf.view(torch.int64)[ends.to(device), :P.HEADER_WORDS] = header
            return buf

        if "dispatch" not in call.done:
            send_x = blocks(send_rows)
            meta = torch.full((sum(send_rows), 2 * top_k), -1, dtype=torch.int32, device=device)
            recv_x = send_x.new_empty(sum(recv_rows), hidden)
            recv_meta = meta.new_empty(sum(recv_rows), 2 * top_k)
            self._outstanding.append(Pending(
                [self._issue(call, "dispatch", recv_x, send_x, recv_rows, send_rows),
                 self._issue(call, "dispatch_meta", recv_meta, meta, recv_rows, send_rows)],
                (recv_x, send_x, recv_meta, meta)))
        if "back" not in call.done:
            partials = blocks(recv_rows)
            back = partials.new_empty(sum(send_rows), hidden)
            self._outstanding.append(Pending(
                [self._issue(call, "back", back, partials, send_rows, recv_rows)], (back, partials)))

    def reset(self) -> None:
        """Finish the forwards a timed-out count exchange left unfinished, every layer's
        of this group in the order they failed, then wait (up to the group's time-out) for
        every exchange this layer's failed forwards left in flight. Raises if they cannot
        finish (a peer is gone: build a new group)."""
        for transport, call in _UNFINISHED.pop(self.group, []):
            received, payload = call.counts_pending.tensors[:2]
            for work in call.counts_pending.works:
                work.wait()
            h = transport.header_rows
            call.send_rows = [n + h for n in payload[:, 4].tolist()]
            call.recv_rows = [n + h for n in received[:, 4].tolist()]
            transport._finish(call)
        pending, self._outstanding = self._outstanding, []
        for item in pending:
            for work in item.works:
                work.wait()
