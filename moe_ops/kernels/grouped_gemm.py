"""Grouped GEMM over expert-aligned row blocks; one body serves gate_up and down.

Grid = grid_blocks * cdiv(N, BLOCK_N) programs (grid_blocks = max_blocks, the worst
case), ordered in GROUP_M super-rows so that programs sharing a weight tile run together.
Program (m, n) handles block m (expert e = block_expert[m]; rows r =
sorted_slots[m*BLOCK_M : (m+1)*BLOCK_M], sentinel rows masked) and output columns
n*BLOCK_N ... Blocks past num_blocks exit at once. With LOOP_M the grid may cover fewer
blocks than can be in use (an expert-parallel receive buffer, sized for its capacity but
mostly empty: empty programs cost ~0.3 us of an SM each): program (m, n) then also
handles blocks m + grid_blocks, m + 2*grid_blocks, ... below num_blocks.

    GATE_UP (the gate_up stage):  A row = x[slot // top_k]   (gathered, never copied)
        h[row, n] = silu(A . Wgu[e, n, :]) * (A . Wgu[e, N + n, :])
        only the product is written; SiLU runs in registers.
    not GATE_UP (the down stage):  A row = h[row]
        out[slot, n] = topk_weight[slot] * (A . Wd[e, n, :])

h is indexed by slot, or with H_BLOCK_ORDER by the row's place in the block order (h
then has max_blocks*BLOCK_M rows, padding rows written as zeros): down then reads its A
tiles through a tensor descriptor (TMA on Hopper) instead of gathered pointer loads.

gate_up's B tile holds 2*BLOCK_N columns, the BLOCK_N gate rows n0... first and then
the BLOCK_N up rows N+n0..., so each K step is a single dot and the epilogue splits the
accumulator in halves. The tile comes one of two ways (B_DESC): pointer loads, or a
tensor descriptor over W viewed as [E, 2, N, K] whose [2, BLOCK_N, BLOCK_K] box holds
both halves.

fp8 weights (W_SCALE, scales as ``moe_ops.fp8`` lays them out) are e4m3 with float32
multipliers: W_SCALE=1 one per output row (applied once, before the epilogue), W_SCALE=2
one per 128x128 block (applied to each K step's partial product; BLOCK_K divides 128).
With A_FP8 (block scales: BLOCK_K = 128) A arrives in e4m3 (``kernels.quantize``, one
launch before the GEMM, or gate_up's OUT_FP8 epilogue) and the dot runs in fp8: with
per-channel weights A has one scale per row, applied with the weights' in the epilogue,
so the K loop is bare fp8 MMAs; with block weights one per row per 128 columns, applied
with the weight block's to each K step's partial product. FAST_ACC lets the
per-row-scaled fp8 MMAs accumulate at the hardware's reduced precision over the whole K
(Hopper; otherwise folded into fp32 every 128 of K, which costs up to 2x at large T).
Without A_FP8 the weight tile is converted to A's dtype and the dot runs there
(weight-only fp8).
OUT_FP8 (gate_up, block scales, BLOCK_N a multiple of 128): the epilogue writes h in e4m3
with one float32 scale per row per 128 columns into out_scale [h rows, cdiv(N, 128)] (as
``kernels.quantize`` would, from h rounded to H_DTYPE), so down's fp8 input costs no
launch of its own.

WAIT_ROWS (gate_up): x's rows are still landing from other GPUs (``kernels.landing``):
each tile first waits for the flags of the sources of its rows (row_source, flags,
epoch, late, stop, timeout_ticks as ``landing.wait_landed`` reads them; NUM_SOURCES, a
power of two, at least the number of flags).

In INTERPRETER mode (the Triton CPU interpreter) loads are upcast to float32 and bf16
stores rounded to nearest, because the interpreter gets 16-bit floats wrong. float32
operands multiply in IEEE float32 (never tf32).

Layouts: A [rows, K] (K contiguous), W [E, N or 2N, K] (K contiguous), out [rows, N].
"""
import triton
import triton.language as tl

from .casting import cast_rne
from .landing import wait_landed
from .quantize import quantize_groups


@triton.jit
def _upcast(t, INTERPRETER: tl.constexpr):
    """float32 under the interpreter (which gets 16-bit floats wrong), else unchanged."""
    if INTERPRETER:
        t = t.to(tl.float32)
    return t


