"""Triton kernels of the expert-parallel layer.

``plan_pack_kernel`` (one program): the dispatch plan of topk_ids [T, K] over W ranks
of E_l experts each, with PACK also packed into send blocks. Block d starts at ``off_d``
(d * block_rows when FIXED, else after block d-1's tokens and HEADER_ROWS header rows);
the tokens that need rank d fill it in order (a block's header rows follow its tokens)::

    counts [W]          tokens sent to rank d
    rows [W, T]         off_d + position of token t in block d, -1 if d owns none of its ids;
                        with RESERVE off_d is reserved in rank d's receive buffer: an atomic
                        add of counts[d] to the int32 fill counter at fill_addrs[d] (d's
                        memory, system scope) returns it; a block that would end past
                        rows_limit is not sent (rows -1) and the layer state records
                        OVERFLOW (sticky, poisoned)
    BUMP (nvlink) first of all: the workspace's epoch += 1 and the layer's call count
    (``_bump_epoch``; the flags this forward raises carry the new epoch)
    PACK only, over the R = total_rows rows of the send blocks:
    send_ids [R, K]     ids in d's numbering (-1 for other ranks' experts; -1 on unused rows)
    send_weights [R, K] the token's weights;  src_token [R]: the token of each row, or -1

``gather_rows_kernel``: out[r, :] = x[src_token[r], :] for every row r < num_rows with a
token; grid (cdiv(num_rows, BLOCK_R), cdiv(H, BLOCK_H)).

``combine_partials_kernel`` (every transport, also under the interpreter): each token's
output is the sum of the partial rows its expert owners (this rank included) sent back,
plus the shared expert, in float32, in a fixed order::

    out[t, :] = sum_d (rows[d, t] >= 0 ? back[rows[d, t], :] : 0) + shared[t, :]

    back  [R, H]   partial rows returned by the owner ranks, rank d's block first
    rows  [W, T]   int32: token t's row in back for owner d, -1 where d owns none of
                   t's experts
    PULL           (nvlink) back[rows[d, t]] is read from the address bases[d] (int64 [W]:
                   owner d's partial-sum buffer, mapped here, offset so that the plan's
                   rows land on this rank's block of it) instead of one local buffer
    grid  (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H))
    every output is NaN when the layer's state says this forward is poisoned

Header kernels of the protocol (``protocol``; one program each, no host sync). The header
of block d sits at row ``d * block_rows + capacity`` when FIXED, else right after block d's
tokens (``counts[d]`` of them, blocks of ``counts[e] + HEADER_ROWS`` rows in rank order);
``buf`` is the block buffer viewed as int64 words, ``row_words`` per row::

    stamp_headers_kernel   [MAGIC, layer, count, status] into every block; with BUMP the
                           call count is bumped first (never past 2**63 - 1)
    check_headers_kernel   compare every peer's header with this call; record the first
                           failure in the state and poison the forward; with REPLY also
                           stamp the headers of the answer (same rows of ``reply``)

Signal kernels of the NVLink transport (GPU only). Flags and the 64-bit epoch live in
device memory so that a CUDA-graph replay signals the replay's epoch (bumped by the plan
kernel, BUMP):

    put_flag_kernel     the header [MAGIC, layer, count, status] into the peer's header
                        slot, then peer_flag <- epoch (or FLAG_FAILED), release at system
                        scope, after the data
    wait_flags_kernel   spin (acquire, system scope) until flags[src] == epoch exactly for
                        every peer src, bounded in seconds of the device clock, then check
                        src's header; record a failure in the layer state (a sticky one
                        also marks the workspace failed)
    push_rows_kernel    the dispatch: SM stores of each routed token's ids, weights and
                        source into its owners' memory, then every rank's header and ids
                        flag; then its rows, then every rank's rows flag
    release_back_kernel the filled recv_ids rows back to -1, then (last program) the fill
                        counter to 0 and every peer's second header and flag (a time-out
                        instead when a tile gave up waiting for landing rows)
"""
import triton
import triton.language as tl

from moe_ops.kernels.casting import cast_rne
from moe_ops.kernels.landing import device_clock

from . import protocol as P

