"""The PyTorch grouped-GEMM baseline of the benchmark matches the reference loop."""
import pytest
import torch

from benchmarks.grouped_baseline import grouped_mm_available, grouped_mm_moe, sort_by_expert
from moe_ops.reference import fused_experts_reference

from helpers import assert_close_l2

NUM_EXPERTS, TOP_K, HIDDEN, INTER = 8, 2, 64, 48
# The baseline rounds gate/up and y to bf16 (the grouped GEMMs' output dtype) where the
# reference keeps float32; over 1350 random draws its error peaked at 1.0e-2.
BASELINE_TOL = 2e-2


def _weights(device, dtype):
    w_gate_up = torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, device=device) * HIDDEN**-0.5
    w_down = torch.randn(NUM_EXPERTS, HIDDEN, INTER, device=device) * INTER**-0.5
    return w_gate_up.to(dtype), w_down.to(dtype)


def _ids(case, num_tokens, device):
    if case == "uniform":
        ids = torch.rand(num_tokens, NUM_EXPERTS, device=device).topk(TOP_K, dim=1).indices
    elif case == "one_expert_empty":  # expert 3 gets nothing
        scores = torch.rand(num_tokens, NUM_EXPERTS, device=device)
        scores[:, 3] = -1.0
        ids = scores.topk(TOP_K, dim=1).indices
    else:  # "all_on_two": every token on experts 5 and 6
        ids = torch.tensor([[5, 6]], device=device).expand(num_tokens, TOP_K)
    return ids.to(torch.int32).contiguous()


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("case", ["uniform", "one_expert_empty", "all_on_two"])
def test_grouped_mm_moe_matches_reference(device, num_tokens, case):
    dtype = torch.bfloat16
    works, why = grouped_mm_available(device, dtype)
    if not works:
        pytest.skip(why)
    x = torch.randn(num_tokens, HIDDEN, device=device).to(dtype)
    w_gate_up, w_down = _weights(device, dtype)
    topk_ids = _ids(case, num_tokens, device)
    topk_weights = torch.softmax(torch.randn(num_tokens, TOP_K, device=device), dim=1)
    out = grouped_mm_moe(x, topk_weights, topk_ids, w_gate_up, w_down)
    ref = fused_experts_reference(x, topk_weights, topk_ids, w_gate_up, w_down)
    assert out.dtype == dtype
    assert_close_l2(out, ref, BASELINE_TOL)


def test_sort_by_expert_offsets(device):
    topk_ids = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32, device=device)
    order, token_of_slot, offs = sort_by_expert(topk_ids, 5)
    assert offs.dtype == torch.int32
    assert offs.tolist() == [2, 2, 5, 6, 6]  # expert 1 and 4 empty
    assert topk_ids.reshape(-1)[order].tolist() == [0, 0, 2, 2, 2, 3]
    assert token_of_slot.tolist() == [0, 2, 0, 1, 2, 1]  # stable: token order within expert