@triton.jit
def _load_a(a_ptrs, a_desc, row0, row_mask, k0, K, offs_k, A_DESC: tl.constexpr,
            EVEN_K: tl.constexpr, INTERPRETER: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] A tile at K offset k0: block-order rows row0... through the
    descriptor, or the gathered rows a_ptrs (already advanced to k0)."""
    if A_DESC:
        a = a_desc.load([row0, k0])
    elif EVEN_K:
        a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=row_mask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
    return _upcast(a, INTERPRETER)


@triton.jit
def _weight_tile_pointers(w_ptrs, col_mask, k0, K, offs_k, EVEN_K: tl.constexpr,
                          INTERPRETER: tl.constexpr):
    """The [BLOCK_K, W_COLS] weight tile at K offset k0 (w_ptrs already there)."""
    if EVEN_K:
        w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
    else:
        w = tl.load(w_ptrs, mask=col_mask[None, :] & ((k0 + offs_k) < K)[:, None], other=0.0)
    return _upcast(w, INTERPRETER)


@triton.jit
def _weight_tile_descriptor(w_desc, expert, n0, k0, GATE_UP: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            INTERPRETER: tl.constexpr):
    """[BLOCK_K, W_COLS]: W[e, n0:n0+BLOCK_N, k0:k0+BLOCK_K]^T, gate_up's gate rows then its
    up rows; zeros past the ends."""
    if GATE_UP:
        w = tl.reshape(w_desc.load([expert, 0, n0, k0]), [2 * BLOCK_N, BLOCK_K])
    else:
        w = tl.reshape(w_desc.load([expert, n0, k0]), [BLOCK_N, BLOCK_K])
    return tl.trans(_upcast(w, INTERPRETER))


@triton.jit
def _step(acc, a, w, a_scale_k, w_scale_k, W_SCALE: tl.constexpr, A_FP8: tl.constexpr,
          FAST_ACC: tl.constexpr):
    """acc + a . w for one K step, with the fp8 scales the flags call for."""
    if A_FP8 and W_SCALE == 2:
        acc += tl.dot(a, w, input_precision="ieee") * (a_scale_k[:, None] * w_scale_k[None, :])
    elif A_FP8 and FAST_ACC:
        acc = tl.dot(a, w, acc, input_precision="ieee")
    elif A_FP8:
        # Hopper's fp8 MMAs add in reduced precision: fold into fp32 every 128 of K
        # (without, K=1280 drifts 1.2e-2 from the float32 emulation; FAST_ACC allows it).
        acc = tl.dot(a, w, acc, input_precision="ieee", max_num_imprecise_acc=128)
    elif W_SCALE == 2:
        acc += tl.dot(a, w.to(a.dtype), input_precision="ieee") * w_scale_k[None, :]
    elif W_SCALE == 1:
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, w, acc, input_precision="ieee")
    return acc


@triton.jit
def _mainloop(a_ptrs, a_desc, row0, row_mask, a_scale_ptrs, w_ptr, w_desc, w_scale_ptr, expert,
              pid_n, N, K, stride_we, stride_wn, stride_se, stride_sn,
              GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, A_DESC: tl.constexpr,
              B_DESC: tl.constexpr, W_SCALE: tl.constexpr, A_FP8: tl.constexpr,
              FAST_ACC: tl.constexpr, INTERPRETER: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32: A . W^T (gate_up: already silu(gate) * up)."""
    W_COLS: tl.constexpr = 2 * BLOCK_N if GATE_UP else BLOCK_N
    offs_k = tl.arange(0, BLOCK_K)
    # Column j < BLOCK_N: gate (or down) row n0 + j; column BLOCK_N + j: up row N + n0 + j.
    offs_w = tl.arange(0, W_COLS)
    offs_n = pid_n * BLOCK_N + offs_w % BLOCK_N
    w_rows = offs_n + (offs_w // BLOCK_N) * N
    col_mask = offs_n < N
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, W_COLS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _load_a(a_ptrs, a_desc, row0, row_mask, k0, K, offs_k, A_DESC, EVEN_K, INTERPRETER)
        if B_DESC:
            w = _weight_tile_descriptor(w_desc, expert, pid_n * BLOCK_N, k0, GATE_UP,
                                        BLOCK_N, BLOCK_K, INTERPRETER)
        else:
            w = _weight_tile_pointers(w_ptrs, col_mask, k0, K, offs_k, EVEN_K, INTERPRETER)
        w_scale_k = None
        a_scale_k = None
        if W_SCALE == 2:  # the block scales of this tile's rows at this K step
            w_scale_k = tl.load(w_scale_ptr + expert.to(tl.int64) * stride_se
                                + (w_rows // 128) * stride_sn + k0 // 128, mask=col_mask, other=0.0)
            if A_FP8:  # and A's, one per row per 128 columns
                a_scale_k = tl.load(a_scale_ptrs + k0 // 128, mask=row_mask, other=0.0)
        acc = _step(acc, a, w, a_scale_k, w_scale_k, W_SCALE, A_FP8, FAST_ACC)
        if not A_DESC:
            a_ptrs += BLOCK_K
        if not B_DESC:
            w_ptrs += BLOCK_K
    if W_SCALE == 1:
        channel_ptrs = w_scale_ptr + expert.to(tl.int64) * stride_se + w_rows * stride_sn
        acc = acc * tl.load(channel_ptrs, mask=col_mask, other=0.0)[None, :]
        if A_FP8:
            acc = acc * tl.load(a_scale_ptrs, mask=row_mask, other=0.0)[:, None]
    if GATE_UP:
        gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), (0, 2, 1)))
        acc = gate * tl.sigmoid(gate) * up
    return acc


@triton.jit
def _block(pid_m, pid_n, a_ptr, a_desc, a_scale_ptr, w_ptr, w_desc, w_scale_ptr, out_ptr,
           out_scale_ptr, topk_weights_ptr, sorted_slots_ptr, block_expert_ptr,
           N, K, num_slots, a_rows_per_slot_div,
           stride_a, stride_as, stride_we, stride_wn, stride_se, stride_sn, stride_out, stride_os,
           row_source_ptr, source_flags_ptr, epoch_ptr, late_ptr, stop_ptr, timeout_ticks,
           GATE_UP: tl.constexpr, OUT_FP8: tl.constexpr, H_DTYPE: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           EVEN_K: tl.constexpr, H_BLOCK_ORDER: tl.constexpr, B_DESC: tl.constexpr,
           W_SCALE: tl.constexpr, A_FP8: tl.constexpr, FAST_ACC: tl.constexpr,
           WAIT_ROWS: tl.constexpr, NUM_SOURCES: tl.constexpr, HIP: tl.constexpr,
           INTERPRETER: tl.constexpr):
    """Output tile (pid_m, pid_n) of a block in use."""
    expert = tl.load(block_expert_ptr + pid_m)
    row0 = pid_m * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + offs_m)
    row_mask = slots < num_slots
    # down with H_BLOCK_ORDER reads h's block-order rows through a_desc; otherwise A is gathered.
    A_DESC: tl.constexpr = H_BLOCK_ORDER and not GATE_UP
    a_rows = (slots // a_rows_per_slot_div).to(tl.int64)
    if GATE_UP and WAIT_ROWS:
        wait_landed(a_rows, row_mask, row_source_ptr, source_flags_ptr, epoch_ptr, late_ptr,
                    stop_ptr, timeout_ticks, NUM_SOURCES, HIP)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + tl.arange(0, BLOCK_K)[None, :]
    a_scale_ptrs = None
    if A_FP8:  # A's scales, by the rows A is read at (block order through a_desc)
        if A_DESC:
            a_scale_ptrs = a_scale_ptr + offs_m.to(tl.int64) * stride_as
        else:
            a_scale_ptrs = a_scale_ptr + a_rows * stride_as
    acc = _mainloop(a_ptrs, a_desc, row0, row_mask, a_scale_ptrs, w_ptr, w_desc, w_scale_ptr,
                    expert, pid_n, N, K, stride_we, stride_wn, stride_se, stride_sn, GATE_UP,
                    BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, A_DESC, B_DESC, W_SCALE, A_FP8, FAST_ACC,
                    INTERPRETER)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < N
    if not GATE_UP:
        acc = acc * tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0)[:, None]
    if OUT_FP8:
        # h in e4m3, one scale per row per 128 columns, of h as H_DTYPE would hold it (the
        # numbers kernels.quantize would make of it).
        GROUPS: tl.constexpr = BLOCK_N // 128
        acc, scale = quantize_groups(cast_rne(acc, H_DTYPE, INTERPRETER).to(tl.float32))
        group = pid_n * GROUPS + tl.arange(0, GROUPS)
        scale_rows = offs_m if H_BLOCK_ORDER else slots
        scale_mask = (group < tl.cdiv(N, 128))[None, :]
        if not H_BLOCK_ORDER:
            scale_mask = scale_mask & row_mask[:, None]
        tl.store(out_scale_ptr + scale_rows[:, None].to(tl.int64) * stride_os + group[None, :],
                 scale, mask=scale_mask)
    else:
        acc = cast_rne(acc, out_ptr.dtype.element_ty, INTERPRETER)
    if H_BLOCK_ORDER and GATE_UP:
        # Every row of the block, padding included (zeros there), so down reads no garbage.
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_out + offs_n[None, :]
        tl.store(out_ptrs, acc, mask=col_mask[None, :])
    else:
        out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_out + offs_n[None, :]
        tl.store(out_ptrs, acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def grouped_gemm_kernel(
    a_ptr, a_desc, a_scale_ptr, w_ptr, w_desc, w_scale_ptr, out_ptr, out_scale_ptr,
    topk_weights_ptr, sorted_slots_ptr, block_expert_ptr, num_blocks_ptr,
    N, K, num_slots, a_rows_per_slot_div, grid_blocks,
    stride_a, stride_as, stride_we, stride_wn, stride_se, stride_sn, stride_out, stride_os,
    row_source_ptr, source_flags_ptr, epoch_ptr, late_ptr, stop_ptr, timeout_ticks,
    GATE_UP: tl.constexpr, OUT_FP8: tl.constexpr, H_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, H_BLOCK_ORDER: tl.constexpr,
    B_DESC: tl.constexpr, W_SCALE: tl.constexpr, A_FP8: tl.constexpr, FAST_ACC: tl.constexpr,
    LOOP_M: tl.constexpr, WAIT_ROWS: tl.constexpr, NUM_SOURCES: tl.constexpr,
    HIP: tl.constexpr, INTERPRETER: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(grid_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    num_blocks = tl.load(num_blocks_ptr)
    # Two calls of one body rather than one loop for both: the plain path stays the
    # straight-line code it was tuned as.
    if LOOP_M:  # grid_blocks may be fewer than the blocks in use: stride over them
        for m in range(pid_m, num_blocks, grid_blocks):
            _block(m, pid_n, a_ptr, a_desc, a_scale_ptr, w_ptr, w_desc, w_scale_ptr, out_ptr,
                   out_scale_ptr, topk_weights_ptr, sorted_slots_ptr, block_expert_ptr,
                   N, K, num_slots, a_rows_per_slot_div, stride_a, stride_as, stride_we,
                   stride_wn, stride_se, stride_sn, stride_out, stride_os, row_source_ptr,
                   source_flags_ptr, epoch_ptr, late_ptr, stop_ptr, timeout_ticks, GATE_UP,
                   OUT_FP8, H_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, H_BLOCK_ORDER, B_DESC,
                   W_SCALE, A_FP8, FAST_ACC, WAIT_ROWS, NUM_SOURCES, HIP, INTERPRETER)
    elif pid_m < num_blocks:
        _block(pid_m, pid_n, a_ptr, a_desc, a_scale_ptr, w_ptr, w_desc, w_scale_ptr, out_ptr,
               out_scale_ptr, topk_weights_ptr, sorted_slots_ptr, block_expert_ptr,
               N, K, num_slots, a_rows_per_slot_div, stride_a, stride_as, stride_we,
               stride_wn, stride_se, stride_sn, stride_out, stride_os, row_source_ptr,
               source_flags_ptr, epoch_ptr, late_ptr, stop_ptr, timeout_ticks, GATE_UP,
               OUT_FP8, H_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, H_BLOCK_ORDER, B_DESC,
               W_SCALE, A_FP8, FAST_ACC, WAIT_ROWS, NUM_SOURCES, HIP, INTERPRETER)