# The protocol's numbers, as constants Triton can read.
_MAGIC: tl.constexpr = tl.constexpr(P.MAGIC)
_INT64_MAX: tl.constexpr = tl.constexpr(P.INT64_MAX)
_COUNT: tl.constexpr = tl.constexpr(P.COUNT)
_POISON: tl.constexpr = tl.constexpr(P.POISON)
_CODE: tl.constexpr = tl.constexpr(P.CODE)
_PEER: tl.constexpr = tl.constexpr(P.PEER)
_CALL: tl.constexpr = tl.constexpr(P.CALL)
_GOT_LAYER: tl.constexpr = tl.constexpr(P.GOT_LAYER)
_GOT_COUNT: tl.constexpr = tl.constexpr(P.GOT_COUNT)
_GOT_STATUS: tl.constexpr = tl.constexpr(P.GOT_STATUS)
_PHASE: tl.constexpr = tl.constexpr(P.PHASE)
_STICKY: tl.constexpr = tl.constexpr(P.STICKY)
_OK: tl.constexpr = tl.constexpr(P.OK)
_INPUT: tl.constexpr = tl.constexpr(P.INPUT)
_FAILED: tl.constexpr = tl.constexpr(P.FAILED)
_TIMED_OUT: tl.constexpr = tl.constexpr(P.TIMED_OUT)
_PENDING: tl.constexpr = tl.constexpr(P.PENDING)
_BROKEN: tl.constexpr = tl.constexpr(P.BROKEN)
_NONE: tl.constexpr = tl.constexpr(P.NONE)
_OTHER_LAYER: tl.constexpr = tl.constexpr(P.OTHER_LAYER)
_OTHER_CALL: tl.constexpr = tl.constexpr(P.OTHER_CALL)
_NO_HEADER: tl.constexpr = tl.constexpr(P.NO_HEADER)
_PEER_STATUS: tl.constexpr = tl.constexpr(P.PEER_STATUS)
_EXHAUSTED: tl.constexpr = tl.constexpr(P.EXHAUSTED)
_TIMEOUT: tl.constexpr = tl.constexpr(P.TIMEOUT)
_OTHER_EPOCH: tl.constexpr = tl.constexpr(P.OTHER_EPOCH)
_EPOCH: tl.constexpr = tl.constexpr(P.EPOCH)
_SHARED: tl.constexpr = tl.constexpr(P.SHARED)
_OVERFLOW: tl.constexpr = tl.constexpr(P.OVERFLOW)
_DISPATCH: tl.constexpr = tl.constexpr(P.DISPATCH)
_STATE_WORDS: tl.constexpr = tl.constexpr(P.STATE_WORDS)
_FLAG_FAILED: tl.constexpr = tl.constexpr(P.FLAG_FAILED)
_HEADER_WORDS: tl.constexpr = tl.constexpr(P.HEADER_WORDS)


@triton.jit
def _needs_rank(owned, mask):
    """int32 [BLOCK_T]: 1 where a token has an expert on the rank (owned [BLOCK_T, K_PAD])."""
    return tl.max((owned & mask).to(tl.int32), axis=1)


