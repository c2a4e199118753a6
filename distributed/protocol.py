"""The protocol between the ranks of one ``ExpertParallelMoE``: what every message carries,
who checks what, and what a failure does on each side.

Identity and sequence
    Every layer has an id agreed by all ranks when it is built (collectively), and a
    64-bit call count in device memory (``state[COUNT]``) that each forward bumps on the
    device, so that a CUDA-graph replay sends the replay's count. The count never wraps:
    at 2**63 - 1 the layer stops (``EXHAUSTED``) until ``reset()``.

Header (four int64 words, on every message of both transports)
    [MAGIC, layer id, call count, sender status]
    ``all_to_all``: in ``header_rows`` extra rows at the end of each block of the dispatch
    and of the partial sums sent back (the rows' ids are -1, so the expert kernels skip
    them), and, without ``max_tokens_per_rank``, in the count exchange that precedes them.
    ``nvlink``: in a slot beside each flag, written before the flag is raised.

Sender status (header word 3)
    OK, INPUT (this rank rejected its input: it takes part with no tokens), FAILED (it
    raised inside the forward and finishes the exchanges with empty data), TIMED_OUT (a
    wait of this forward timed out), BROKEN (its copy of the layer failed in an earlier
    call and waits for ``reset()``), PENDING (count exchange only: it holds an error of an
    earlier call not yet raised).

Receiver checks (``check_headers_kernel``, on the device, no host sync)
    each peer's header must carry MAGIC, this layer's id, exactly this call's count and
    status OK (the dispatch's headers are checked in the launch that stamps the answer's:
    three small launches per forward in all). The first failure is recorded in ``state`` (what, which peer, both sides'
    layer and count, the phase) and poisons this forward: the combine writes NaN.
    Failures from another layer or count, a missing header, an exhausted counter, a time-
    out or a broken transport are *sticky*: every later forward is poisoned (and tells
    the peers BROKEN) until ``reset()``. A peer's INPUT or FAILED poisons only its call.

Who raises, where, when (every detected failure is seen by every rank in the same
exchange: mismatches are symmetric and a failing rank tells all its peers)
    * the count exchange (no ``max_tokens_per_rank``; the host waits for it anyway): every
      rank raises right there, before any token moves, when any header is wrong or any
      rank reports INPUT, BROKEN or PENDING;
    * CPU tensors: every rank reads the state after the forward and raises at once;
    * CUDA with ``max_tokens_per_rank`` (no host sync, CUDA graphs): nothing raises on
      the host; the output is NaN and ``layer.check()`` raises with the reason. Without
      ``max_tokens_per_rank`` the next forward's count exchange raises it on every rank.
    A rank never stops halfway: whatever fails, it finishes the forward's exchanges
    carrying its status, so the sequence of collectives stays aligned on every rank.
    The rank whose input or code failed raises its own exception; the others raise
    ``ExpertParallelError`` naming it. A reported transient error is cleared.

The ``nvlink`` transport writes the same header into a slot beside each flag it raises
(``nvlink``) and checks it in the flag wait, with the same verdicts; its flag waits
(exact 64-bit epochs, a time-out on the GPU clock, a failure flag value) record their own
failures in the same state, as sticky failures of the workspace. The layers of one shape
share a workspace: the first sticky failure is also copied into the workspace's record,
and every later forward of another layer on it records SHARED, whose message quotes that
record (so every poisoned forward's ``check()`` raises with the cause).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAGIC = 0x54_4D_6F_45_50_31  # "TMoEP1": a header, not leftover data
INT64_MAX = 2**63 - 1
HEADER_WORDS = 4  # magic, layer id, call count, sender status

# Sender status (header word 3).
OK, INPUT, FAILED, TIMED_OUT, BROKEN, PENDING = range(6)
STATUS_NAMES = {OK: "ok", INPUT: "rejected its input", FAILED: "raised inside the forward",
                TIMED_OUT: "timed out waiting for a peer", BROKEN: "has failed (in this call or an "
                "earlier one) and waits for reset()", PENDING: "reports a failure of an earlier call"}

# What the record in the state says happened (state[CODE]).
NONE, OTHER_LAYER, OTHER_CALL, NO_HEADER, PEER_STATUS, EXHAUSTED, TIMEOUT, TRANSPORT = range(8)
OTHER_EPOCH = 8  # nvlink: a peer's flag is from a later exchange of the shared workspace
RAISED = 9  # nvlink: this rank raised inside a forward; its workspace failed
SHARED = 10  # nvlink: the workspace failed in a forward of another layer sharing it
OVERFLOW = 11  # nvlink: a peer's receive buffer had no room left for this rank's rows

# The state: int64 words in device memory, one tensor per layer.
COUNT, POISON, CODE, PEER, CALL, GOT_LAYER, GOT_COUNT, GOT_STATUS, PHASE, STICKY, EPOCH = range(11)
STATE_WORDS = 11
# nvlink: the workspace's failure record, the state of the forward that failed it first
# followed by that layer's id.
RECORD_LAYER = STATE_WORDS
RECORD_WORDS = STATE_WORDS + 1
FLAG_FAILED = -1  # nvlink: the flag value of a rank whose workspace failed

# Phases (state[PHASE]).
COUNTS, DISPATCH, COMBINE = range(3)
PHASE_NAMES = {COUNTS: "count exchange", DISPATCH: "dispatch", COMBINE: "combine"}


class ExpertParallelError(RuntimeError):
    """A forward of an ``ExpertParallelMoE`` failed on some rank; raised on every rank."""


class ExpertParallelTimeout(ExpertParallelError, TimeoutError):
    """A wait of an ``ExpertParallelMoE`` forward exceeded the layer's time-out."""


