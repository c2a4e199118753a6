"""Triton kernels of the expert-parallel layer.

``plan_pack_kernel`` (one program): the dispatch plan of topk_ids [T, K] over W ranks
of E_l experts each, packed. Block d of the send buffer starts at ``off_d`` (d * capacity
when FIXED, else after block d-1's tokens); the tokens that need rank d fill it in order::

    counts [W]          tokens sent to rank d
    rows [W, T]         off_d + position of token t in block d, -1 if d owns none of its ids
    send_ids [R, K]     ids in d's numbering (-1 for other ranks' experts; -1 on unused rows)
    send_weights [R, K] the token's weights;  src_token [R]: the token of each row, or -1
    own_ids [T, K]      ids in this rank's numbering, or -1 (for in-place computation)

``gather_rows_kernel``: out[r, :] = x[src_token[r], :] for every row with a token;
grid (cdiv(R, BLOCK_R), cdiv(H, BLOCK_H)).

``combine_partials_kernel`` (every transport, also under the interpreter): each token's
output is the sum of the partial rows its expert owners sent back, plus the partial of
this rank's own experts and the shared expert, in float32, in a fixed order::

    out[t, :] = local[t, :] + sum_d (rows[d, t] >= 0 ? back[rows[d, t], :] : 0) + shared[t, :]

    back  [R, H]   partial rows returned by the owner ranks, rank d's block first
    rows  [W, T]   int32: token t's row in back for owner d, -1 where d owns none of
                   t's experts (or when t's own-rank partial is in ``local``)
    grid  (cdiv(T, BLOCK_T), cdiv(H, BLOCK_H))

Signal kernels of the NVLink transport (one program each; GPU only). Flags and the
epoch live in device memory so that a CUDA-graph replay signals the replay's epoch:

    bump_epoch_kernel   epoch += 1 (once per forward, before anything is sent)
    put_flag_kernel     peer_flag <- epoch, release at system scope, after the data
    wait_flags_kernel   spin (acquire, system scope) until flags[src] >= epoch for every
                        peer src, at most max_polls polls each; on time-out set status
"""
import triton
import triton.language as tl

from moe_ops.kernels.casting import cast_rne


@triton.jit
def _needs_rank(owned, mask, d, rank, SKIP_OWN: tl.constexpr):
    """int32 [BLOCK_T]: 1 where a token has an expert on rank d (owned [BLOCK_T, K_PAD]),
    0 for every token when d is this rank and SKIP_OWN."""
    need = tl.max((owned & mask).to(tl.int32), axis=1)
    if SKIP_OWN:
        if d == rank:  # rank may arrive as a constant (Triton specialises 1)
            need = need * 0
    return need


