"""The ``nvlink`` transport: one node, PyTorch symmetric memory (CUDA backend), SM stores
into the peers' memory and flags in device memory. No host synchronisation; a forward
can be captured in a CUDA graph and replayed, any number of times per graph, on any rank
at any point: nothing depends on the host's call history.

Workspace, shared by every layer of the same (group, world size, capacity, hidden, top_k,
dtype), one set of buffers on every rank (W ranks, capacity C):

    symmetric  recv_x [W*C, H]    the tokens the ranks sent here, in rows [0, fill):
                                  each sender reserves its block of rows with an atomic
                                  add to ``fill`` (so a block is where the sender's
                                  reservation landed, not at a fixed place)
               recv_ids [W*C, K] int32 (-1 on every row no dispatch filled),
               recv_weights [W*C, K] fp32
               recv_source [W*C] int32  the rank whose dispatch filled the row
               fill int32         rows reserved so far in this forward
               back [W*C, H]      row i: this rank's partial sum of the token in
                                  recv_x row i (its sender reads it from here)
               headers [2, W, 4] int64 headers[0, s] / headers[1, s]: the header
                                  (``protocol``: magic, layer id, call count, status) of
                                  rank s's dispatch / combine message
               flags [3, W] int64 flags[0, s] / flags[1, s] / flags[2, s]: the epoch whose
                                  dispatch rows / partial sums / dispatch ids, weights and
                                  sources from rank s have fully arrived, or FLAG_FAILED
                                  when rank s failed (flags[2] goes with headers[0])
    local      epoch int64 (bumped on the device by every forward of the workspace),
               failed int64 (sticky until ``reset``), record [RECORD_WORDS] int64 (the
               first failure's state and layer id, ``protocol``), late int64 (the epoch
               in which a gate_up tile gave up waiting for landing rows), three int32
               arrival counters (the launch stages whose last program raises flags)

One forward, four launches of this transport besides the plan: ``plan`` (the plan
kernel) bumps the epoch and the layer's call count, then reserves each destination's
rows in its receive buffer; ``dispatch`` (one launch on a side stream) stores each token
row, its ids and its weights into the reserved rows of every rank that owns one of its
experts (this rank's own included): only the routed rows move, at any capacity. It
moves the ids, weights and sources first and then writes every rank's header and raises
its ids flag; then the rows, and raises every rank's rows flag (release, system scope).
``receive`` spins on this rank's flags (acquire) until each equals the epoch exactly,
then checks each header against this call: another layer or call count (two layers of
one shape called in different orders, a skipped or extra call) fails the workspace on
every rank; a peer that rejected its input (status INPUT) poisons this forward only.
It waits for the rows flags (after joining the side stream), or, ``early``, only for
every rank's ids flag: the receiver then ranks and aligns its rows while they land, and
each gate_up tile waits for the rows flags of the sources of its rows
(``moe_ops.kernels.landing``; a tile that gives up makes the send-back a time-out).
The expert pipeline reads rows [0, fill) only (``Received.rows``)
and writes its partial sums straight into ``back`` (``partials_out``); ``send_back`` (one
launch) sets the filled ``recv_ids`` rows back to -1 and ``fill`` to 0 (the next
dispatch starts from an empty buffer) and raises each peer's second flag with its
header. The way back is a pull: after ``receive_back``'s wait, the combine
kernel reads exactly its tokens' rows from each owner's ``back`` through the peer
mapping. ``end`` joins the side stream.

Failures: a wait ends early on a peer's FLAG_FAILED, on a flag from a later epoch (the
ranks called the workspace's layers differently), or after ``timeout`` seconds of the
GPU's global clock; the workspace is then failed, the layer's state records why and
poisons the output (NaN; ``layer.check()`` raises), every later wait ends at once and
every later flag this rank raises is FLAG_FAILED, so its peers fail instead of waiting
or reading stale rows. The other layers of the workspace then record SHARED at their next
forward, and their ``check()`` quotes the first failure. An exception inside a forward
fails the workspace and raises the flags it had not raised. ``reset`` (collective)
zeroes flags, epoch, failure, record and counters.

Buffers are safe to reuse with one set: a rank reserves and pushes forward n+1 only after
its combine wait of forward n (the side stream waits for the main stream), which the
peer signalled after its last read of forward n's dispatch data and after resetting its
``recv_ids`` and ``fill``;
a rank overwrites ``back`` in forward n+1 only after every peer's ids flag of n+1,
which each peer raised after its combine of forward n (its last read of ``back``);
``end`` joins the side stream before the next forward plans.

NVLink multicast is never used: no multimem ops, no multicast objects.
"""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist
import triton

