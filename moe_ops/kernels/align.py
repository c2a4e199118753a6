"""Align kernel: group the T*K routed slots by expert into BLOCK_M-row blocks.

One program (grid = (1,)) reads topk_ids [T*K] (slot s = t*K + k) and writes

    sorted_slots [max_blocks * BLOCK_M] int32: the slots of expert 0, padded to a
        multiple of BLOCK_M with the sentinel T*K, then expert 1, ... (stable order);
    block_expert [max_blocks] int32: the expert of each block, -1 past the last;
    num_blocks [1] int32: how many blocks are in use.

max_blocks is the worst case over all routings, computed from shapes alone, so no
buffer size depends on data. Ids outside [0, E) are dropped (never gathered), so a bad
id can not make a later kernel read or write out of bounds.
"""
import triton
import triton.language as tl


@triton.jit
def align_kernel(
    topk_ids_ptr, sorted_slots_ptr, block_expert_ptr, num_blocks_ptr,
    num_slots, max_blocks,
    NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
):
    offs_e = tl.arange(0, E_PAD)
    offs_c = tl.arange(0, CHUNK)
    expert_mask = offs_e < NUM_EXPERTS

    # Pass 1: tokens per expert.
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        ids = tl.load(topk_ids_ptr + start + offs_c, mask=start + offs_c < num_slots, other=-1)
        onehot = (ids[:, None] == offs_e[None, :]) & expert_mask[None, :]
        counts += tl.sum(onehot.to(tl.int32), axis=0)

    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    row_start = tl.cumsum(padded, axis=0) - padded
    block_start = row_start // BLOCK_M
    block_end = block_start + padded // BLOCK_M
    tl.store(num_blocks_ptr, tl.sum(padded, axis=0) // BLOCK_M)

    # The expert of every block; -1 for the blocks no expert needs.
    for b0 in range(0, max_blocks, CHUNK):
        blocks = b0 + offs_c
        owner = (blocks[:, None] >= block_start[None, :]) & (blocks[:, None] < block_end[None, :])
        expert = tl.max(tl.where(owner, offs_e[None, :], -1), axis=1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)

    # Padding rows hold the sentinel; the real rows are overwritten below.
    for r0 in range(0, max_blocks * BLOCK_M, CHUNK):
        rows = r0 + offs_c
        tl.store(sorted_slots_ptr + rows, tl.full([CHUNK], 0, tl.int32) + num_slots,
                 mask=rows < max_blocks * BLOCK_M)
    tl.debug_barrier()

    # Pass 2: each slot goes to its expert's start + its rank among earlier slots.
    seen = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, num_slots, CHUNK):
        slots = start + offs_c
        ids = tl.load(topk_ids_ptr + slots, mask=slots < num_slots, other=-1)
        onehot = ((ids[:, None] == offs_e[None, :]) & expert_mask[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, axis=0) - onehot + (row_start + seen)[None, :]
        row = tl.sum(onehot * rank, axis=1)
        valid = tl.sum(onehot, axis=1) > 0
        tl.store(sorted_slots_ptr + row, slots, mask=valid)
        seen += tl.sum(onehot, axis=0)