@triton.jit
def plan_pack_kernel(
    topk_ids_ptr, topk_weights_ptr, counts_ptr, own_ids_ptr, rows_ptr, send_ids_ptr,
    send_weights_ptr, src_token_ptr, num_tokens, capacity, experts_per_rank, rank, total_rows,
    WORLD: tl.constexpr, W_PAD: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
    FIXED: tl.constexpr, SKIP_OWN: tl.constexpr, BLOCK_T: tl.constexpr,
):
    offs_k = tl.arange(0, K_PAD)
    offs_w = tl.arange(0, W_PAD)
    k_mask = offs_k < TOP_K
    # Unused rows: no token, ids -1 (overwritten below for the rows in use).
    for r0 in range(0, total_rows, BLOCK_T):
        offs_r = r0 + tl.arange(0, BLOCK_T)
        r_mask = offs_r < total_rows
        tl.store(src_token_ptr + offs_r, tl.full([BLOCK_T], -1, tl.int32), mask=r_mask)
        tl.store(send_ids_ptr + offs_r[:, None] * TOP_K + offs_k[None, :],
                 tl.full([BLOCK_T, K_PAD], -1, tl.int32), mask=r_mask[:, None] & k_mask[None, :])
    tl.debug_barrier()

    totals = tl.zeros([W_PAD], dtype=tl.int32)
    if not FIXED:  # first pass: block sizes, for the offsets
        for t0 in range(0, num_tokens, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < num_tokens)[:, None] & k_mask[None, :]
            ids = tl.load(topk_ids_ptr + offs_t[:, None] * TOP_K + offs_k[None, :], mask=mask, other=-1)
            owner = tl.where(ids >= 0, ids // experts_per_rank, -1)
            for d in tl.static_range(WORLD):
                need = _needs_rank(owner == d, mask, d, rank, SKIP_OWN)
                totals += tl.where(offs_w == d, tl.sum(need, axis=0), 0)

    running = tl.zeros([W_PAD], dtype=tl.int32)
    for t0 in range(0, num_tokens, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < num_tokens
        mask = t_mask[:, None] & k_mask[None, :]
        slot = offs_t[:, None] * TOP_K + offs_k[None, :]
        ids = tl.load(topk_ids_ptr + slot, mask=mask, other=-1)
        weights = tl.load(topk_weights_ptr + slot, mask=mask, other=0.0)
        owner = tl.where(ids >= 0, ids // experts_per_rank, -1)
        tl.store(own_ids_ptr + slot, tl.where(owner == rank, ids - rank * experts_per_rank, -1),
                 mask=mask)
        for d in tl.static_range(WORLD):
            owned = (owner == d) & mask
            need = _needs_rank(owned, mask, d, rank, SKIP_OWN)
            if FIXED:
                first = d * capacity
            else:
                first = tl.sum(tl.where(offs_w < d, totals, 0), axis=0)
            base = first + tl.sum(tl.where(offs_w == d, running, 0), axis=0)
            row = base + tl.cumsum(need, axis=0) - need
            needed = need > 0
            tl.store(rows_ptr + d * num_tokens + offs_t, tl.where(needed, row, -1), mask=t_mask)
            tl.store(src_token_ptr + row, offs_t, mask=needed)
            send_mask = needed[:, None] & k_mask[None, :]
            tl.store(send_ids_ptr + row[:, None] * TOP_K + offs_k[None, :],
                     tl.where(owned, ids - d * experts_per_rank, -1), mask=send_mask)
            tl.store(send_weights_ptr + row[:, None] * TOP_K + offs_k[None, :], weights,
                     mask=send_mask)
            running += tl.where(offs_w == d, tl.sum(need, axis=0), 0)
    tl.store(counts_ptr + offs_w, running, mask=offs_w < WORLD)


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
    back_ptr, rows_ptr, local_ptr, shared_ptr, out_ptr, num_tokens, hidden,
    WORLD: tl.constexpr, HAS_LOCAL: tl.constexpr, HAS_SHARED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRETER: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = offs_t < num_tokens
    mask = token_mask[:, None] & (offs_h[None, :] < hidden)
    token_offsets = offs_t[:, None].to(tl.int64) * hidden + offs_h[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    if HAS_LOCAL:
        acc += tl.load(local_ptr + token_offsets, mask=mask, other=0.0).to(tl.float32)
    for owner in tl.static_range(WORLD):
        rows = tl.load(rows_ptr + owner * num_tokens + offs_t, mask=token_mask, other=-1)
        part = tl.load(back_ptr + rows[:, None].to(tl.int64) * hidden + offs_h[None, :],
                       mask=mask & (rows >= 0)[:, None], other=0.0)
        acc += part.to(tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + token_offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token_offsets, cast_rne(acc, out_ptr.dtype.element_ty, INTERPRETER),
             mask=mask)


@triton.jit
def bump_epoch_kernel(epoch_ptr):
    tl.store(epoch_ptr, tl.load(epoch_ptr) + 1)


@triton.jit
def put_flag_kernel(epoch_ptr, peer_flag_ptr):
    tl.atomic_xchg(peer_flag_ptr, tl.load(epoch_ptr), sem="release", scope="sys")


@triton.jit
def wait_flags_kernel(epoch_ptr, flags_ptr, status_ptr, self_rank, max_polls,
                      WORLD: tl.constexpr):
    epoch = tl.load(epoch_ptr)
    for src in tl.static_range(WORLD):
        if src != self_rank:
            seen = tl.atomic_add(flags_ptr + src, 0, sem="acquire", scope="sys")
            polls = 0
            while (seen < epoch) & (polls < max_polls):
                seen = tl.atomic_add(flags_ptr + src, 0, sem="acquire", scope="sys")
                polls += 1
            if seen < epoch:
                tl.atomic_max(status_ptr, src + 1)
