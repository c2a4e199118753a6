"""Which experts a rank holds, random layers drawn shard by shard, and the checks that
every rank of a group built the same layer.

Rank r of W holds the contiguous experts ``[r*E/W, (r+1)*E/W)``: those rows of
``w_gate_up`` and ``w_down`` and, for fp8 experts, of their scales (dim 0 of a scale is
the expert in both schemes, ``moe_ops.fp8``). Random weights are drawn from generators
seeded per tensor (and per expert), so a rank can draw its own shard alone and still
hold exactly the experts ``random_fused_moe`` draws for a whole single-process layer
with the same seed. fp8 quantisation is per expert (its blocks or rows), so quantising
a shard gives the rows of the quantised whole.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moe_ops.configs import MoEConfig
from moe_ops.fp8 import quantize_weight, scheme_of, wants_fp8
from moe_ops.module import FusedMoE


def expert_range(num_experts: int, world_size: int, rank: int) -> range:
    """The experts rank ``rank`` of ``world_size`` owns."""
    if num_experts % world_size != 0:
        raise ValueError(
            f"num_experts={num_experts} must be divisible by the group's world size "
            f"{world_size} (experts are split into equal contiguous shards)")
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


# The routed experts' tensors, each sharded along dim 0 (the scales are None for float
# experts).
EXPERT_TENSORS = ("w_gate_up", "w_down", "w_gate_up_scale", "w_down_scale")


def _normal(shape, std, seed, dtype, device):
    generator = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    return out.normal_(0.0, std, generator=generator).to(dtype)


def draw_replicated(config: MoEConfig, seed: int, dtype, device) -> dict:
    """Router, score bias and shared-expert weights: the same on every rank for a seed.
    N(0, 1/fan_in) like ``FusedMoE.reset_parameters``; the bias N(0, 0.1^2) in float32."""
    E, H, Is = config.num_experts, config.hidden_size, config.shared_intermediate_size
    base = seed * 1_000_003
    has_shared = config.shared_experts > 0
    return dict(
        router_weight=_normal((E, H), H ** -0.5, base, dtype, device),
        score_bias=_normal((E,), 0.1, base + 1, torch.float32, device) if config.score_bias else None,
        shared_gate_up=_normal((2 * Is, H), H ** -0.5, base + 2, dtype, device) if has_shared else None,
        shared_down=_normal((H, Is), Is ** -0.5, base + 3, dtype, device) if has_shared else None,
        shared_gate=_normal((1, H), H ** -0.5, base + 4, dtype, device) if config.shared_gated else None,
    )


def draw_experts(config: MoEConfig, seed: int, experts: range, dtype, device,
                 weight_dtype=None, scheme: str = "block") -> tuple:
    """(w_gate_up [n, 2I, H], w_down [n, H, I], w_gate_up_scale, w_down_scale) of the
    given experts only: drawn in ``dtype``, then quantised with ``scheme`` when
    ``weight_dtype`` is float8_e4m3fn (the scales are None for float experts)."""
    H, I = config.hidden_size, config.intermediate_size
    base = seed * 1_000_003 + 16
    w_gate_up = torch.empty(len(experts), 2 * I, H, dtype=dtype, device=device)
    w_down = torch.empty(len(experts), H, I, dtype=dtype, device=device)
    for i, expert in enumerate(experts):
        w_gate_up[i] = _normal((2 * I, H), H ** -0.5, base + 2 * expert, dtype, device)
        w_down[i] = _normal((H, I), I ** -0.5, base + 2 * expert + 1, dtype, device)
    if not wants_fp8(weight_dtype, dtype):
        return w_gate_up, w_down, None, None
    (w_gate_up, gate_up_scale), (w_down, down_scale) = (quantize_weight(w_gate_up, scheme),
                                                        quantize_weight(w_down, scheme))
    return w_gate_up, w_down, gate_up_scale, down_scale


def replicated_shell(config: MoEConfig, seed: int, dtype, device) -> FusedMoE:
    """A ``FusedMoE`` holding the replicated weights of ``draw_replicated`` and no expert
    storage (its expert tensors are on the meta device)."""
    moe = FusedMoE(config, dtype=dtype, device="meta")
    for name, tensor in draw_replicated(config, seed, dtype, device).items():
        if name == "score_bias":
            moe.score_bias = tensor
        elif tensor is not None:
            setattr(moe, name, torch.nn.Parameter(tensor, requires_grad=False))
    return moe


def random_fused_moe(config: MoEConfig, seed: int = 0, dtype=torch.float32, device=None,
                     weight_dtype=None, scheme: str = "block") -> FusedMoE:
    """The whole layer ``ExpertParallelMoE.from_config`` draws for this seed (and weight
    format: ``weight_dtype``, ``scheme`` as in ``FusedMoE.from_config``), on one process."""
    moe = replicated_shell(config, seed, dtype, device)
    experts = draw_experts(config, seed, range(config.num_experts), dtype, device,
                           weight_dtype, scheme)
    for name, tensor in zip(EXPERT_TENSORS, experts):
        setattr(moe, name, None if tensor is None
                else torch.nn.Parameter(tensor, requires_grad=False))
    return moe


def weight_format(w_gate_up: torch.Tensor, w_gate_up_scale: torch.Tensor | None) -> str:
    """The experts' storage, for descriptions and errors: "torch.bfloat16" or
    "torch.float8_e4m3fn (block scales)"."""
    scheme = scheme_of(w_gate_up_scale)
    return str(w_gate_up.dtype) + (f" ({scheme} scales)" if scheme else "")


REPLICATED_TENSORS = ("router_weight", "score_bias", "shared_gate_up", "shared_down",
                      "shared_gate")


def checksums(tensor: torch.Tensor | None) -> tuple[float, float] | None:
    """Two float64 sums of |tensor|: plain, and with row i weighted by i+1 (so that rows
    in another order, such as swapped gate and up halves, differ too)."""
    if tensor is None:
        return None
    rows = tensor.detach().reshape(tensor.shape[0] if tensor.dim() else 1, -1)
    per_row = rows.abs().sum(dim=1, dtype=torch.float64)
    weights = torch.arange(1, per_row.numel() + 1, device=per_row.device, dtype=torch.float64)
    return tuple(torch.stack((per_row.sum(), (per_row * weights).sum())).tolist())


def layer_description(config: MoEConfig, dtype: torch.dtype, replicated: dict,
                      transport: str, max_tokens_per_rank: int | None,
                      experts_format: str) -> dict:
    """What must agree between the ranks of one layer: config, hidden dtype, the experts'
    format (``weight_format``: a float rank beside an fp8 one, or block beside channel
    scales, would compute different layers), transport settings, and checksums of every
    replicated tensor (``replicated``: name -> tensor or None; router, score bias,
    shared expert), which catch ranks that loaded different replicated weights. Each
    rank holds other experts, so their weights cannot be compared this way."""
    fields = {k: v for k, v in vars(config).items() if k != "name"}
    return dict(config=fields, dtype=str(dtype), experts_format=experts_format,
                transport=transport, max_tokens_per_rank=max_tokens_per_rank,
                **{f"checksum of {name}": checksums(tensor) for name, tensor in replicated.items()})


def check_ranks_agree(group, description: dict) -> list:
    """Gather every rank's description; raise the same error on every rank where a rank
    reports one (under "_error": (exception type name, message), from checks that only
    that rank could make) or two differ (keys starting with "_" are gathered, not
    compared). Returns the gathered list."""
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, description, group=group)
    for rank, other in enumerate(gathered):
        if other.get("_error"):
            kind, message = other["_error"]
            raise (TypeError if kind == "TypeError" else ValueError)(
                f"ExpertParallelMoE: rank {rank} of the group cannot build the layer: {message}")
    first = gathered[0]
    for rank, other in enumerate(gathered[1:], start=1):
        for key in (k for k in first if not k.startswith("_")):
            a, b = first[key], other[key]
            if key.startswith("checksum of "):
                same = (a is None) == (b is None) and (a is None or all(
                    math.isclose(u, v, rel_tol=1e-6) for u, v in zip(a, b)))
            elif isinstance(a, dict):
                same = a == b
                if not same:
                    diff = sorted(k for k in a if a[k] != b.get(k))
                    key = f"config ({', '.join(f'{k}: {a[k]!r} vs {b.get(k)!r}' for k in diff)})"
            else:
                same = a == b
            if not same:
                raise ValueError(
                    f"ExpertParallelMoE: ranks 0 and {rank} of the group disagree on {key}"
                    + ("" if key.startswith("config") else f": {a!r} vs {b!r}")
                    + "; every rank must build the layer from the same config, dtype and "
                      "weights (in the same format)")
    return gathered
