"""Grouped GEMM over expert-aligned row blocks; one body serves gate_up and down.

Grid = max_blocks * cdiv(N, BLOCK_N) programs, ordered in GROUP_M super-rows so that
programs sharing a weight tile run together. Program (m, n) handles block m (expert
e = block_expert[m]; rows r = sorted_slots[m*BLOCK_M : (m+1)*BLOCK_M], sentinel rows
masked) and output columns n*BLOCK_N ... Blocks past num_blocks exit at once.

    gate_up (FUSE_GATE_UP):  A row = x[slot // top_k]            (gathered, never copied)
        out[slot, n] = silu(A . Wgu[e, n, :]) * (A . Wgu[e, N + n, :])
        gate and up rows interleaved into one B tile: a single dot of 2*BLOCK_N
        columns per K step, split in registers; only the product is written.
    down (MUL_ROUTING_WEIGHT): A row = h[slot]
        out[slot, n] = topk_weight[slot] * (A . Wd[e, n, :])

In INTERPRETER mode (the Triton CPU interpreter) loads are upcast to float32 and bf16
stores rounded to nearest, because the interpreter gets 16-bit floats wrong. float32
operands multiply in IEEE float32 (never tf32).

Layouts: A [rows, K] (K contiguous), W [E, N or 2N, K] (K contiguous), out [T*K, N].
"""
import triton
import triton.language as tl

from .casting import cast_rne


@triton.jit
def grouped_gemm_kernel(
    a_ptr, w_ptr, out_ptr, topk_weights_ptr,
    sorted_slots_ptr, block_expert_ptr, num_blocks_ptr,
    N, K, num_slots, a_rows_per_slot_div, max_blocks,
    stride_a, stride_we, stride_wn, stride_out,
    FUSE_GATE_UP: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
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

    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + offs_m)
    row_mask = slots < num_slots
    a_rows = (slots // a_rows_per_slot_div).to(tl.int64)
    # gate_up interleaves gate and up weight rows, so one dot of 2*BLOCK_N columns feeds
    # both: column 2j is gate row n_j, column 2j+1 is up row N + n_j.
    W_COLS: tl.constexpr = 2 * BLOCK_N if FUSE_GATE_UP else BLOCK_N
    offs_w = tl.arange(0, W_COLS)
    offs_n = pid_n * BLOCK_N + offs_w // (W_COLS // BLOCK_N)
    w_rows = offs_n + (offs_w % 2) * N if FUSE_GATE_UP else offs_n
    col_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows[:, None] * stride_a + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + w_rows[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, W_COLS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a_mask = row_mask[:, None]
            w_mask = col_mask[None, :]
        else:
            k_mask = (k0 + offs_k) < K
            a_mask = row_mask[:, None] & k_mask[None, :]
            w_mask = col_mask[None, :] & k_mask[:, None]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if INTERPRETER:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision="ieee")
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if FUSE_GATE_UP:
        gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
        acc = gate * tl.sigmoid(gate) * up
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < N
    if MUL_ROUTING_WEIGHT:
        acc = acc * tl.load(topk_weights_ptr + slots, mask=row_mask, other=0.0)[:, None]
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * stride_out + offs_n[None, :]
    tl.store(out_ptrs, cast_rne(acc, out_ptr.dtype.element_ty, INTERPRETER), mask=row_mask[:, None] & col_mask[None, :])
