"""``FusedMoE``: one MoE layer (router, routed experts, optional shared expert) as a module.

The routed part is one call of ``torch.ops.tritonmoe.fused_moe``; the shared expert is a
dense SwiGLU MLP in plain torch, added on top::

    out = fused_moe(x)                                  # Mixtral, Qwen3-MoE
    out = fused_moe(x) + shared_mlp(x)                  # DeepSeek-V3
    out = fused_moe(x) + sigmoid(x . w_sg) * shared_mlp(x)   # Qwen2-MoE

Weights are held in the op layout (``w_gate_up [E, 2I, H]``: gate rows then up rows;
``w_down [E, H, I]``; router ``[E, H]``), which is also the layout of transformers 5.x
``experts.gate_up_proj`` / ``experts.down_proj``, so ``from_hf`` copies tensors as they are.

DeepSeek-V3's shared expert has the routed experts' size and could run as one more
always-selected expert (weight 1) inside the routed launch; that fusion is not done
and has not been measured: the shared MLP runs as two dense matmuls beside the op.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .configs import MoEConfig, get_config
from .eager_graphs import EagerGraphs
from .fp8 import quantize_weight, scheme_of, wants_fp8
from .hf_blocks import read_block
from .ops import fused_moe, plain_eager


class FusedMoE(nn.Module):
    """A MoE layer whose routed experts run in ``tritonmoe::fused_moe``.

    Parameters (E experts, hidden H, intermediate I, shared intermediate Is):
    ``router_weight [E, H]``, ``w_gate_up [E, 2I, H]``, ``w_down [E, H, I]``; with
    ``config.score_bias`` a float32 buffer ``score_bias [E]``; with a shared expert
    ``shared_gate_up [2Is, H]`` (gate rows then up rows) and ``shared_down [H, Is]``;
    with ``config.shared_gated`` also ``shared_gate [1, H]``. Absent ones are ``None``.
    Construction draws the weights as ``reset_parameters`` says (as ``nn.Linear`` does);
    ``from_hf`` takes a trained block's instead.

    fp8 experts: ``w_gate_up`` and ``w_down`` float8_e4m3fn with float32 scales
    ``w_gate_up_scale`` and ``w_down_scale`` (``moe_ops.fp8``: 128x128 blocks or per
    output channel; None for float experts); the router and shared expert keep the
    hidden dtype. ``quantize_experts(scheme)`` converts a float layer in place;
    ``from_config(..., weight_dtype=torch.float8_e4m3fn, scheme=...)`` draws and quantises.

    Forward only: the ``tritonmoe`` ops register no backward, so the weights are created
    with ``requires_grad=False`` (otherwise ``torch.compile`` would try to trace a backward
    through the op and fail). Inputs that require grad are fine in eager mode and under
    ``torch.no_grad()``, which is how ``generate`` runs.
    """

    def __init__(self, config: MoEConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        num_experts, hidden = config.num_experts, config.hidden_size
        inter, shared_inter = config.intermediate_size, config.shared_intermediate_size
        make = _frozen_weight_factory(dtype, device)

        self.router_weight = make(num_experts, hidden)
        self.w_gate_up = make(num_experts, 2 * inter, hidden)
        self.w_down = make(num_experts, hidden, inter)
        self.register_parameter("w_gate_up_scale", None)
        self.register_parameter("w_down_scale", None)
        # The models keep the score-correction bias in float32 whatever the weights' dtype.
        bias = (torch.zeros(num_experts, dtype=torch.float32, device=device)
                if config.score_bias else None)
        self.register_buffer("score_bias", bias)

        has_shared = config.shared_experts > 0
        if has_shared and shared_inter <= 0:
            raise ValueError(f"{config.name}: shared_experts={config.shared_experts} needs "
                             f"shared_intermediate_size > 0, got {shared_inter}")
        if config.shared_gated and not has_shared:
            raise ValueError(f"{config.name}: shared_gated=True without a shared expert")
        self.shared_gate_up = make(2 * shared_inter, hidden) if has_shared else None
        self.shared_down = make(hidden, shared_inter) if has_shared else None
        self.shared_gate = make(1, hidden) if config.shared_gated else None
        self.eager_graphs = EagerGraphs()
        self.reset_parameters()

    @classmethod
    def from_config(cls, name_or_config: str | MoEConfig, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None, weight_dtype: torch.dtype | None = None,
                    scheme: str = "block") -> "FusedMoE":
        """A randomly initialised layer of a named model config (``moe_ops.configs``);
        ``weight_dtype=torch.float8_e4m3fn`` quantises its experts with ``scheme``."""
        module = cls(get_config(name_or_config), dtype=dtype, device=device)
        if wants_fp8(weight_dtype, dtype):
            module.quantize_experts(scheme)
        return module

    @property
    def fp8_scheme(self) -> str | None:
        """"block" or "channel" for fp8 experts, None for float ones."""
        return scheme_of(self.w_gate_up_scale)

    @torch.no_grad()
    def quantize_experts(self, scheme: str = "block") -> "FusedMoE":
        """Quantise float experts to float8_e4m3fn in place (``moe_ops.fp8.quantize_weight``:
        "block" 128x128 or "channel"); returns self. The experts' float copies are freed.
        Cast the layer (``.to(dtype)``) before, not after: ``.to`` casts fp8 tensors too."""
        if self.fp8_scheme is not None:
            raise ValueError(f"the experts are already fp8 ({self.fp8_scheme})")
        if self.router_weight.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"fp8 experts run with bfloat16 or float16 hidden states; this layer "
                            f"is {self.router_weight.dtype}: convert it with .to() first")
        for name in ("w_gate_up", "w_down"):
            w8, scale = quantize_weight(getattr(self, name), scheme)
            setattr(self, name, nn.Parameter(w8, requires_grad=False))
            setattr(self, f"{name}_scale", nn.Parameter(scale, requires_grad=False))
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every weight from N(0, 1/fan_in) (the bias from N(0, 0.1^2)).

        Unit-variance input then gives router logits and outputs of order one; DeepSeek's
        score bias is drawn nonzero so that it changes which experts are selected, as a
        trained one does."""
        if self.fp8_scheme is not None:
            raise ValueError("reset_parameters draws float experts; this layer's are fp8")
        for weight in (self.router_weight, self.w_gate_up, self.w_down, self.shared_gate_up,
                       self.shared_down, self.shared_gate):
            if weight is not None:
                weight.normal_(0.0, 1.0 / math.sqrt(weight.shape[-1]))
        if self.score_bias is not None:
            self.score_bias.normal_(0.0, 0.1)

    @classmethod
    def from_hf(cls, block: nn.Module, copy: bool = True, where: str | None = None,
                hidden_dtype: torch.dtype | None = None) -> "FusedMoE":
        """Convert a transformers 5.x MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3),
        float or with fp8 experts (transformers' ``FP8Experts``: ``moe_ops.hf_blocks``
        says what converts).

        Raises ``TypeError`` for another block type and ``ValueError`` for an option the
        ops cannot reproduce (naming the block, or ``where`` it sits in a model). With
        ``copy=False`` the new module shares the block's (contiguous) weight storage
        instead of cloning it, which is what ``patch_hf_model`` does to avoid holding
        every expert twice. ``hidden_dtype``: the model's activation dtype, used only
        for fp8 experts (by default the router's; needed where the router is float32, as
        DeepSeek-V3's is on recent transformers).
        """
        config, weights = read_block(block, copy=copy, where=where, hidden_dtype=hidden_dtype)
        module = cls(config, dtype=weights["router_weight"].dtype, device="meta")
        for name, tensor in weights.items():
            if name == "score_bias":
                module.score_bias = tensor
            elif tensor is not None:
                setattr(module, name, nn.Parameter(tensor, requires_grad=False))
        return module.train(block.training)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., H]: routed experts plus the (gated) shared expert.

        In plain eager mode on a GPU, small token counts that recur replay a CUDA graph
        of this computation (``moe_ops.eager_graphs``); the result is the same."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if not torch.compiler.is_compiling() and self.eager_graphs.usable(x):
            weights = self._weights()
            if plain_eager(x, *weights):
                return self.eager_graphs.run(self._forward_tokens, x, weights).reshape(shape)
        return self._forward_tokens(x).reshape(shape)

    def _weights(self) -> tuple[torch.Tensor | None, ...]:
        return (self.router_weight, self.w_gate_up, self.w_down, self.score_bias,
                self.shared_gate_up, self.shared_down, self.shared_gate, self.w_gate_up_scale,
                self.w_down_scale)

    def _forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        config = self.config
        # module.to(dtype) casts every float buffer; the op takes the bias in float32.
        score_bias = None if self.score_bias is None else self.score_bias.float()
        out = fused_moe(
            x, self.router_weight, self.w_gate_up, self.w_down, config.top_k,
            config.scoring, config.renormalize, config.n_group, config.topk_group,
            score_bias, config.routed_scaling_factor, self.w_gate_up_scale, self.w_down_scale,
        )
        shared = self.shared_expert(x)
        if shared is not None:
            out = out + shared
        return out

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (gated) shared expert's output for x [T, H], or None without one."""
        return shared_expert_output(x, self.shared_gate_up, self.shared_down, self.shared_gate)

    def extra_repr(self) -> str:
        c = self.config
        text = (f"{c.name}: experts={c.num_experts}, top_k={c.top_k}, hidden={c.hidden_size}, "
                f"intermediate={c.intermediate_size}, scoring={c.scoring}")
        if self.fp8_scheme:
            text += f", fp8 experts ({self.fp8_scheme})"
        if c.n_group > 1:
            text += f", groups={c.topk_group}/{c.n_group}"
        if c.shared_experts:
            text += (f", shared={c.shared_intermediate_size}"
                     f"{' (gated)' if c.shared_gated else ''}")
        return text


def _frozen_weight_factory(dtype, device):
    def make(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
    return make


def shared_expert_output(x: torch.Tensor, shared_gate_up: torch.Tensor | None,
                         shared_down: torch.Tensor | None,
                         shared_gate: torch.Tensor | None) -> torch.Tensor | None:
    """silu(x Wg) * (x Wu) Wd for x [T, H], times sigmoid(x . w_sg) when gated; None
    without a shared expert. Also used by the expert-parallel layer."""
    if shared_gate_up is None:
        return None
    gate, up = F.linear(x, shared_gate_up).chunk(2, dim=-1)
    shared = F.linear(F.silu(gate) * up, shared_down)
    if shared_gate is not None:
        shared = torch.sigmoid(F.linear(x, shared_gate)) * shared
    return shared
