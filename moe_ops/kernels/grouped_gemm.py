"""Grouped GEMM over expert-aligned row blocks; one body serves gate_up and down.

Grid = max_blocks * cdiv(N, BLOCK_N) programs, ordered in GROUP_M super-rows so that
programs sharing a weight tile run together. Program (m, n) handles block m (expert
e = block_expert[m]; rows r = sorted_slots[m*BLOCK_M : (m+1)*BLOCK_M], sentinel rows
masked) and output columns n*BLOCK_N ... Blocks past num_blocks exit at once.

    gate_up (FUSE_GATE_UP):  A row = x[slot // top_k]            (gathered, never copied)
        out[slot, n] = silu(A . Wgu[e, n, :]) * (A . Wgu[e, N + n, :])
        only the product is written; SiLU runs in registers.
    down (MUL_ROUTING_WEIGHT): A row = h[slot]
        out[slot, n] = topk_weight[slot] * (A . Wd[e, n, :])

Weight tiles come one of two ways (the tile's B_DESC):
    pointers:    gate and up rows interleaved into one B tile, a single dot of
                 2*BLOCK_N columns per K step, split in registers;
    descriptor:  a tensor descriptor over W [E, rows, K] (TMA on Hopper, plain loads
                 where the hardware has none), gate and up as two tiles and two dots.

In INTERPRETER mode (the Triton CPU interpreter) loads are upcast to float32 and bf16
stores rounded to nearest, because the interpreter gets 16-bit floats wrong. float32
operands multiply in IEEE float32 (never tf32).

Layouts: A [rows, K] (K contiguous), W [E, N or 2N, K] (K contiguous), out [T*K, N].
"""
import triton
import triton.language as tl

from .casting import cast_rne


@triton.jit
def _load_a(a_ptrs, row_mask, k0, K, offs_k, EVEN_K: tl.constexpr, INTERPRETER: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile of gathered A rows at K offset k0 (a_ptrs already there)."""
    if EVEN_K:
        a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=row_mask[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
    if INTERPRETER:
        a = a.to(tl.float32)
    return a


@triton.jit
def _mainloop_pointers(a_ptrs, row_mask, w_ptr, expert, pid_n, N, K, stride_we, stride_wn,
                       FUSE_GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRETER: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32: A . W^T (gate_up: already silu(gate) * up)."""
    # gate_up interleaves gate and up weight rows, so one dot of 2*BLOCK_N columns feeds
    # both: column 2j is gate row n_j, column 2j+1 is up row N + n_j.
    W_COLS: tl.constexpr = 2 * BLOCK_N if FUSE_GATE_UP else BLOCK_N
    offs_w = tl.arange(0, W_COLS)
    offs_n = pid_n * BLOCK_N + offs_w // (W_COLS // BLOCK_N)
    w_rows = offs_n + (offs_w % 2) * N if FUSE_GATE_UP else offs_n
    col_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + w_rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, W_COLS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _load_a(a_ptrs, row_mask, k0, K, offs_k, EVEN_K, INTERPRETER)
        if EVEN_K:
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=col_mask[None, :] & ((k0 + offs_k) < K)[:, None], other=0.0)
        if INTERPRETER:
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision="ieee")
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if FUSE_GATE_UP:
        gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
        acc = gate * tl.sigmoid(gate) * up
    return acc


@triton.jit
def _weight_tile(w_desc, expert, row0, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 INTERPRETER: tl.constexpr):
    """W[expert, row0:row0+BLOCK_N, k0:k0+BLOCK_K]^T as [BLOCK_K, BLOCK_N]; zeros past the ends."""
    w = tl.reshape(w_desc.load([expert, row0, k0]), [BLOCK_N, BLOCK_K])
    if INTERPRETER:
        w = w.to(tl.float32)
    return tl.trans(w)


@triton.jit
def _mainloop_descriptor(a_ptrs, row_mask, w_desc, expert, pid_n, N, K,
                         FUSE_GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRETER: tl.constexpr):
    """As ``_mainloop_pointers``, weight tiles through the descriptor (block [1, BLOCK_N, BLOCK_K]).

    Gate rows past N read up rows; those columns are never stored."""
    offs_k = tl.arange(0, BLOCK_K)
    n0 = pid_n * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _load_a(a_ptrs, row_mask, k0, K, offs_k, EVEN_K, INTERPRETER)
        acc = tl.dot(a, _weight_tile(w_desc, expert, n0, k0, BLOCK_N, BLOCK_K, INTERPRETER),
                     acc, input_precision="ieee")
        if FUSE_GATE_UP:
            acc_up = tl.dot(a, _weight_tile(w_desc, expert, N + n0, k0, BLOCK_N, BLOCK_K, INTERPRETER),
                            acc_up, input_precision="ieee")
        a_ptrs += BLOCK_K
    if FUSE_GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up
    return acc


@triton.jit
def grouped_gemm_kernel(
    a_ptr, w_ptr, w_desc, out_ptr, topk_weights_ptr,
    sorted_slots_ptr, block_expert_ptr, num_blocks_ptr,
    N, K, num_slots, a_rows_per_slot_div, max_blocks,
    stride_a, stride_we, stride_wn, stride_out,
    FUSE_GATE_UP: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, B_DESC: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(max_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    if pid_m >= tl.load(num_blocks_ptr):
        return

    expert = tl.load(block_expert_ptr + pid_m)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + offs_m)
    row_mask = slots < num_slots
    a_rows = (slots // a_rows_per_slot_div).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + tl.arange(0, BLOCK_K)[None, :]
    if B_DESC:
        acc = _mainloop_descriptor(a_ptrs, row_mask, w_desc, expert, pid_n, N, K,
                                   FUSE_GATE_UP, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INTERPRETER)
    else:
        acc = _mainloop_pointers(a_ptrs, row_mask, w_ptr, expert, pid_n, N, K, stride_we, stride_wn,
                                 FUSE_GATE_UP, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, INTERPRETER)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < N
    if MUL_ROUTING_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0)[:, None]
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_out + offs_n[None, :]
    tl.store(out_ptrs, cast_rne(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=row_mask[:, None] & col_mask[None, :])
