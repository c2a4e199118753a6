"""Router kernel: logits, scoring, (grouped) top-k and weights in one launch.

For a block of BLOCK_T tokens (grid = cdiv(T, BLOCK_T)):

    logits[t, e] = sum_h x[t, h] * W[e, h]                      fp32 accumulate
    softmax:  scores = softmax(logits rounded to x's dtype)      (Mixtral, Qwen)
    sigmoid:  scores = sigmoid(logits); choice = scores + bias   (DeepSeek-V3)
    groups:   keep the TOPK_GROUP groups with the largest sum of their top-2 choices
    top-k:    ids = argmax of choice K times, ties to the lower expert index
    weights:  scores at ids, renormalised (+1e-20 for sigmoid), times the scaling

Selection orders choices as ``torch.topk`` and ``moe_ops.reference`` do, NaN above every
number: a token whose hidden state holds NaN or Inf gets in-range, distinct ids (with NaN
weights where its scores are NaN), its output is non-finite as the reference's is, and
no other token is affected.
Comparisons run on int32 keys of that order (``_order_key``), so the result does not
depend on how a backend's max treats NaN.

Layouts: x [T, H], W [E, H] (H contiguous), bias fp32 [E]; topk_weights fp32 [T, K],
topk_ids int32 [T, K]. With WRITE_RANKS it also does the first step of the alignment
(``align.block_ranks``) for its block of tokens; with QUANTIZE it also writes its tokens
in e4m3 for fp8-activation experts (x8 [T, H] and their scales, as
``quantize.quantize_kernel`` would: one launch fewer). The whole expert axis (E_PAD, a
power of two >= 16) lives in registers, so selection never leaves the program.
``router_logits`` and ``select_topk`` also serve the decode path (``decode_route``).
"""
import triton
import triton.language as tl

from .align import block_ranks
from .casting import cast_rne
from .quantize import quantize_rows


UNAVAILABLE = tl.constexpr(-2147483648)  # the key of padding, excluded and picked entries


@triton.jit
def _order_key(values):
    """int32 keys ordered as torch.sort orders float32 values: NaN above +inf, -0.0 equal to
    0.0. Every key is above UNAVAILABLE (-inf's key is -2**31 + 2**23 - 1)."""
    values = tl.where(values == 0.0, 0.0, values)
    values = tl.where(values != values, float("nan"), values)  # one NaN, sign bit clear
    bits = values.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse the magnitude order


@triton.jit
def _argmax_lowest(keys, offsets, PAD: tl.constexpr):
    """Per row, the lowest column index holding the row's largest key (torch.topk's tie order)."""
    best = tl.max(keys, axis=1)
    hit = keys == best[:, None]
    return tl.min(tl.where(hit, offsets[None, :], PAD), axis=1)


@triton.jit
def _value_at(values, offsets, index):
    """Per row, values[row, index[row]] (exactly: every other term of the sum is zero)."""
    return tl.sum(tl.where(offsets[None, :] == index[:, None], values, 0.0), axis=1)