def new_state(device) -> torch.Tensor:
    return torch.zeros(STATE_WORDS, dtype=torch.int64, device=device)


def header_rows(hidden: int, dtype: torch.dtype) -> int:
    """Rows of a block that hold its header (the header is read as int64 words)."""
    row_bytes = hidden * torch.empty((), dtype=dtype).element_size()
    if row_bytes % 8:
        raise ValueError(f"hidden_size * itemsize must be a multiple of 8 bytes for the "
                         f"all_to_all transport's headers, got {row_bytes}")
    return -(-HEADER_WORDS * 8 // row_bytes)


@dataclass
class Call:
    """One forward on one rank, as the protocol sees it."""
    layer_id: int
    state: torch.Tensor
    fixed: bool
    status: int = OK  # what this rank tells its peers, besides the state's stickiness
    stamped: bool = False  # the count of this call is bumped
    done: list = field(default_factory=list)  # exchanges issued: "counts", "dispatch", "back"
    everyone_raised: bool = False  # the count exchange made every rank raise: nothing left
    send_rows: list | None = None
    recv_rows: list | None = None
    send_counts: torch.Tensor | None = None  # int64 [W], device: tokens per send block
    recv_counts: torch.Tensor | None = None  # int64 [W], device: tokens per receive block
    counts_pending: object = None  # the count exchange in flight (transport's)
    shapes: tuple | None = None  # (hidden, top_k, dtype, device) of a failed call's blocks
    received: torch.Tensor | None = None  # the dispatch's rows, headers checked at send-back


def is_sticky(values: list[int]) -> bool:
    return bool(values[STICKY])


def describe(values: list[int], layer_id: int, rank: int, record: list[int] | None = None
             ) -> str:
    """The reason recorded in a state (as a list of ints), naming both sides; ``record``:
    the failure record of the layer's NVLink workspace (for SHARED)."""
    code, peer, call, phase = values[CODE], values[PEER], values[CALL], values[PHASE]
    here = f"rank {rank} ran call {call} of layer {layer_id}"
    where = PHASE_NAMES.get(phase, "exchange")
    if code == OTHER_LAYER:
        return (f"{here} while rank {peer} ran call {values[GOT_COUNT]} of layer "
                f"{values[GOT_LAYER]} ({where}): the ranks called the layers in different "
                f"orders, or one rank skipped or added a call")
    if code == OTHER_CALL:
        return (f"{here} while rank {peer} ran call {values[GOT_COUNT]} of it ({where}): "
                f"one rank skipped or added a call of this layer")
    if code == NO_HEADER:
        return (f"{here}; the {where} message from rank {peer} carries no header: the ranks "
                f"disagree on the sequence of collectives")
    if code == PEER_STATUS:
        status = values[GOT_STATUS]
        what = STATUS_NAMES.get(status, f"reported status {status}")
        if status == PENDING:
            return f"{here}; rank {peer} {what} ({where}; see the error raised there)"
        return (f"{here}; rank {peer} {what}" + ("" if status == BROKEN else " in that call")
                + f" ({where})"
                + (" (see the error raised there)" if status in (INPUT, FAILED) else ""))
    if code == EXHAUSTED:
        return f"the call count of layer {layer_id} on rank {rank} reached 2**63 - 1"
    if code == TIMEOUT:
        late = f"rank {peer}" if peer >= 0 else "a peer"
        return f"{here} and timed out waiting for {late} in the {where}; it is late or stopped"
    if code == OTHER_EPOCH:
        return (f"{here}, exchange {values[EPOCH]} of its NVLink workspace, while rank {peer} "
                f"already signalled exchange {values[GOT_COUNT]} ({where}): the ranks called "
                f"the layers sharing the workspace (one shape) differently")
    if code == RAISED:
        return f"rank {rank} raised inside call {call} of layer {layer_id}; its NVLink workspace failed"
    if code == SHARED:
        cause = (describe(record[:STATE_WORDS], record[RECORD_LAYER], rank)
                 if record and record[CODE] and record[CODE] != SHARED else "not recorded")
        return (f"{here}; the NVLink workspace it shares with the layers of its shape had "
                f"failed in another layer's forward: {cause}")
    if code == OVERFLOW:
        return (f"{here}; rank {peer}'s receive buffer had no room left for this rank's rows "
                f"({where}): rows of a failed or late forward were still there, the ranks "
                f"are out of step")
    if code == TRANSPORT:
        return f"{here}; the process group failed during the {where}"
    return f"{here}; unknown failure code {code}"


def failure(values: list[int], layer_id: int, rank: int, sticky_note: bool = True,
            record: list[int] | None = None) -> ExpertParallelError:
    """The exception for a recorded failure (``record``: as in ``describe``)."""
    message = f"ExpertParallelMoE: {describe(values, layer_id, rank, record)}"
    if is_sticky(values) and sticky_note:
        message += ("; the layer stays failed (NaN outputs) until layer.reset() is called "
                    "on every rank")
    kind = ExpertParallelTimeout if values[CODE] == TIMEOUT else ExpertParallelError
    return kind(message)


def record_local(state: torch.Tensor, code: int, call: int, phase: int) -> None:
    """Record a failure seen by this rank's host (a time-out, a backend error): sticky."""
    values = state.tolist()
    if not values[CODE] or not values[STICKY]:
        state[CODE], state[PEER], state[CALL], state[PHASE] = code, -1, call, phase
    state[POISON], state[STICKY] = 1, 1


def clear_reported(state: torch.Tensor) -> None:
    """Forget a transient failure once it has been raised (a sticky one stays)."""
    if not int(state[STICKY]):
        state[CODE:] = 0