from moe_ops.interpreter import BLOCKS
from moe_ops.kernels.landing import CLOCK_TICKS_PER_S
from moe_ops.pipeline import Landing
from moe_ops.profiling import stage_range

from . import protocol as P
from .kernels import push_rows_kernel, put_flag_kernel, release_back_kernel, wait_flags_kernel
from .streams import StreamOrder
from .plan import plan_dispatch
from .transport import PartialSums, Received, Transport

_ALIGN = 256


def _layout(world, capacity, hidden, top_k, dtype):
    """Byte offsets of the symmetric buffers in one slot, and its size."""
    item = torch.empty((), dtype=dtype).element_size()
    rows = world * capacity
    sizes = dict(recv_x=(rows * hidden * item, dtype, (rows, hidden)),
                 back=(rows * hidden * item, dtype, (rows, hidden)),
                 recv_ids=(rows * top_k * 4, torch.int32, (rows, top_k)),
                 recv_weights=(rows * top_k * 4, torch.float32, (rows, top_k)),
                 recv_source=(rows * 4, torch.int32, (rows,)),
                 headers=(2 * world * P.HEADER_WORDS * 8, torch.int64, (2, world, P.HEADER_WORDS)),
                 flags=(3 * world * 8, torch.int64, (3, world)),
                 fill=(4, torch.int32, (1,)))
    layout, offset = {}, 0
    for name, (nbytes, dt, shape) in sizes.items():
        layout[name] = (offset, nbytes, dt, shape)
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return layout, offset


def _view(raw: torch.Tensor, offset, nbytes, dtype, shape) -> torch.Tensor:
    return raw[offset:offset + nbytes].view(dtype).view(shape)


# The rows of ``flags``: rows landed (dispatch), partial sums ready (combine), ids landed
# (dispatch); the header row each goes with.
_ROWS, _COMBINE, _IDS = range(3)
_HEADER_OF = {_ROWS: 0, _COMBINE: 1, _IDS: 0}

# The rows of ``_Slot.addresses``: where, in rank d's memory, this rank's data goes.
ADDRESSES = ("recv_x", "recv_ids", "recv_weights", "recv_source", "fill", "header_dispatch",
             "flag_dispatch", "header_combine", "flag_combine", "flag_ids")


class _Slot:
    """One set of symmetric buffers and the peers' mappings of them."""

    def __init__(self, group, rank, world, capacity, hidden, top_k, dtype, device):
        import torch.distributed._symmetric_memory as symm_mem

        layout, total = _layout(world, capacity, hidden, top_k, dtype)
        raw = symm_mem.empty(total, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(raw, group)
        self.local = {name: _view(raw, *spec) for name, spec in layout.items()}
        self.peers, raws = {}, {rank: raw}
        for peer in range(world):
            if peer != rank:
                raws[peer] = handle.get_buffer(peer, (total,), torch.uint8, 0)
                self.peers[peer] = {name: _view(raws[peer], *spec) for name, spec in layout.items()}
        self.clear()
        # Byte offsets, within a slot, of what this rank writes (``ADDRESSES``): the
        # receive buffers and fill counter whole, its own header and flag slots.
        mine = {name: layout[name][0]
                for name in ("recv_x", "recv_ids", "recv_weights", "recv_source", "fill")}
        for row, phase in enumerate(("dispatch", "combine", "ids")):
            slot = row * world + rank  # headers[row, rank], flags[row, rank]
            if phase != "ids":  # the ids flag goes with the dispatch header
                mine[f"header_{phase}"] = layout["headers"][0] + slot * P.HEADER_WORDS * 8
            mine[f"flag_{phase}"] = layout["flags"][0] + slot * 8
        # int64 [len(ADDRESSES), W]: the address of each, in rank d's memory (mapped here).
        self.addresses = torch.tensor(
            [[raws[d].data_ptr() + mine[name] for d in range(world)] for name in ADDRESSES],
            dtype=torch.int64, device=device)
        # Where rank d's partial sums of this rank's tokens are, for the combine's pull:
        # d's ``back`` (mapped here), whose rows mirror d's receive rows.
        self.back_bases = torch.tensor([raws[d].data_ptr() + layout["back"][0]
                                        for d in range(world)], dtype=torch.int64, device=device)
        self._keep = (raw, handle)

    def address(self, name: str) -> torch.Tensor:
        """int64 [W]: ``name``'s (``ADDRESSES``) address in every rank's memory."""
        return self.addresses[ADDRESSES.index(name)]

    def clear(self) -> None:
        """No flag raised, no header, no row filled, no token in any receive row."""
        self.local["flags"].zero_()
        self.local["headers"].zero_()
        self.local["fill"].zero_()
        self.local["recv_ids"].fill_(-1)


class _Workspace:
    """The buffers, the device epoch and failure word, the side stream, and the order of
    the forwards that share them (``streams``)."""

    def __init__(self, group, rank, world, capacity, hidden, top_k, dtype, device):
        self.slot = _Slot(group, rank, world, capacity, hidden, top_k, dtype, device)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)
        self.failed = torch.zeros(1, dtype=torch.int64, device=device)
        self.record = torch.zeros(P.RECORD_WORDS, dtype=torch.int64, device=device)
        # The epoch in which a gate_up tile gave up waiting for landing rows (``landing``).
        self.late = torch.zeros(1, dtype=torch.int64, device=device)
        # Arrival counters of the push's two stages and of the release
        # (``kernels._last_program``).
        self.arrivals = torch.zeros(3, dtype=torch.int32, device=device)
        self.scratch_state = P.new_state(device)  # for transport calls outside a layer
        # High priority: its blocks go first when gate_up's tiles wait for its rows.
        self.side = torch.cuda.Stream(device=device, priority=-1)
        self.order = StreamOrder()
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every rank's flags are zero before anyone signals


