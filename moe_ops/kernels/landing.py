"""Rows that land while a kernel runs: other GPUs store token rows into this GPU's memory
(the expert-parallel dispatch over NVLink) and raise one flag per source when all of
theirs are there. A grouped-GEMM tile that gathers rows waits, before its first load,
for the flag of every source that wrote one of its rows (``wait_landed``), so that the
GEMM can start before the last row has arrived.

    row_source [R] int32   the source whose store filled row r (rows of every tile are
                           masked or filled; others are not read)
    flags [S] int64        flags[s] == epoch once all of source s's rows are here (the
                           writer's release, system scope); anything else: not yet, or
                           failed (negative), or out of step (> epoch)
    epoch [1] int64        the value of this exchange
    late [1] int64         set to epoch by the first tile that stops waiting (a flag
                           failed, or ``timeout_ticks`` of the device clock passed): the
                           other tiles then stop at once, and whoever reads ``late``
                           afterwards (the transport) fails the exchange before a
                           result leaves the GPU
    stop [1] int64         nonzero: the exchange has already failed; no tile waits

``device_clock`` is the constant-rate clock those bounds are measured in.
"""
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda
from triton.language.extra import hip as tl_hip

# Device clock rate by backend (index: is it AMD's HIP?).
CLOCK_TICKS_PER_S = {False: 1e9, True: 1e8}


@triton.jit
def device_clock(HIP: tl.constexpr):
    """The GPU's constant-rate clock, from Triton's own per-backend helpers (this project
    writes no inline assembly): nanoseconds on NVIDIA (%globaltimer), ticks of
    ``CLOCK_TICKS_PER_S[HIP]`` on AMD (s_memrealtime, 100 MHz)."""
    if HIP:
        return tl_hip.memrealtime()
    else:
        return tl_cuda.globaltimer()


@triton.jit
def wait_landed(rows, row_mask, row_source_ptr, flags_ptr, epoch_ptr, late_ptr, stop_ptr,
                timeout_ticks, NUM_SOURCES: tl.constexpr, HIP: tl.constexpr):
    """Return once every source of the tile's rows (int64 [BLOCK_M], masked by row_mask)
    has raised its flag for this epoch (acquire, system scope: its stores are visible
    after), or once waiting has been given up (``late``); see the module docstring.
    NUM_SOURCES: a power of two, at least the number of flags. The flags of the sources
    needed are read at once (one vector of acquiring loads); a tile spins only on the
    ones not raised yet."""
    sources = tl.load(row_source_ptr + rows, mask=row_mask, other=-1)
    offs_s = tl.arange(0, NUM_SOURCES)
    needed = tl.max((sources[:, None] == offs_s[None, :]).to(tl.int32), axis=0) > 0
    epoch = tl.load(epoch_ptr)
    seen = tl.atomic_add(flags_ptr + offs_s, tl.zeros([NUM_SOURCES], tl.int64), mask=needed,
                         sem="acquire", scope="sys")
    missing = needed & (seen != epoch)
    if tl.max(missing.to(tl.int32), axis=0) > 0:
        for source in tl.static_range(NUM_SOURCES):
            if tl.max((missing & (offs_s == source)).to(tl.int32), axis=0) > 0:
                _wait_flag(flags_ptr + source, epoch, late_ptr, stop_ptr, timeout_ticks, HIP)


@triton.jit
def _go_on(late_ptr, stop_ptr, epoch):
    """Whether waiting is still wanted: no tile gave up, the exchange has not failed."""
    return ((tl.load(late_ptr, volatile=True) != epoch)
            & (tl.load(stop_ptr, volatile=True) == 0))


@triton.jit
def _wait_flag(flag_ptr, epoch, late_ptr, stop_ptr, timeout_ticks, HIP: tl.constexpr):
    """Spin until the flag holds epoch; if it fails, runs ahead, or the bound passes
    (or another tile gave up, or the exchange failed), set late to epoch instead."""
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    if (seen >= 0) & (seen < epoch) & _go_on(late_ptr, stop_ptr, epoch):
        start = device_clock(HIP)
        waiting = seen < epoch
        while waiting:
            seen = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
            waiting = ((seen >= 0) & (seen < epoch) & _go_on(late_ptr, stop_ptr, epoch)
                       & (device_clock(HIP) - start < timeout_ticks))
    if seen != epoch:
        tl.store(late_ptr, epoch)