@triton.jit
def plan_pack_kernel(
    topk_ids_ptr, topk_weights_ptr, counts_ptr, rows_ptr, send_ids_ptr,
    send_weights_ptr, src_token_ptr, num_tokens, block_rows, experts_per_rank,
    total_rows, fill_addrs, rows_limit, state_ptr, epoch_ptr, failed_ptr,
    WORLD: tl.constexpr, W_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
    FIXED: tl.constexpr, HEADER_ROWS: tl.constexpr, PACK: tl.constexpr,
    RESERVE: tl.constexpr, BUMP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    if BUMP:  # a new forward of the nvlink workspace, first of all (``_bump_epoch``)
        _bump_epoch(epoch_ptr, failed_ptr, state_ptr)
    offs_k = tl.arange(0, K_PAD)
    offs_w = tl.arange(0, W_PAD)
    k_mask = offs_k < TOP_K
    if PACK:  # unused rows: no token, ids -1 (overwritten below for the rows in use)
        for r0 in range(0, total_rows, BLOCK_T):
            offs_r = r0 + tl.arange(0, BLOCK_T)
            r_mask = offs_r < total_rows
            tl.store(src_token_ptr + offs_r, tl.full([BLOCK_T], -1, tl.int32), mask=r_mask)
            tl.store(send_ids_ptr + offs_r[:, None] * TOP_K + offs_k[None, :],
                     tl.full([BLOCK_T, K_PAD], -1, tl.int32),
                     mask=r_mask[:, None] & k_mask[None, :])
        tl.debug_barrier()

    totals = tl.zeros([W_PAD], dtype=tl.int32)
    if RESERVE or not FIXED:  # first pass: block sizes, for the offsets
        for t0 in range(0, num_tokens, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < num_tokens)[:, None] & k_mask[None, :]
            ids = tl.load(topk_ids_ptr + offs_t[:, None] * TOP_K + offs_k[None, :], mask=mask, other=-1)
            owner = tl.where(ids >= 0, ids // experts_per_rank, -1)
            for d in tl.static_range(WORLD):
                need = _needs_rank(owner == d, mask)
                totals += tl.where(offs_w == d, tl.sum(need, axis=0), 0)

    reserved = tl.zeros([W_PAD], dtype=tl.int32)
    if RESERVE:
        full = -1  # the first destination without room, if any
        for d in tl.static_range(WORLD):
            fill = tl.load(fill_addrs + d).to(tl.pointer_type(tl.int32))
            size = tl.sum(tl.where(offs_w == d, totals, 0), axis=0)
            start = tl.atomic_add(fill, size, sem="relaxed", scope="sys")
            fits = start + size <= rows_limit
            reserved += tl.where(offs_w == d, tl.where(fits, start, -1), 0)
            full = tl.where((full < 0) & (fits == 0), d, full)
        if full >= 0:
            _record_sticky(state_ptr, _OVERFLOW, full, _DISPATCH)
    running = tl.zeros([W_PAD], dtype=tl.int32)
    for t0 in range(0, num_tokens, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < num_tokens
        mask = t_mask[:, None] & k_mask[None, :]
        slot = offs_t[:, None] * TOP_K + offs_k[None, :]
        ids = tl.load(topk_ids_ptr + slot, mask=mask, other=-1)
        weights = tl.load(topk_weights_ptr + slot, mask=mask, other=0.0)
        owner = tl.where(ids >= 0, ids // experts_per_rank, -1)
        for d in tl.static_range(WORLD):
            owned = (owner == d) & mask
            need = _needs_rank(owned, mask)
            if RESERVE:
                first = tl.sum(tl.where(offs_w == d, reserved, 0), axis=0)
            elif FIXED:
                first = d * block_rows
            else:
                first = tl.sum(tl.where(offs_w < d, totals, 0), axis=0) + d * HEADER_ROWS
            base = first + tl.sum(tl.where(offs_w == d, running, 0), axis=0)
            row = base + tl.cumsum(need, axis=0) - need
            needed = need > 0
            if RESERVE:
                needed = needed & (first >= 0)  # no room there: not sent
            tl.store(rows_ptr + d * num_tokens + offs_t, tl.where(needed, row, -1), mask=t_mask)
            if PACK:
                tl.store(src_token_ptr + row, offs_t, mask=needed)
                send_mask = needed[:, None] & k_mask[None, :]
                tl.store(send_ids_ptr + row[:, None] * TOP_K + offs_k[None, :],
                         tl.where(owned, ids - d * experts_per_rank, -1), mask=send_mask)
                tl.store(send_weights_ptr + row[:, None] * TOP_K + offs_k[None, :], weights,
                         mask=send_mask)
            running += tl.where(offs_w == d, tl.sum(need, axis=0), 0)
    tl.store(counts_ptr + offs_w, running, mask=offs_w < WORLD)


@triton.jit
def _record_sticky(state_ptr, code, peer, phase):
    """Record ``code`` at ``peer`` in ``phase`` in the layer state (unless a sticky failure
    is already recorded): sticky, the forward poisoned."""
    recorded = tl.load(state_ptr + _CODE)
    take = (recorded == _NONE) | (tl.load(state_ptr + _STICKY) == 0)
    tl.store(state_ptr + _CODE, tl.where(take, code, recorded))
    tl.store(state_ptr + _PEER, tl.where(take, peer, tl.load(state_ptr + _PEER)))
    tl.store(state_ptr + _CALL, tl.where(take, tl.load(state_ptr + _COUNT),
                                         tl.load(state_ptr + _CALL)))
    tl.store(state_ptr + _PHASE, tl.where(take, phase, tl.load(state_ptr + _PHASE)))
    tl.store(state_ptr + _STICKY, 1)
    tl.store(state_ptr + _POISON, 1)


@triton.jit
def _fail_workspace(failed_ptr, record_ptr, state_ptr, layer_id):
    """Fail the nvlink workspace (failed <- 1) and, if it holds no record yet, copy the
    layer state and layer_id into its record [RECORD_WORDS]."""
    tl.store(failed_ptr, 1)
    if tl.load(record_ptr + _CODE) == 0:
        for word in tl.static_range(_STATE_WORDS):
            tl.store(record_ptr + word, tl.load(state_ptr + word))
        tl.store(record_ptr + _STATE_WORDS, tl.full([], layer_id, tl.int64))


@triton.jit
def gather_rows_kernel(x_ptr, src_token_ptr, out_ptr, num_rows, hidden,
                       BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    src = tl.load(src_token_ptr + offs_r, mask=offs_r < num_rows, other=-1)
    mask = (src >= 0)[:, None] & (offs_h < hidden)[None, :]
    rows = tl.load(x_ptr + src[:, None].to(tl.int64) * hidden + offs_h[None, :], mask=mask)
    tl.store(out_ptr + offs_r[:, None].to(tl.int64) * hidden + offs_h[None, :], rows, mask=mask)


@triton.jit
def combine_partials_kernel(
    back_ptr, bases_ptr, rows_ptr, shared_ptr, state_ptr, out_ptr, num_tokens,
    hidden, WORLD: tl.constexpr, HAS_SHARED: tl.constexpr,
    PULL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = offs_t < num_tokens
    mask = token_mask[:, None] & (offs_h[None, :] < hidden)
    token_offsets = offs_t[:, None].to(tl.int64) * hidden + offs_h[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for owner in tl.static_range(WORLD):
        rows = tl.load(rows_ptr + owner * num_tokens + offs_t, mask=token_mask, other=-1)
        source = back_ptr
        if PULL:  # rank owner's own buffer, mapped here (its address as an int64)
            source = tl.load(bases_ptr + owner).to(tl.pointer_type(back_ptr.dtype.element_ty))
        part = tl.load(source + rows[:, None].to(tl.int64) * hidden + offs_h[None, :],
                       mask=mask & (rows >= 0)[:, None], other=0.0)
        acc += part.to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + token_offsets, mask=mask, other=0.0).to(tl.float32)
    acc = tl.where(tl.load(state_ptr + _POISON) != 0, float("nan"), acc)
    tl.store(out_ptr + token_offsets, cast_rne(acc, out_ptr.dtype.element_ty, INTERPRETER),
             mask=mask)


@triton.jit
def _header_row(d, counts_ptr, prefix, block_rows, capacity,
                HEADER_ROWS: tl.constexpr, FIXED: tl.constexpr):
    """(row of block d's header, prefix of the next block): see the module docstring."""
    if FIXED:
        row = d * block_rows + capacity
        following = prefix
    else:
        tokens = tl.load(counts_ptr + d)
        row = prefix + tokens
        following = row + HEADER_ROWS
    return row.to(tl.int64), following


@triton.jit
def stamp_headers_kernel(buf_ptr, counts_ptr, state_ptr, layer_id, status, row_words,
                         block_rows, capacity, WORLD: tl.constexpr, HEADER_ROWS: tl.constexpr,
                         FIXED: tl.constexpr, BUMP: tl.constexpr, REPORT_PENDING: tl.constexpr):
    count = tl.load(state_ptr + _COUNT)
    code = tl.load(state_ptr + _CODE)
    sticky = tl.load(state_ptr + _STICKY)
    if BUMP:  # a new call: its count, and it starts poisoned only if the layer is failed
        exhausted = count == _INT64_MAX
        count = tl.where(exhausted, count, count + 1)
        record = exhausted & ((code == 0) | (sticky == 0))
        code = tl.where(record, _EXHAUSTED, code)
        tl.store(state_ptr + _CODE, code)
        tl.store(state_ptr + _CALL, tl.where(record, count, tl.load(state_ptr + _CALL)))
        sticky = tl.where(exhausted, 1, sticky)
        tl.store(state_ptr + _COUNT, count)
        tl.store(state_ptr + _STICKY, sticky)
        tl.store(state_ptr + _POISON, sticky)
    send = tl.where(status != 0, status, tl.where(sticky != 0, _BROKEN, _OK))
    if REPORT_PENDING:
        send = tl.where((send == 0) & (code != 0), _PENDING, send)
    prefix = 0
    for d in tl.static_range(WORLD):
        row, prefix = _header_row(d, counts_ptr, prefix, block_rows, capacity, HEADER_ROWS, FIXED)
        header = buf_ptr + row * row_words
        tl.store(header + 0, tl.full([], _MAGIC, tl.int64))
        tl.store(header + 1, tl.full([], layer_id, tl.int64))
        tl.store(header + 2, count)
        tl.store(header + 3, send.to(tl.int64))


@triton.jit
def _header_verdict(magic, layer, count, their, layer_id, expected):
    """(failure code or _NONE, whether it is sticky) of one peer's header words against
    this call (layer_id, expected count): a peer's INPUT, FAILED or PENDING poisons only
    this call; anything else wrong leaves the layer failed until reset."""
    new = tl.where(magic != _MAGIC, _NO_HEADER,
                   tl.where(layer != layer_id, _OTHER_LAYER,
                            tl.where(count != expected, _OTHER_CALL,
                                     tl.where(their != _OK, _PEER_STATUS, _NONE))))
    transient = (new == _PEER_STATUS) & ((their == _INPUT) | (their == _FAILED)
                                          | (their == _PENDING))
    return new, (new != _NONE) & (transient == 0)


@triton.jit
def check_headers_kernel(buf_ptr, counts_ptr, state_ptr, layer_id, self_rank, row_words,
                         block_rows, capacity, phase, reply_ptr, status,
                         WORLD: tl.constexpr, HEADER_ROWS: tl.constexpr, FIXED: tl.constexpr,
                         REPLY: tl.constexpr):
    expected = tl.load(state_ptr + _COUNT)
    poison = tl.load(state_ptr + _POISON)
    code = tl.load(state_ptr + _CODE)
    sticky = tl.load(state_ptr + _STICKY)
    peer = tl.load(state_ptr + _PEER)
    call = tl.load(state_ptr + _CALL)
    got_layer = tl.load(state_ptr + _GOT_LAYER)
    got_count = tl.load(state_ptr + _GOT_COUNT)
    got_status = tl.load(state_ptr + _GOT_STATUS)
    at_phase = tl.load(state_ptr + _PHASE)
    prefix = 0
    for src in tl.static_range(WORLD):
        row, prefix = _header_row(src, counts_ptr, prefix, block_rows, capacity, HEADER_ROWS, FIXED)
        header = buf_ptr + row * row_words
        magic = tl.load(header + 0)
        layer = tl.load(header + 1)
        count = tl.load(header + 2)
        their = tl.load(header + 3)  # the peer's status (``status`` is this rank's own)
        new, new_sticky = _header_verdict(magic, layer, count, their, layer_id, expected)
        new = tl.where(self_rank == src, _NONE, new)
        new_sticky = new_sticky & (self_rank != src)
        take = (new != _NONE) & ((code == _NONE) | ((sticky == 0) & new_sticky))
        code = tl.where(take, new, code)
        peer = tl.where(take, src, peer)
        call = tl.where(take, expected, call)
        got_layer = tl.where(take, layer, got_layer)
        got_count = tl.where(take, count, got_count)
        got_status = tl.where(take, their, got_status)
        at_phase = tl.where(take, phase, at_phase)
        sticky = tl.where(new_sticky, 1, sticky)
        poison = tl.where(new != _NONE, 1, poison)
    if REPLY:  # stamp the answer's headers at the same rows of reply (after the check)
        send = tl.where(status != 0, status, tl.where(sticky != 0, _BROKEN, _OK))
        prefix = 0
        for dest in tl.static_range(WORLD):
            row, prefix = _header_row(dest, counts_ptr, prefix, block_rows, capacity,
                                      HEADER_ROWS, FIXED)
            header = reply_ptr + row * row_words
            tl.store(header + 0, tl.full([], _MAGIC, tl.int64))
            tl.store(header + 1, tl.full([], layer_id, tl.int64))
            tl.store(header + 2, expected)
            tl.store(header + 3, send.to(tl.int64))
    tl.store(state_ptr + _POISON, poison)
    tl.store(state_ptr + _CODE, code)
    tl.store(state_ptr + _STICKY, sticky)
    tl.store(state_ptr + _PEER, peer)
    tl.store(state_ptr + _CALL, call)
    tl.store(state_ptr + _GOT_LAYER, got_layer)
    tl.store(state_ptr + _GOT_COUNT, got_count)
    tl.store(state_ptr + _GOT_STATUS, got_status)
    tl.store(state_ptr + _PHASE, at_phase)


@triton.jit
def _bump_epoch(epoch_ptr, failed_ptr, state_ptr):
    """A new forward: the workspace's epoch and the layer's call count (never past
    2**63 - 1); the forward starts poisoned if the workspace or the layer failed, and a
    layer that had not failed records SHARED (the workspace failed in another layer)."""
    tl.store(epoch_ptr, tl.load(epoch_ptr) + 1)
    count = tl.load(state_ptr + _COUNT)
    code = tl.load(state_ptr + _CODE)
    sticky = tl.load(state_ptr + _STICKY)
    exhausted = count == _INT64_MAX
    count = tl.where(exhausted, count, count + 1)
    shared = (tl.load(failed_ptr) != 0) & (exhausted == 0)
    record = (exhausted | shared) & ((code == 0) | (sticky == 0))
    tl.store(state_ptr + _CODE, tl.where(record, tl.where(exhausted, _EXHAUSTED, _SHARED), code))
    tl.store(state_ptr + _CALL, tl.where(record, count, tl.load(state_ptr + _CALL)))
    sticky = tl.where(exhausted | shared, 1, sticky)
    tl.store(state_ptr + _COUNT, count)
    tl.store(state_ptr + _STICKY, sticky)
    tl.store(state_ptr + _POISON, sticky)


@triton.jit
def put_flag_kernel(epoch_ptr, failed_ptr, state_ptr, peer_header_ptr, peer_flag_ptr, layer_id,
                    status):
    """peer_header <- [MAGIC, layer_id, this call's count, status (BROKEN when the layer
    failed)], then peer_flag <- epoch (release, system scope, after the data and the
    header), or FLAG_FAILED when this rank's workspace failed: the peer's wait then ends
    at once."""
    _put_flag(epoch_ptr, failed_ptr, state_ptr, peer_header_ptr, peer_flag_ptr, layer_id,
              status)


@triton.jit
def _put_flag(epoch_ptr, failed_ptr, state_ptr, peer_header_ptr, peer_flag_ptr, layer_id,
              status):
    """``put_flag_kernel``'s body, for one program of any kernel."""
    sticky = tl.load(state_ptr + _STICKY)
    send = tl.where(status != 0, status, tl.where(sticky != 0, _BROKEN, _OK))
    tl.store(peer_header_ptr + 0, tl.full([], _MAGIC, tl.int64))
    tl.store(peer_header_ptr + 1, tl.full([], layer_id, tl.int64))
    tl.store(peer_header_ptr + 2, tl.load(state_ptr + _COUNT))
    tl.store(peer_header_ptr + 3, send.to(tl.int64))
    tl.debug_barrier()  # the header's stores before the releasing flag
    _raise_flag(epoch_ptr, failed_ptr, peer_flag_ptr)


@triton.jit
def _raise_flag(epoch_ptr, failed_ptr, flag_ptr):
    """flag <- epoch, or FLAG_FAILED when this rank's workspace failed (release, system
    scope: after every store the program's arrival made visible)."""
    value = tl.where(tl.load(failed_ptr) != 0, _FLAG_FAILED, tl.load(epoch_ptr))
    tl.atomic_xchg(flag_ptr, value, sem="release", scope="sys")


@triton.jit
def wait_flags_kernel(epoch_ptr, flags_ptr, headers_ptr, failed_ptr, record_ptr, state_ptr,
                      layer_id, self_rank, skip_rank, timeout_ticks, phase, WORLD: tl.constexpr,
                      HIP: tl.constexpr):
    """Spin (acquire, system scope) until flags[src] == epoch for every rank src but
    skip_rank (this rank, or -1: this rank's own flag too), then check each peer's header
    (headers [WORLD, HEADER_WORDS]) against this call as ``check_headers_kernel`` does.
    Ends early when the workspace already failed (a queued wait after a failure costs
    nothing) and on a peer's FLAG_FAILED, a flag from a later epoch (the ranks' calls
    differ) or timeout_ticks of the device clock
    (``landing.device_clock``). The layer's state records the first failure and poisons the
    forward; a sticky one (any but a peer's rejected input or exception) also fails the
    workspace (failed <- 1) and, the first time, is copied with layer_id into the
    workspace's record [RECORD_WORDS]."""
    epoch = tl.load(epoch_ptr)
    expected = tl.load(state_ptr + _COUNT)
    start = device_clock(HIP)
    for src in tl.static_range(WORLD):
        if src != skip_rank:
            seen = tl.atomic_add(flags_ptr + src, 0, sem="acquire", scope="sys")
            failed = tl.load(failed_ptr, volatile=True)
            waiting = (seen >= 0) & (seen < epoch) & (failed == 0)
            while waiting:
                seen = tl.atomic_add(flags_ptr + src, 0, sem="acquire", scope="sys")
                failed = tl.load(failed_ptr, volatile=True)
                waiting = ((seen >= 0) & (seen < epoch) & (failed == 0)
                           & (device_clock(HIP) - start < timeout_ticks))
            header = headers_ptr + src * _HEADER_WORDS
            layer = tl.load(header + 1, volatile=True)
            count = tl.load(header + 2, volatile=True)
            their = tl.load(header + 3, volatile=True)
            arrived = seen == epoch
            new, new_sticky = _header_verdict(tl.load(header + 0, volatile=True), layer, count,
                                              their, layer_id, expected)
            new = tl.where(src == self_rank, _NONE, new)  # this rank's own: only its flag
            new_sticky = new_sticky & (src != self_rank)
            flag_new = tl.where(seen == _FLAG_FAILED, _PEER_STATUS,
                                tl.where(seen > epoch, _OTHER_EPOCH, _TIMEOUT))
            new = tl.where(failed != 0, _NONE, tl.where(arrived, new, flag_new))
            new_sticky = (new != _NONE) & (new_sticky | (arrived == 0))
            code = tl.load(state_ptr + _CODE)
            take = (new != _NONE) & ((code == _NONE)
                                     | ((tl.load(state_ptr + _STICKY) == 0) & new_sticky))
            tl.store(state_ptr + _CODE, tl.where(take, new, code))
            tl.store(state_ptr + _PEER, tl.where(take, src, tl.load(state_ptr + _PEER)))
            tl.store(state_ptr + _CALL, tl.where(take, expected, tl.load(state_ptr + _CALL)))
            tl.store(state_ptr + _GOT_LAYER, tl.where(take & arrived, layer,
                                                      tl.load(state_ptr + _GOT_LAYER)))
            tl.store(state_ptr + _GOT_COUNT, tl.where(take, tl.where(arrived, count, seen),
                                                      tl.load(state_ptr + _GOT_COUNT)))
            tl.store(state_ptr + _GOT_STATUS, tl.where(take, tl.where(arrived, their, _BROKEN),
                                                       tl.load(state_ptr + _GOT_STATUS)))
            tl.store(state_ptr + _EPOCH, tl.where(take, epoch, tl.load(state_ptr + _EPOCH)))
            tl.store(state_ptr + _PHASE, tl.where(take, phase, tl.load(state_ptr + _PHASE)))
            tl.store(state_ptr + _STICKY, tl.where(new_sticky, 1, tl.load(state_ptr + _STICKY)))
            tl.store(state_ptr + _POISON, tl.where((new != _NONE) | (failed != 0), 1,
                                                   tl.load(state_ptr + _POISON)))
            if new_sticky:  # the ranks are out of step: the workspace fails
                _fail_workspace(failed_ptr, record_ptr, state_ptr, layer_id)
    tl.store(state_ptr + _POISON, tl.where(tl.load(failed_ptr, volatile=True) != 0, 1,
                                           tl.load(state_ptr + _POISON)))


@triton.jit
def _last_program(counter_ptr, programs):
    """True in the last of ``programs`` programs to get here (the others' stores are then
    visible to it, and through its releases to the peers); it re-arms the counter. An
    arrival counter in device memory, acquire-release at system scope."""
    tl.debug_barrier()  # every thread's stores before the program's arrival
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="sys")
    last = arrived == programs - 1
    if last:
        tl.store(counter_ptr, 0)
    return last


@triton.jit
def _peer_ptr(addrs_ptr, rank, like):
    """The int64 address addrs[rank] as a pointer to ``like``'s element type."""
    return tl.load(addrs_ptr + rank).to(tl.pointer_type(like.dtype.element_ty))


@triton.jit
def push_rows_kernel(
    x_ptr, topk_ids_ptr, topk_weights_ptr, rows_ptr, x_addrs, ids_addrs, weights_addrs,
    source_addrs, header_addrs, ids_flag_addrs, flag_addrs, counter_ptr, epoch_ptr, failed_ptr,
    state_ptr, layer_id, status, num_tokens, hidden, experts_per_rank, rank,
    WORLD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The nvlink dispatch, SM stores into every rank's symmetric memory: token t of x
    [T, H] goes to row p = rows[d, t] (the plan's, reserved in rank d's receive buffer;
    -1: not sent): x to row p of x_addrs[d] ([rows, H]), its K ids in d's numbering (-1
    for other ranks' experts) to row p of ids_addrs[d] ([rows, K] int32), its weights to
    weights_addrs[d] ([rows, K] fp32) and this rank's number to source_addrs[d] ([rows]
    int32), where ``*_addrs[d]`` are int64 addresses in rank d's memory (this rank's own
    included). In two stages, each ending in a flag per rank (this one's own included):
    the first program of each token block (pid 1 == 0) stores its ids, weights and
    sources first, and the last of those writes every rank's header and raises its ids
    flag (``_put_flag``; counter_ptr[0]); then every program stores its part of the rows,
    and the last program of the grid raises every rank's rows flag (counter_ptr[1]). A
    receiver can align its rows on the ids flags while the rows still land. Grid
    (max(1, cdiv(T, BLOCK_T)), cdiv(H, BLOCK_H))."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, K_PAD)
    t_mask = offs_t < num_tokens
    h_mask = offs_h < hidden
    if tl.program_id(1) == 0:
        meta_mask = t_mask[:, None] & (offs_k < TOP_K)[None, :]
        ids = tl.load(topk_ids_ptr + offs_t[:, None] * TOP_K + offs_k[None, :], mask=meta_mask,
                      other=-1)
        weights = tl.load(topk_weights_ptr + offs_t[:, None] * TOP_K + offs_k[None, :],
                          mask=meta_mask, other=0.0)
        for d in tl.static_range(WORLD):
            row = tl.load(rows_ptr + d * num_tokens + offs_t, mask=t_mask, other=-1)
            sent = row >= 0
            dest = row.to(tl.int64)
            meta = sent[:, None] & (offs_k < TOP_K)[None, :]
            owned = (ids >= 0) & (ids // experts_per_rank == d)
            tl.store(_peer_ptr(ids_addrs, d, topk_ids_ptr) + dest[:, None] * TOP_K
                     + offs_k[None, :], tl.where(owned, ids - d * experts_per_rank, -1), mask=meta)
            tl.store(_peer_ptr(weights_addrs, d, topk_weights_ptr) + dest[:, None] * TOP_K
                     + offs_k[None, :], weights, mask=meta)
            tl.store(_peer_ptr(source_addrs, d, rows_ptr) + dest,
                     tl.zeros([BLOCK_T], tl.int32) + rank, mask=sent)
        if _last_program(counter_ptr, tl.num_programs(0)):
            for d in tl.static_range(WORLD):
                _put_flag(epoch_ptr, failed_ptr, state_ptr,
                          _peer_ptr(header_addrs, d, header_addrs),
                          _peer_ptr(ids_flag_addrs, d, ids_flag_addrs), layer_id, status)
    x = tl.load(x_ptr + offs_t[:, None].to(tl.int64) * hidden + offs_h[None, :],
                mask=t_mask[:, None] & h_mask[None, :])
    for d in tl.static_range(WORLD):
        row = tl.load(rows_ptr + d * num_tokens + offs_t, mask=t_mask, other=-1)
        tl.store(_peer_ptr(x_addrs, d, x_ptr) + row.to(tl.int64)[:, None] * hidden
                 + offs_h[None, :], x, mask=(row >= 0)[:, None] & h_mask[None, :])
    if _last_program(counter_ptr + 1, tl.num_programs(0) * tl.num_programs(1)):
        for d in tl.static_range(WORLD):
            _raise_flag(epoch_ptr, failed_ptr, _peer_ptr(flag_addrs, d, flag_addrs))


@triton.jit
def release_back_kernel(recv_ids_ptr, fill_ptr, num_words, header_addrs, flag_addrs,
                        counter_ptr, epoch_ptr, failed_ptr, state_ptr, layer_id, status, rank,
                        late_ptr, record_ptr, WORLD: tl.constexpr, TOP_K: tl.constexpr,
                        LANDING: tl.constexpr, BLOCK: tl.constexpr):
    """The nvlink way back, once the partial sums are in ``back``: the filled rows of
    recv_ids (the first fill[0] rows of TOP_K int32, at most num_words words) back to -1
    (no token until a dispatch fills the row again); the last program then sets the fill
    counter to 0, writes every peer's second header and raises its second flag
    (``*_addrs[d]``: addresses in rank d's memory). With LANDING (the expert pipeline
    read rows as they landed, ``moe_ops.kernels.landing``) a tile that stopped waiting
    (late == epoch) fails the workspace before any peer reads a partial sum: a time-out
    recorded here (sticky) and told to the peers (status TIMED_OUT), unless a failure was
    already recorded, which stands (the peers then see BROKEN or FLAG_FAILED). Grid
    (cdiv(num_words, BLOCK), 1)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    used = tl.minimum(tl.load(fill_ptr) * TOP_K, num_words)
    if tl.program_id(0) * BLOCK < used:
        tl.store(recv_ids_ptr + offs, tl.full([BLOCK], -1, tl.int32), mask=offs < used)
    if _last_program(counter_ptr, tl.num_programs(0)):
        tl.store(fill_ptr, 0)
        send = tl.zeros([], tl.int32) + status
        if LANDING:
            late = tl.load(late_ptr) == tl.load(epoch_ptr)
            # A tile gave up: a time-out, unless a failure is already recorded (a peer's
            # failed flag, the ids wait's own time-out), which then stands.
            fresh = ((tl.load(state_ptr + _CODE) == _NONE)
                     | (tl.load(state_ptr + _STICKY) == 0))
            if late:
                _record_sticky(state_ptr, _TIMEOUT, -1, _DISPATCH)
                _fail_workspace(failed_ptr, record_ptr, state_ptr, layer_id)
            send = tl.where(late & fresh, _TIMED_OUT, send)
        for d in tl.static_range(WORLD):
            if d != rank:
                _put_flag(epoch_ptr, failed_ptr, state_ptr,
                          _peer_ptr(header_addrs, d, header_addrs),
                          _peer_ptr(flag_addrs, d, flag_addrs), layer_id, send)