_WORKSPACES: dict = {}


class NVLinkTransport(Transport):
    """The steps of ``transport.Transport`` over symmetric memory (``call`` is
    optional, for the benchmark's transport-only loop). ``timeout``: seconds a wait spins
    before it fails the workspace; ``None``: the process group's time-out."""
    name = "nvlink"
    header_rows = 0

    def __init__(self, group, rank: int, world_size: int, capacity: int, hidden: int,
                 top_k: int, dtype, device, timeout: float | None = None):
        key = (group.group_name, world_size, rank, capacity, hidden, top_k, dtype,
               torch.device(device))
        if key not in _WORKSPACES:
            _WORKSPACES[key] = _Workspace(group, rank, world_size, capacity, hidden, top_k,
                                          dtype, device)
        self.workspace = _WORKSPACES[key]
        self.group, self.rank, self.world_size = group, rank, world_size
        self.capacity = capacity
        seconds = timeout if timeout is not None else group_timeout_s(group, torch.device(device))
        self.hip = torch.version.hip is not None
        self.timeout_ticks = int(seconds * CLOCK_TICKS_PER_S[self.hip])
        self.order = self.workspace.order
        self.slot = self.workspace.slot
        self._landing = False  # this forward's gate_up read rows as they landed

    def _state(self, call):
        return call.state if call is not None else self.workspace.scratch_state

    def plan(self, x, topk_weights, topk_ids, experts_per_rank, call=None):
        """The forward's start (the workspace's epoch and the layer's call count bumped on
        the device) and its plan, each block's rows reserved in its destination's receive
        buffer (no send buffers: the dispatch stores rows of x straight into the ranks'
        memory). One launch."""
        ws = self.workspace
        return plan_dispatch(x, topk_weights, topk_ids, experts_per_rank, self.world_size,
                             self.capacity, reserve=self.slot.address("fill"),
                             state=self._state(call), bump=(ws.epoch, ws.failed))

    def wire_rows(self, routed):
        """Each routed row once there (``dispatch``) and once back (the combine's pull)."""
        return list(routed), list(routed)

    @staticmethod
    def _identity(call):
        """(layer id, status) this rank's messages carry; transport-only calls (no layer)
        carry -1 and OK on every rank alike."""
        return (call.layer_id, call.status) if call is not None else (-1, P.OK)

    def dispatch(self, x, topk_weights, topk_ids, plan, send_rows, recv_rows, call=None):
        """One launch on the side stream (after the main stream's plan): every token row,
        its ids and weights into its owners' receive blocks, then every peer's header and
        flag (``kernels.push_rows_kernel``)."""
        ws, slot = self.workspace, self.slot
        T, H = x.shape
        block_t, block_h = BLOCKS.gather_rows, BLOCKS.gather_h
        with stage_range("dispatch"):
            ws.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(ws.side):
                push_rows_kernel[(max(1, triton.cdiv(T, block_t)), triton.cdiv(H, block_h))](
                    x, topk_ids, topk_weights, plan.rows, slot.address("recv_x"),
                    slot.address("recv_ids"), slot.address("recv_weights"),
                    slot.address("recv_source"), slot.address("header_dispatch"),
                    slot.address("flag_ids"), slot.address("flag_dispatch"),
                    ws.arrivals[0:2], ws.epoch, ws.failed, self._state(call),
                    *self._identity(call), T, H, plan.experts_per_rank,
                    self.rank, WORLD=self.world_size, TOP_K=topk_ids.shape[1],
                    K_PAD=triton.next_power_of_2(topk_ids.shape[1]), BLOCK_T=block_t,
                    BLOCK_H=block_h)
        if call is not None:
            call.done.append("dispatch")

    def _signal(self, peer_bufs, flag_row: int, call=None):
        """This call's header, then the flag, into the peer's slot (one launch)."""
        ws = self.workspace
        header_row = _HEADER_OF[flag_row]
        put_flag_kernel[(1,)](ws.epoch, ws.failed, self._state(call),
                              peer_bufs["headers"][header_row, self.rank],
                              peer_bufs["flags"][flag_row, self.rank:self.rank + 1],
                              *self._identity(call))

    def _wait(self, flag_row: int, stage: str, call=None, own: bool = False):
        """Every peer's flag in ``flag_row`` (``own``: this rank's too), and its header."""
        ws = self.workspace
        with stage_range(stage):
            wait_flags_kernel[(1,)](ws.epoch, self.slot.local["flags"][flag_row],
                                    self.slot.local["headers"][_HEADER_OF[flag_row]], ws.failed,
                                    ws.record, self._state(call), self._identity(call)[0],
                                    self.rank, -1 if own else self.rank, self.timeout_ticks,
                                    P.COMBINE if flag_row == _COMBINE else P.DISPATCH,
                                    WORLD=self.world_size, HIP=self.hip)

    def receive(self, pending, call=None, early: bool = False):
        """After this rank's own push (side stream) and every peer's rows flag; ``early``:
        after every rank's ids flag (this one's own included), the rows still landing
        (``Received.landing``: gate_up's tiles wait for them, ``moe_ops.kernels.landing``)."""
        ws, local, rows = self.workspace, self.slot.local, self.world_size * self.capacity
        if early:
            self._wait(_IDS, "ids_wait", call, own=True)
            landing = Landing(local["recv_source"], local["flags"][_ROWS], ws.epoch, ws.late,
                              ws.failed, self.timeout_ticks, self.hip)
        else:
            torch.cuda.current_stream().wait_stream(ws.side)
            self._wait(_ROWS, "dispatch_wait", call)
            landing = None
        self._landing = landing is not None
        return Received(local["recv_x"].view(rows, -1), local["recv_ids"].view(rows, -1),
                        local["recv_weights"].view(rows, -1), local["fill"], landing)

    def partials_out(self, rows, hidden, dtype, device) -> torch.Tensor:
        """``back``: the expert pipeline writes the partial sums where the peers read."""
        return self.slot.local["back"].view(rows, hidden)

    def send_back(self, partials, send_rows, recv_rows, call=None):
        """The partial sums are in ``back`` already: one launch sets every ``recv_ids`` row
        back to -1, then writes each peer's second header and raises its flag
        (``kernels.release_back_kernel``)."""
        ws, slot = self.workspace, self.slot
        if partials.data_ptr() != slot.local["back"].data_ptr():
            raise ValueError("nvlink send_back: the partial sums must be in partials_out()")
        ids = slot.local["recv_ids"]
        block = 1024
        with stage_range("combine"):
            release_back_kernel[(triton.cdiv(ids.numel(), block),)](
                ids, slot.local["fill"], ids.numel(), slot.address("header_combine"),
                slot.address("flag_combine"), ws.arrivals[2:], ws.epoch, ws.failed,
                self._state(call), *self._identity(call), self.rank, ws.late, ws.record,
                WORLD=self.world_size, TOP_K=ids.shape[-1], LANDING=self._landing,
                BLOCK=block)
        if call is not None:
            call.done.append("back")

    def receive_back(self, pending, call=None) -> PartialSums:
        """After the peers' second flags: where the combine reads each owner's rows."""
        self._wait(_COMBINE, "combine_wait", call)
        rows = self.world_size * self.capacity
        return PartialSums(self.slot.local["back"].view(rows, -1), self.slot.back_bases)

    def end(self, call=None) -> None:
        """Join the side stream."""
        torch.cuda.current_stream().wait_stream(self.workspace.side)

    def abort(self, call, hidden, top_k, dtype, device) -> None:
        """After an exception inside a forward: fail the workspace, raise FLAG_FAILED in
        every flag this forward had not raised yet (the peers' waits end at once), record
        it in the layer's state and join the side stream."""
        ws = self.workspace
        if torch.cuda.is_current_stream_capturing():
            return
        ws.failed.fill_(1)
        P.record_local(call.state, P.RAISED, int(call.state[P.COUNT]), P.DISPATCH)
        if not int(ws.record[P.CODE]):
            ws.record[:P.STATE_WORDS] = call.state
            ws.record[P.RECORD_LAYER] = call.layer_id
        ws.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(ws.side):
            for rows, name in (((_IDS, _ROWS), "dispatch"), ((_COMBINE,), "back")):
                if name not in call.done:
                    for bufs in self.slot.peers.values():
                        for row in rows:
                            self._signal(bufs, row, call)
        torch.cuda.current_stream().wait_stream(ws.side)

    def failure_record(self) -> list[int]:
        """The workspace's first failure (``protocol.RECORD_WORDS`` ints; zeros: none).
        A host sync."""
        return self.workspace.record.tolist()

    def reset(self) -> None:
        """Collective: once every rank's queued work is done, zero the flags, the epoch,
        the failure word and the arrival counters on every rank."""
        ws = self.workspace
        torch.cuda.synchronize()
        dist.barrier(group=self.group)
        self.slot.clear()
        ws.epoch.zero_()
        ws.failed.zero_()
        ws.record.zero_()
        ws.late.zero_()
        ws.arrivals.zero_()
        torch.cuda.synchronize()
        dist.barrier(group=self.group)


