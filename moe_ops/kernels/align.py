"""Alignment: group the T*K routed slots (slot s = t*K + k) by expert into BLOCK_M-row blocks.

Two steps, so that the single-program step does O(T*K + token_blocks*E) work:

1. ``block_ranks`` (inside the router kernel, or ``rank_kernel`` for user-given ids),
   one program per RANK_BLOCK_T tokens: the block's per-expert counts
   ``block_counts[tb, e]`` and each slot's rank among the block's slots of its expert.
   With HAS_ROWS, rows at or past ``rows_ptr[0]`` (an expert-parallel receive buffer's
   filled rows, known on the device only) are taken to hold no routed id and skipped,
   here and in step 2.
2. ``align_kernel``, one program: expert totals, block-padded row offsets, and
       sorted_slots [max_blocks * BLOCK_M] int32: expert 0's slots padded to a multiple
           of BLOCK_M with the sentinel T*K, then expert 1's, ... (rows past the blocks
           in use unwritten)
       block_expert [max_blocks] int32: each block's expert, -1 past the last;
       num_blocks [1] int32: the blocks in use (two words where the kernel chooses
           between two block sizes: ``align_kernel``),
   placing slot s at row_start[e] + (slots of e in earlier token blocks) + rank[s].

``rank_align_kernel`` runs both steps in one program over a receive buffer's filled rows
when only a few are expected (a decoding expert-parallel rank): one launch, not two; if
many arrive after all, it ranks them by counting with atomics.

max_blocks is the worst case over all routings, computed from shapes alone. Ids outside
[0, E) are dropped (never gathered), so a bad id can not make a later kernel read or
write out of bounds.
"""
import triton
import triton.language as tl


@triton.jit
def block_ranks(ids, valid, slots, block_counts_ptr, ranks_ptr,
                NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Store one token block's per-expert counts and each valid slot's rank within them.

    ids, valid, slots: same-shaped tiles of ROWS elements in all (expert id, whether to
    count it, slot index); block_counts_ptr points at this block's row of E counts.
    """
    ids = tl.reshape(ids, [ROWS])
    valid = tl.reshape(valid, [ROWS])
    slots = tl.reshape(slots, [ROWS])
    offs_e = tl.arange(0, E_PAD)
    onehot = ((ids[:, None] == offs_e[None, :]) & valid[:, None]).to(tl.int32)
    rank = tl.sum(onehot * (tl.cumsum(onehot, axis=0) - onehot), axis=1)
    tl.store(ranks_ptr + slots, rank, mask=valid)
    tl.store(block_counts_ptr + offs_e, tl.sum(onehot, axis=0), mask=offs_e < NUM_EXPERTS)


@triton.jit
def rank_kernel(topk_ids_ptr, block_counts_ptr, ranks_ptr, num_tokens, rows_ptr,
                NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, E_PAD: tl.constexpr,
                K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, HAS_ROWS: tl.constexpr):
    """Step 1 for user-given topk_ids [T, K]; grid = cdiv(T, BLOCK_T), one token block per
    program. With HAS_ROWS the grid may be smaller: each program strides over the token
    blocks below the filled rows (the blocks past them are neither read nor written)."""
    if HAS_ROWS:
        limit = tl.minimum(tl.load(rows_ptr), num_tokens)
        for tb in range(tl.program_id(0), tl.cdiv(limit, BLOCK_T), tl.num_programs(0)):
            _rank_block(topk_ids_ptr, block_counts_ptr, ranks_ptr, tb, limit, NUM_EXPERTS,
                        TOP_K, E_PAD, K_PAD, BLOCK_T)
    else:
        _rank_block(topk_ids_ptr, block_counts_ptr, ranks_ptr, tl.program_id(0), num_tokens,
                    NUM_EXPERTS, TOP_K, E_PAD, K_PAD, BLOCK_T)


@triton.jit
def _rank_block(topk_ids_ptr, block_counts_ptr, ranks_ptr, tb, num_tokens,
                NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, E_PAD: tl.constexpr,
                K_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Token block tb's counts and ranks; a block without a valid id only zeroes its
    counts."""
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, K_PAD)
    slots = offs_t[:, None] * TOP_K + offs_k[None, :]
    in_range = (offs_t[:, None] < num_tokens) & (offs_k[None, :] < TOP_K)
    ids = tl.load(topk_ids_ptr + slots, mask=in_range, other=-1)
    valid = in_range & (ids >= 0) & (ids < NUM_EXPERTS)
    if tl.max(valid.to(tl.int32)) == 0:  # common in a sparse (expert-parallel) buffer
        offs_e = tl.arange(0, E_PAD)
        tl.store(block_counts_ptr + tb * NUM_EXPERTS + offs_e, tl.zeros([E_PAD], tl.int32),
                 mask=offs_e < NUM_EXPERTS)
    else:
        block_ranks(ids, valid, slots, block_counts_ptr + tb * NUM_EXPERTS, ranks_ptr,
                    NUM_EXPERTS, E_PAD, BLOCK_T * K_PAD)