@triton.jit
def router_logits(x_ptr, w_ptr, offs_t, offs_e, token_mask, expert_mask, hidden, h_start, h_end,
                  BLOCK_H: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 [len(offs_t), len(offs_e)]: sum over h in [h_start, h_end) of x[t, h] * W[e, h]."""
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros([offs_t.shape[0], offs_e.shape[0]], dtype=tl.float32)
    x_ptrs = x_ptr + offs_t[:, None].to(tl.int64) * hidden + h_start + offs_h[None, :]
    w_ptrs = w_ptr + offs_e[None, :].to(tl.int64) * hidden + h_start + offs_h[:, None]
    for h0 in range(h_start, h_end, BLOCK_H):
        h_mask = (h0 + offs_h) < h_end
        x = tl.load(x_ptrs, mask=token_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=h_mask[:, None] & expert_mask[None, :], other=0.0)
        if INTERPRETER:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee")
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    return acc


@triton.jit
def select_topk(logits, bias_ptr, routed_scaling_factor, LOGIT_DTYPE: tl.constexpr,
                NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
                SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                E_PAD: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr,
                INTERPRETER: tl.constexpr):
    """Scoring and (grouped) top-k of fp32 logits [BLOCK_T, E_PAD]: (weights fp32, ids int32),
    each [BLOCK_T, K_PAD]. Softmax rounds the logits to LOGIT_DTYPE first (the models'
    router Linear runs in the hidden dtype)."""
    BLOCK_T: tl.constexpr = logits.shape[0]
    offs_e = tl.arange(0, E_PAD)
    expert_mask = offs_e < NUM_EXPERTS
    if SIGMOID:
        scores = tl.sigmoid(logits)
        choice = scores
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_e, mask=expert_mask, other=0.0)
            choice = scores + bias[None, :]
    else:
        logits = cast_rne(logits, LOGIT_DTYPE, INTERPRETER).to(tl.float32)
        logits = tl.where(expert_mask[None, :], logits, float("-inf"))
        exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = exps / tl.sum(exps, axis=1)[:, None]
        choice = scores
    keys = tl.where(expert_mask[None, :], _order_key(choice), UNAVAILABLE)

    if N_GROUP > 1:
        group_size: tl.constexpr = NUM_EXPERTS // N_GROUP
        group_of_expert = offs_e // group_size
        offs_g = tl.arange(0, G_PAD)
        group_scores = tl.zeros([BLOCK_T, G_PAD], tl.float32)
        for g in tl.static_range(N_GROUP):
            in_group = tl.where(group_of_expert[None, :] == g, keys, UNAVAILABLE)
            first = _argmax_lowest(in_group, offs_e, E_PAD)
            score = _value_at(choice, offs_e, first)
            if group_size > 1:
                rest = tl.where(offs_e[None, :] == first[:, None], UNAVAILABLE, in_group)
                score += _value_at(choice, offs_e, _argmax_lowest(rest, offs_e, E_PAD))
            group_scores = tl.where(offs_g[None, :] == g, score[:, None], group_scores)
        group_keys = tl.where((offs_g < N_GROUP)[None, :], _order_key(group_scores), UNAVAILABLE)
        allowed = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            best_group = _argmax_lowest(group_keys, offs_g, G_PAD)
            group_keys = tl.where(offs_g[None, :] == best_group[:, None], UNAVAILABLE, group_keys)
            allowed = allowed | (group_of_expert[None, :] == best_group[:, None])
        keys = tl.where(allowed, keys, UNAVAILABLE)

    offs_k = tl.arange(0, K_PAD)
    topk_w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    topk_i = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = _argmax_lowest(keys, offs_e, E_PAD)
        picked = offs_e[None, :] == best[:, None]
        weight = tl.sum(tl.where(picked, scores, 0.0), axis=1)
        keys = tl.where(picked, UNAVAILABLE, keys)
        topk_w = tl.where(offs_k[None, :] == k, weight[:, None], topk_w)
        topk_i = tl.where(offs_k[None, :] == k, best[:, None], topk_i)
    if RENORMALIZE:
        denominator = tl.sum(topk_w, axis=1)
        if SIGMOID:
            denominator += 1e-20  # DeepSeek-V3 guards the sum; the softmax models do not
        topk_w = topk_w / denominator[:, None]
    topk_w = topk_w * routed_scaling_factor
    return topk_w, topk_i


@triton.jit
def route_kernel(
    x_ptr, w_ptr, bias_ptr, topk_weights_ptr, topk_ids_ptr, block_counts_ptr, ranks_ptr,
    x8_ptr, x_scale_ptr, num_tokens, hidden, routed_scaling_factor,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    E_PAD: tl.constexpr, K_PAD: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, WRITE_RANKS: tl.constexpr,
    QUANTIZE: tl.constexpr, QUANT_C: tl.constexpr, INTERPRETER: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    token_mask = offs_t < num_tokens
    expert_mask = offs_e < NUM_EXPERTS

    logits = router_logits(x_ptr, w_ptr, offs_t, offs_e, token_mask, expert_mask, hidden, 0,
                           hidden, BLOCK_H, INTERPRETER)
    topk_w, topk_i = select_topk(logits, bias_ptr, routed_scaling_factor, x_ptr.dtype.element_ty,
                                 NUM_EXPERTS, TOP_K, SIGMOID, RENORMALIZE, HAS_BIAS, N_GROUP,
                                 TOPK_GROUP, E_PAD, K_PAD, G_PAD, INTERPRETER)
    offs_k = tl.arange(0, K_PAD)
    out_offs = offs_t[:, None].to(tl.int64) * TOP_K + offs_k[None, :]
    out_mask = token_mask[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(topk_weights_ptr + out_offs, topk_w, mask=out_mask)
    tl.store(topk_ids_ptr + out_offs, topk_i, mask=out_mask)
    if WRITE_RANKS:  # step 1 of the alignment, while the ids are in registers
        block_ranks(topk_i, out_mask, out_offs, block_counts_ptr + pid * NUM_EXPERTS, ranks_ptr,
                    NUM_EXPERTS, E_PAD, BLOCK_T * K_PAD)
    if QUANTIZE:  # this block's tokens in e4m3 for gate_up (1: per row, 2: per 128 columns)
        quantize_rows(x_ptr, x8_ptr, x_scale_ptr, offs_t, token_mask, hidden, hidden, QUANT_C,
                      QUANTIZE == 1)
