"""Routing for a handful of tokens (decode): the router GEMM spread over the GPU.

``route_kernel`` gives each block of tokens one program that reads the whole router
[E, H]; with one block of tokens that is one SM streaming up to a few MB (DeepSeek-V3:
256 x 7168 x 2 B). Here routing and alignment still take two launches, but the router
GEMM is spread over many programs:

1. ``router_partials_kernel``, grid = (cdiv(E, BLOCK_E), H_SPLITS): program (c, s) computes
       partials[s, t, e] = sum_{h in split s} x[t, h] * W[e, h]   (fp32)
   for every token t < T <= BLOCK_T and the experts e of chunk c.
2. ``select_align_kernel``, one program: logits = sum_s partials[s] (fixed order), the
   scoring and top-k of ``route.select_topk``, the ranks of ``align.block_ranks``, then
   the alignment of ``align.align_kernel`` (called as a function). With SELECT off it reads given topk_ids
   instead (``fused_experts``: ranks and alignment in one launch).

Layouts: x [T, H], W [E, H] (H contiguous), partials fp32 [H_SPLITS, BLOCK_T, E];
outputs as ``route_kernel`` and ``align_kernel``.
"""
import triton
import triton.language as tl

from .align import align_kernel, block_ranks
from .route import router_logits, select_topk


@triton.jit
def router_partials_kernel(
    x_ptr, w_ptr, partials_ptr, num_tokens, hidden, h_per_split,
    NUM_EXPERTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr, INTERPRETER: tl.constexpr,
):
    chunk = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
    token_mask = offs_t < num_tokens
    expert_mask = offs_e < NUM_EXPERTS
    h_start = split * h_per_split
    acc = router_logits(x_ptr, w_ptr, offs_t, offs_e, token_mask, expert_mask, hidden, h_start,
                        min(h_start + h_per_split, hidden), BLOCK_H, INTERPRETER)
    out = partials_ptr + (split * BLOCK_T + offs_t[:, None]) * NUM_EXPERTS + offs_e[None, :]
    tl.store(out, acc, mask=token_mask[:, None] & expert_mask[None, :])


@triton.jit
def select_align_kernel(
    partials_ptr, bias_ptr, topk_weights_ptr, topk_ids_ptr, block_counts_ptr, ranks_ptr,
    sorted_slots_ptr, block_expert_ptr, num_blocks_ptr,
    num_tokens, routed_scaling_factor, max_blocks,
    SELECT: tl.constexpr, LOGIT_DTYPE: tl.constexpr, H_SPLITS: tl.constexpr,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    E_PAD: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CHUNK: tl.constexpr, CHUNK: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    """grid = (1,); all T <= BLOCK_T tokens form one token block of the alignment."""
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, K_PAD)
    token_mask = offs_t < num_tokens
    out_offs = offs_t[:, None] * TOP_K + offs_k[None, :]
    out_mask = token_mask[:, None] & (offs_k[None, :] < TOP_K)
    if SELECT:
        offs_e = tl.arange(0, E_PAD)
        mask = token_mask[:, None] & (offs_e < NUM_EXPERTS)[None, :]
        ptrs = partials_ptr + offs_t[:, None] * NUM_EXPERTS + offs_e[None, :]
        logits = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
        for s in tl.static_range(H_SPLITS):
            logits += tl.load(ptrs + s * BLOCK_T * NUM_EXPERTS, mask=mask, other=0.0)
        topk_w, topk_i = select_topk(logits, bias_ptr, routed_scaling_factor, LOGIT_DTYPE,
                                     NUM_EXPERTS, TOP_K, SIGMOID, RENORMALIZE, HAS_BIAS, N_GROUP,
                                     TOPK_GROUP, E_PAD, K_PAD, G_PAD, INTERPRETER)
        tl.store(topk_weights_ptr + out_offs, topk_w, mask=out_mask)
        tl.store(topk_ids_ptr + out_offs, topk_i, mask=out_mask)
        valid = out_mask
    else:
        topk_i = tl.load(topk_ids_ptr + out_offs, mask=out_mask, other=-1)
        valid = out_mask & (topk_i >= 0) & (topk_i < NUM_EXPERTS)  # bad ids are dropped
    block_ranks(topk_i, valid, out_offs, block_counts_ptr, ranks_ptr,
                NUM_EXPERTS, E_PAD, BLOCK_T * K_PAD)
    tl.debug_barrier()  # the ids, counts and ranks above are read back below
    align_kernel(topk_ids_ptr, block_counts_ptr, ranks_ptr, sorted_slots_ptr, block_expert_ptr,
                 num_blocks_ptr, num_tokens * TOP_K, 1, max_blocks, topk_ids_ptr, 0,
                 NUM_EXPERTS, TOP_K, BLOCK_T, E_PAD, BLOCK_M, 0, 2, BLOCK_CHUNK, CHUNK,
                 False)  # TB_CHUNK 2: no size-1 tiles; every row may hold ids
