"""The strongest MoE forward a user can write in PyTorch alone: sort by expert, two
grouped GEMMs, SiLU*mul, weighted scatter-add.

    slots sorted by expert (stable) -> offs[e] = end of expert e's rows (int32, cumulative)
    xs  = x[token_of_slot]                                   [T*K, H]
    gu  = grouped_mm(xs, w_gate_up^T, offs)                  [T*K, 2I]
    h   = silu(gu[:, :I]) * gu[:, I:]                        [T*K, I]
    y   = grouped_mm(h, w_down^T, offs) * w_slot             [T*K, H]  (fp32)
    out = index_add(zeros[T, H] fp32, token_of_slot, y)  -> x.dtype

Nothing synchronises with the host (no bincount, no nonzero), so it can be captured
in a CUDA graph like our ops. ``torch._grouped_mm`` takes a 2-D ``[rows, K]`` left
operand, a 3-D ``[G, K, N]`` right operand (here the transposed ``[E, N, K]`` weights,
a column-major view: no copy) and ``offs`` int32 ends of each group. On CUDA it wants
bf16 and SM >= 80 (SM 90 in older torch); ``grouped_mm_available`` tries it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """(order, token_of_slot, offs): slots of the flattened [T*K] ids sorted by expert
    (stable), the token of each sorted slot, and int32 cumulative row ends per expert."""
    flat = topk_ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    experts = torch.arange(num_experts, device=flat.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)
    token_of_slot = order // topk_ids.shape[1]
    return order, token_of_slot, offs


def grouped_mm_moe(hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, w_gate_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """``fused_experts`` in plain PyTorch with ``torch._grouped_mm`` (same arguments:
    x [T,H], weights fp32 [T,K], ids [T,K], w_gate_up [E,2I,H], w_down [E,H,I])."""
    num_tokens, hidden = hidden_states.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    order, token_of_slot, offs = sort_by_expert(topk_ids, num_experts)
    xs = hidden_states[token_of_slot]
    gate_up = torch._grouped_mm(xs, w_gate_up.transpose(1, 2), offs=offs)
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs)
    y = y * topk_weights.reshape(-1)[order].unsqueeze(1).float()
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, token_of_slot, y)
    return out.to(hidden_states.dtype)


def grouped_mm_available(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> tuple[bool, str]:
    """(works, why not): whether ``torch._grouped_mm`` runs on this device and dtype."""
    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        a = torch.randn(8, 16, dtype=dtype, device=device)
        b = torch.randn(2, 32, 16, dtype=dtype, device=device).transpose(1, 2)
        offs = torch.tensor([3, 8], dtype=torch.int32, device=device)
        out = torch._grouped_mm(a, b, offs=offs)
        ref = torch.cat([a[:3].float() @ b[0].float(), a[3:].float() @ b[1].float()])
        if not torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-1):
            return False, "torch._grouped_mm gave wrong results in a probe"
    except Exception as exc:  # unsupported device, dtype or architecture
        return False, f"torch._grouped_mm unavailable: {type(exc).__name__}: {str(exc)[:200]}"
    return True, ""