@triton.jit
def align_kernel(
    topk_ids_ptr, block_counts_ptr, ranks_ptr,
    sorted_slots_ptr, block_expert_ptr, num_blocks_ptr,
    num_slots, num_token_blocks, max_blocks, rows_ptr, switch_slots,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, RANK_BLOCK_T: tl.constexpr,
    E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BIG_BLOCK_M: tl.constexpr,
    TB_CHUNK: tl.constexpr, BLOCK_CHUNK: tl.constexpr, CHUNK: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    """Step 2; grid = (1,). Rewrites block_counts in place into each block's first row.
    ``select_align_kernel`` calls it as its second half.

    With BIG_BLOCK_M the block size is chosen here: BIG_BLOCK_M where more than
    switch_slots slots are routed, else BLOCK_M, and num_blocks_ptr holds two words,
    the blocks in use at [0] where BLOCK_M was chosen, at [1] where BIG_BLOCK_M was, the
    other one 0 (of two GEMM launches, one per choice, only one finds blocks to compute)."""
    offs_e = tl.arange(0, E_PAD)
    offs_tb = tl.arange(0, TB_CHUNK)
    offs_c = tl.arange(0, CHUNK)
    expert_mask = offs_e < NUM_EXPERTS

    used_slots = num_slots
    if HAS_ROWS:  # token blocks and slots past the filled rows hold no slot: not read
        rows_used = tl.minimum(tl.load(rows_ptr), num_slots // TOP_K)
        num_token_blocks = tl.minimum(tl.cdiv(rows_used, RANK_BLOCK_T), num_token_blocks)
        used_slots = rows_used * TOP_K
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for tb0 in range(0, num_token_blocks, TB_CHUNK):
        rows = tb0 + offs_tb
        ptrs = block_counts_ptr + rows[:, None] * NUM_EXPERTS + offs_e[None, :]
        mask = (rows[:, None] < num_token_blocks) & expert_mask[None, :]
        counts += tl.sum(tl.load(ptrs, mask=mask, other=0), axis=0)

    block_m = BLOCK_M
    if BIG_BLOCK_M > 0:
        big = (tl.sum(counts, axis=0) > switch_slots).to(tl.int32)
        block_m = tl.where(big != 0, BIG_BLOCK_M, BLOCK_M)
    padded = tl.cdiv(counts, block_m) * block_m
    row_start = tl.cumsum(padded, axis=0) - padded
    block_start = row_start // block_m
    block_end = block_start + padded // block_m
    used_rows = tl.sum(padded, axis=0)
    if BIG_BLOCK_M > 0:
        tl.store(num_blocks_ptr + big, used_rows // block_m)
        tl.store(num_blocks_ptr + 1 - big, 0)
    else:
        tl.store(num_blocks_ptr, used_rows // block_m)

    # block_counts[tb, e] <- row_start[e] + slots of e in token blocks before tb.
    seen = row_start
    for tb0 in range(0, num_token_blocks, TB_CHUNK):
        rows = tb0 + offs_tb
        ptrs = block_counts_ptr + rows[:, None] * NUM_EXPERTS + offs_e[None, :]
        mask = (rows[:, None] < num_token_blocks) & expert_mask[None, :]
        chunk = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(chunk, axis=0) - chunk + seen[None, :], mask=mask)
        seen += tl.sum(chunk, axis=0)

    offs_b = tl.arange(0, BLOCK_CHUNK)
    used_blocks = used_rows // block_m
    for b0 in range(0, used_blocks, BLOCK_CHUNK):
        blocks = b0 + offs_b
        owner = (blocks[:, None] >= block_start[None, :]) & (blocks[:, None] < block_end[None, :])
        expert = tl.max(tl.where(owner, offs_e[None, :], -1), axis=1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)
    for b0 in range(used_blocks, max_blocks, CHUNK):
        blocks = b0 + offs_c
        tl.store(block_expert_ptr + blocks, tl.full([CHUNK], -1, tl.int32), mask=blocks < max_blocks)

    # Padding rows of the blocks in use hold the sentinel (the real rows are overwritten
    # below); rows of blocks past num_blocks are never read.
    for r0 in range(0, used_rows, CHUNK):
        rows = r0 + offs_c
        tl.store(sorted_slots_ptr + rows, tl.full([CHUNK], 0, tl.int32) + num_slots,
                 mask=rows < used_rows)
    tl.debug_barrier()

    for s0 in range(0, used_slots, CHUNK):
        slots = s0 + offs_c
        ids = tl.load(topk_ids_ptr + slots, mask=slots < used_slots, other=-1)
        valid = (slots < used_slots) & (ids >= 0) & (ids < NUM_EXPERTS)
        token_block = slots // TOP_K // RANK_BLOCK_T
        first_row = tl.load(block_counts_ptr + token_block * NUM_EXPERTS + ids, mask=valid, other=0)
        rank = tl.load(ranks_ptr + slots, mask=valid, other=0)
        tl.store(sorted_slots_ptr + first_row + rank, slots, mask=valid)


@triton.jit
def _count_ranks(topk_ids_ptr, counts_ptr, ranks_ptr, used_slots, NUM_EXPERTS: tl.constexpr,
                 E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Step 1 for all used slots as one token block, by counting: counts_ptr's E counts
    zeroed, then each valid slot's rank taken from an atomic add on its expert's count
    (ranks unique per expert, their order the atomics'; every row's result is computed
    alone, so the output does not depend on it)."""
    offs_e = tl.arange(0, E_PAD)
    tl.store(counts_ptr + offs_e, tl.zeros([E_PAD], tl.int32), mask=offs_e < NUM_EXPERTS)
    tl.debug_barrier()
    for s0 in range(0, used_slots, CHUNK):
        slots = s0 + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + slots, mask=slots < used_slots, other=-1)
        valid = (slots < used_slots) & (ids >= 0) & (ids < NUM_EXPERTS)
        rank = tl.atomic_add(counts_ptr + ids, tl.full([CHUNK], 1, tl.int32), mask=valid,
                             sem="relaxed")
        tl.store(ranks_ptr + slots, rank, mask=valid)


@triton.jit
def rank_align_kernel(
    topk_ids_ptr, block_counts_ptr, ranks_ptr, sorted_slots_ptr, block_expert_ptr,
    num_blocks_ptr, num_tokens, num_token_blocks, max_blocks, rows_ptr, switch_slots,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
    RANK_BLOCK_T: tl.constexpr, ONE_HOT_ROWS: tl.constexpr, ALL_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BIG_BLOCK_M: tl.constexpr, TB_CHUNK: tl.constexpr,
    BLOCK_CHUNK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Steps 1 and 2 in one program (grid = (1,)) over the rows of topk_ids [T, K] below
    rows_ptr[0] (the filled rows of a receive buffer), for a rank expecting few. Up to
    ONE_HOT_ROWS filled rows (the common case): step 1 on their token blocks one after the
    other, then step 2 as ``align_kernel`` with HAS_ROWS. More (peers with larger batches
    than this rank's): step 1 as one token block of ALL_ROWS (a power of two >= T) by
    counting (``_count_ranks``), whose cost grows with the slots alone, not slots times
    experts as the one-hot's does. BIG_BLOCK_M, switch_slots: as ``align_kernel``'s."""
    limit = tl.minimum(tl.load(rows_ptr), num_tokens)
    if limit <= ONE_HOT_ROWS:
        for tb in range(0, tl.cdiv(limit, RANK_BLOCK_T)):
            _rank_block(topk_ids_ptr, block_counts_ptr, ranks_ptr, tb, limit, NUM_EXPERTS,
                        TOP_K, E_PAD, K_PAD, RANK_BLOCK_T)
        tl.debug_barrier()  # the counts and ranks above are read back below
        align_kernel(topk_ids_ptr, block_counts_ptr, ranks_ptr, sorted_slots_ptr,
                     block_expert_ptr, num_blocks_ptr, num_tokens * TOP_K, num_token_blocks,
                     max_blocks, rows_ptr, switch_slots, NUM_EXPERTS, TOP_K, RANK_BLOCK_T,
                     E_PAD, BLOCK_M, BIG_BLOCK_M, TB_CHUNK, BLOCK_CHUNK, CHUNK, True)
    else:
        _count_ranks(topk_ids_ptr, block_counts_ptr, ranks_ptr, limit * TOP_K, NUM_EXPERTS,
                     E_PAD, CHUNK)
        tl.debug_barrier()
        align_kernel(topk_ids_ptr, block_counts_ptr, ranks_ptr, sorted_slots_ptr,
                     block_expert_ptr, num_blocks_ptr, num_tokens * TOP_K, 1, max_blocks,
                     rows_ptr, switch_slots, NUM_EXPERTS, TOP_K, ALL_ROWS, E_PAD, BLOCK_M,
                     BIG_BLOCK_M, TB_CHUNK, BLOCK_CHUNK, CHUNK, True)
