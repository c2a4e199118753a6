"""Triton kernels of the expert-parallel layer.

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
