"""The ``nvlink`` transport: one node, PyTorch symmetric memory (CUDA backend), copy-engine
pushes on a side stream and flags in device memory. No host synchronisation; a forward
can be captured in a CUDA graph and replayed.

Workspace, shared by every layer of the same (group, capacity, hidden, top_k, dtype),
two slots used in turn so that consecutive layers never write into buffers a peer may
still read. One slot, on every rank (W ranks, capacity C):

    symmetric  recv_x [W, C, H]   block s: the tokens rank s sent here
               recv_ids [W, C, K] int32, recv_weights [W, C, K] fp32
               back [W, C, H]     block d: rank d's partial sums of the tokens sent to it
               flags [2, W] int32 flags[0, s] / flags[1, s]: the epoch whose dispatch /
                                  combine data from rank s has fully arrived
    local      send_x [W, C, H], send_ids, send_weights: the packed blocks

One forward: ``begin`` bumps the device epoch; ``dispatch`` makes the side stream wait
for the packed blocks, push block d into rank d's ``recv_*[rank]`` with the copy engine
(``Tensor.copy_`` between mapped buffers uses no SM) and raise rank d's flag (release,
system scope). ``receive`` spins on this rank's flags (acquire; bounded: on time-out the
status word records the silent peer and the next forward raises). The way back is the
same through ``back`` and the second flag row. ``end`` joins the side stream.

Buffers are safe to reuse: a rank starts forward n+1 only after every peer's combine
data of forward n arrived, which each peer sent after its last read of this forward's
dispatch data.

NVLink multicast is never used: no multimem ops, no multicast objects.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moe_ops.profiling import stage_range

from .kernels import bump_epoch_kernel, put_flag_kernel, wait_flags_kernel
from .streams import StreamOrder

DEFAULT_MAX_POLLS = 1 << 25  # each poll is one system-scope atomic: tens of seconds in all
_ALIGN = 256


def _layout(world, capacity, hidden, top_k, dtype):
    """Byte offsets of the symmetric buffers in one slot, and its size."""
    item = torch.empty((), dtype=dtype).element_size()
    sizes = dict(recv_x=(world * capacity * hidden * item, dtype, (world, capacity, hidden)),
                 back=(world * capacity * hidden * item, dtype, (world, capacity, hidden)),
                 recv_ids=(world * capacity * top_k * 4, torch.int32, (world, capacity, top_k)),
                 recv_weights=(world * capacity * top_k * 4, torch.float32, (world, capacity, top_k)),
                 flags=(2 * world * 4, torch.int32, (2, world)))
    layout, offset = {}, 0
    for name, (nbytes, dt, shape) in sizes.items():
        layout[name] = (offset, nbytes, dt, shape)
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return layout, offset


def _view(raw: torch.Tensor, offset, nbytes, dtype, shape) -> torch.Tensor:
    return raw[offset:offset + nbytes].view(dtype).view(shape)


class _Slot:
    """One set of symmetric buffers, the peers' mappings of them, and the send blocks."""

    def __init__(self, group, rank, world, capacity, hidden, top_k, dtype, device):
        import torch.distributed._symmetric_memory as symm_mem

        layout, total = _layout(world, capacity, hidden, top_k, dtype)
        raw = symm_mem.empty(total, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(raw, group)
        self.local = {name: _view(raw, *spec) for name, spec in layout.items()}
        self.peers = {}
        for peer in range(world):
            if peer != rank:
                peer_raw = handle.get_buffer(peer, (total,), torch.uint8, 0)
                self.peers[peer] = {name: _view(peer_raw, *spec) for name, spec in layout.items()}
        self.local["flags"].zero_()
        self.send_x = torch.empty(world * capacity, hidden, dtype=dtype, device=device)
        self.send_ids = torch.empty(world * capacity, top_k, dtype=torch.int32, device=device)
        self.send_weights = torch.empty(world * capacity, top_k, dtype=torch.float32, device=device)
        self._keep = (raw, handle)


class _Workspace:
    """Two slots, the device epoch, the time-out status, the side stream, and the order
    of the forwards that share them (``streams``)."""

    def __init__(self, group, rank, world, capacity, hidden, top_k, dtype, device):
        self.slots = [_Slot(group, rank, world, capacity, hidden, top_k, dtype, device)
                      for _ in range(2)]
        self.next_slot = 0
        self.epoch = torch.zeros(1, dtype=torch.int32, device=device)
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self.status_host = torch.zeros(1, dtype=torch.int32).pin_memory()
        self.side = torch.cuda.Stream(device=device)
        self.order = StreamOrder()
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every rank's flags are zero before anyone signals


_WORKSPACES: dict = {}


class NVLinkTransport:
    """The steps of ``all_to_all.AllToAllTransport`` over symmetric memory. It does not
    carry the protocol's header yet (``header_rows = 0``): the layer's identity and call
    count are not checked on this transport, and ``timeout`` is not used (the waits are
    bounded by ``max_polls``)."""
    name = "nvlink"
    header_rows = 0

    def __init__(self, group, rank: int, world_size: int, capacity: int, hidden: int,
                 top_k: int, dtype, device, max_polls: int = DEFAULT_MAX_POLLS,
                 timeout: float | None = None):
        key = (group.group_name, world_size, rank, capacity, hidden, top_k, dtype,
               torch.device(device))
        if key not in _WORKSPACES:
            _WORKSPACES[key] = _Workspace(group, rank, world_size, capacity, hidden, top_k,
                                          dtype, device)
        self.workspace = _WORKSPACES[key]
        self.group, self.rank, self.world_size = group, rank, world_size
        self.capacity, self.max_polls = capacity, max_polls
        self.timeout = timeout
        self.order = self.workspace.order
        self.slot = None

    def begin(self, call=None) -> None:
        """Raise if a wait of an earlier forward timed out; bump the epoch; take a slot."""
        ws = self.workspace
        silent = int(ws.status_host[0])
        if silent:
            raise RuntimeError(
                f"ExpertParallelMoE (nvlink): rank {self.rank} timed out waiting for rank "
                f"{silent - 1} in an earlier forward; that rank failed or stopped calling "
                f"the layer, and the results since are invalid")
        self.slot = ws.slots[ws.next_slot]
        ws.next_slot ^= 1
        bump_epoch_kernel[(1,)](ws.epoch)

    def send_buffers(self, rows, hidden, top_k, dtype, device):
        return self.slot.send_x, self.slot.send_ids, self.slot.send_weights

    def _push(self, which: str, flag_row: int, source: torch.Tensor, filled_rows: list[int],
              meta: bool):
        """Block d of ``source`` (its first filled_rows[d] rows) into rank d's
        ``which[rank]`` on the side stream, then rank d's flag; this rank's own block
        locally, on the main stream. With ``meta`` the ids and weights travel too."""
        ws, slot = self.workspace, self.slot
        ws.side.wait_stream(torch.cuda.current_stream())
        source.record_stream(ws.side)
        with torch.cuda.stream(ws.side):
            for peer, bufs in slot.peers.items():
                self._copy_block(bufs, which, source, peer, filled_rows[peer], meta)
                put_flag_kernel[(1,)](ws.epoch, bufs["flags"][flag_row, self.rank:self.rank + 1])
        self._copy_block(slot.local, which, source, self.rank, filled_rows[self.rank], meta)

    def _copy_block(self, dest_bufs, which, source, block, rows, meta):
        C, slot = self.capacity, self.slot
        if rows:
            dest_bufs[which][self.rank, :rows].copy_(source[block * C:block * C + rows])
        if meta:
            dest_bufs["recv_ids"][self.rank].copy_(slot.send_ids[block * C:(block + 1) * C])
            dest_bufs["recv_weights"][self.rank].copy_(slot.send_weights[block * C:(block + 1) * C])

    def _wait(self, flag_row: int, stage: str):
        ws = self.workspace
        with stage_range(stage):
            wait_flags_kernel[(1,)](ws.epoch, self.slot.local["flags"][flag_row], ws.status,
                                    self.rank, self.max_polls, WORLD=self.world_size)

    def dispatch(self, send_x, send_ids, send_weights, send_rows, recv_rows, filled_rows,
                 call=None):
        with stage_range("dispatch"):
            self._push("recv_x", 0, send_x, filled_rows, meta=True)

    def receive(self, pending, call=None):
        self._wait(0, "dispatch_wait")
        local, rows = self.slot.local, self.world_size * self.capacity
        return (local["recv_x"].view(rows, -1), local["recv_ids"].view(rows, -1),
                local["recv_weights"].view(rows, -1))

    def send_back(self, partials, send_rows, recv_rows, filled_rows, call=None):
        with stage_range("combine"):
            self._push("back", 1, partials, filled_rows, meta=False)

    def receive_back(self, pending, call=None) -> torch.Tensor:
        self._wait(1, "combine_wait")
        return self.slot.local["back"].view(self.world_size * self.capacity, -1)

    def end(self, call=None) -> None:
        """Join the side stream; record the time-out status for the next ``begin``."""
        ws = self.workspace
        torch.cuda.current_stream().wait_stream(ws.side)
        ws.status_host.copy_(ws.status, non_blocking=True)

    def abort(self, call, hidden, top_k, dtype, device) -> None:
        """After a failure inside a forward: join the side stream (the peers are not told
        on this transport: their waits end at ``max_polls``)."""
        torch.cuda.current_stream().wait_stream(self.workspace.side)

    def reset(self) -> None:
        """Forget an earlier time-out (the flags' epochs are not realigned)."""
        self.workspace.status.zero_()
        self.workspace.status_host.zero_()


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
        try:
            import torch.distributed._symmetric_memory  # noqa: F401
        except ImportError:
            ok = False
    votes = [None] * len(gathered)
    dist.all_gather_object(votes, ok, group=group)
    return all(votes)