def group_timeout_s(group, device: torch.device) -> float:
    """The process group's time-out in seconds (torch's default when it cannot be read)."""
    try:
        return group._get_backend(device).options._timeout.total_seconds()
    except Exception:  # noqa: BLE001  (an older torch, another backend)
        backend = dist.get_backend(group)
        return dist.distributed_c10d._get_default_timeout(backend).total_seconds()


def peer_access_ok(gathered: list[dict], local: dict, can_access) -> bool:
    """The nvlink decision from every rank's ``gpu_identity`` (gathered) and this rank's:
    one host, CUDA everywhere, distinct GPUs, and peer access from this rank's GPU to
    every other rank's. GPUs are matched by UUID among the devices this process sees
    (indices differ between processes, e.g. under per-process CUDA_VISIBLE_DEVICES); a
    GPU this process cannot see counts as not reachable. ``can_access(i, j)`` answers
    for local device indices."""
    if local["uuid"] is None or any(g["host"] != local["host"] or g["uuid"] is None
                                    for g in gathered):
        return False
    uuids = [g["uuid"] for g in gathered]
    if len(set(uuids)) != len(uuids):
        return False
    visible = local["visible"]  # uuid -> local index
    for uuid in uuids:
        if uuid == local["uuid"]:
            continue
        if uuid not in visible or not can_access(local["index"], visible[uuid]):
            return False
    return True


def gpu_identity(device: torch.device) -> dict:
    """This rank's host, its GPU's UUID and local index, and the UUIDs of the GPUs it
    can see (no UUIDs off CUDA)."""
    import socket

    identity = dict(host=socket.gethostname(), uuid=None, index=None, visible={})
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        visible = {str(torch.cuda.get_device_properties(i).uuid): i
                   for i in range(torch.cuda.device_count())}
        identity.update(uuid=str(torch.cuda.get_device_properties(index).uuid), index=index,
                        visible=visible)
    return identity


def nvlink_available(group, device: torch.device) -> bool:
    """Every rank of the group on one host, on distinct CUDA devices with peer access
    from every rank, and symmetric memory importable. Collective: call on every rank."""
    local = gpu_identity(device)
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    ok = peer_access_ok(gathered, local, torch.cuda.can_device_access_peer)
    if ok:
        try:  # (an import statement here would make ``torch`` a local name)
            importlib.import_module("torch.distributed._symmetric_memory")
        except ImportError:
            ok = False
    votes = [None] * len(gathered)
    dist.all_gather_object(votes, ok, group=group)
    return all(votes)
