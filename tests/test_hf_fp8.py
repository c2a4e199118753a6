"""fp8 Hugging Face models and the "tritonmoe" experts implementation (no download).

fp8 models are built the way transformers builds them for a ``FineGrainedFP8Config``
checkpoint: its own ``replace_with_fp8_linear`` swaps the experts for ``FP8Experts`` (and
the shared experts' linears for ``FP8Linear``), whose weights are then filled with
128x128-block quantised copies of a random float model's. transformers' own fp8 forward
needs a kernel from the Hub, so the truth is transformers' forward of the float model
with the dequantised weights (``w8 * scale_inv``), and the project's emulation
(``fused_experts_reference`` with the scales and the tiles' fp8-activation choice).

Found on the way (transformers 5.24 here, 5.17 on the H200): ``from_pretrained`` with a
``FineGrainedFP8Config`` cannot build an fp8 model without a GPU, hence
``replace_with_fp8_linear``; its ``modules_to_not_convert`` entries match name prefixes, so
attention is kept in float with ``r".*self_attn"``, not ``"self_attn"``. 5.17 sets neither
``has_post_expert_norm`` nor ``_is_expert_parallel`` on experts modules (the checks default
them); 5.24's ``FP8Experts`` takes ``expert_dtype=`` (only attributes are read here) and
keeps DeepSeek-V3's router in float32 in a bf16 model (cast to the hidden dtype on
conversion: exact for checkpoints, which store it in bf16).
"""
import copy
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM,  # noqa: E402
                          FineGrainedFP8Config, Qwen3MoeConfig, Qwen3MoeForCausalLM)
from transformers.integrations.finegrained_fp8 import (FP8Experts, FP8Linear,  # noqa: E402
                                                       replace_with_fp8_linear)

import moe_ops.hf_experts as hf_experts  # noqa: E402
from conftest import ON_GPU  # noqa: E402
from helpers import TOLERANCE, assert_close_l2, drop_routing_near_ties  # noqa: E402
from moe_ops.fp8 import dequantize_weight, quantize_weight  # noqa: E402
from moe_ops.hf_patch import PatchedMoEBlock, patch_hf_model  # noqa: E402
from moe_ops.module import FusedMoE  # noqa: E402
from moe_ops.reference import fused_experts_reference, route_reference  # noqa: E402
from moe_ops.tiles import get_tile_config  # noqa: E402

# fp8 experts take 16-bit activations: fp16 (the interpreter computes bf16 wrongly), and on
# the GPU too: whole models are compared by their logits, and where two implementations'
# roundings differ, a near-tie between two experts' scores in the second layer can route a
# token differently and move its logits past any bound (under bf16, one test in about
# three runs of this file on an H200: 6.6e-2 > 6e-2, 6.4e-2 > 1e-2); fp16's 8x finer
# rounding makes that 8x rarer, float32 (the float models, as in test_hf_patch) all but
# impossible. bf16 hidden states with fp8 experts: test_fp8.
DTYPE = torch.float16
FLOAT_DTYPE = torch.float32
FP8_TOL = 6e-2  # fp8 weights against transformers on the dequantised weights
HIDDEN, INTER = 256, 128
COMMON = dict(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=1 / 16, num_experts_per_tok=2,
              pad_token_id=0)
CONFIGS = {
    "deepseek_v3": lambda: DeepseekV3Config(
        intermediate_size=256, moe_intermediate_size=INTER, n_routed_experts=8, n_group=2,
        topk_group=1, n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, **COMMON),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        intermediate_size=256, moe_intermediate_size=INTER, num_experts=8, norm_topk_prob=True,
        num_key_value_heads=2, head_dim=64, **COMMON),
}
MODELS = {"deepseek_v3": DeepseekV3ForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}


def float_model(name, dtype, device):
    """A random tiny model; DeepSeek's score-correction bias drawn so it changes routing."""
    model = MODELS[name](CONFIGS[name]())
    with torch.no_grad():
        for layer in model.model.layers:
            bias = getattr(layer.mlp.gate, "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0.0, 0.1)
    return model.to(device=device, dtype=dtype).eval()


def fp8_pair(name, device, skip=(r".*self_attn", "lm_head"), block_size=(128, 128),
             activation_scheme="dynamic"):
    """(fp8 model, float model holding its dequantised weights). transformers'
    ``replace_with_fp8_linear`` makes the FP8 modules (on the meta device); their weights
    are the float model's, quantised per 128x128 block."""
    reference = float_model(name, DTYPE, device)
    model = copy.deepcopy(reference)
    config = FineGrainedFP8Config(weight_block_size=block_size, activation_scheme=activation_scheme,
                                  modules_to_not_convert=list(skip))
    replace_with_fp8_linear(model, modules_to_not_convert=list(skip), quantization_config=config)
    if block_size != (128, 128) or activation_scheme != "dynamic":
        return model, reference
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, (FP8Experts, FP8Linear)):
                source = reference.get_submodule(path)
                names = ["gate_up_proj", "down_proj"] if isinstance(module, FP8Experts) else ["weight"]
                for attr in names:
                    scale_attr = "weight_scale_inv" if attr == "weight" else f"{attr}_scale_inv"
                    _set_fp8(module, getattr(source, attr), attr, scale_attr)
    return model, reference


def _set_fp8(module, weight, attr, scale_attr):
    """module.attr = weight quantised per 128x128 block; weight (the reference's) becomes its
    dequantised value."""
    w3 = weight.float() if weight.dim() == 3 else weight.float()[None]
    w8, scale = quantize_weight(w3, "block")
    weight.copy_(dequantize_weight(w8, scale).reshape(weight.shape).to(weight.dtype))
    if weight.dim() == 2:
        w8, scale = w8[0], scale[0]
    setattr(module, attr, nn.Parameter(w8, requires_grad=False))
    setattr(module, scale_attr, nn.Parameter(scale, requires_grad=False))


def tokens(device, batch=2, length=6):
    return torch.randint(1, 128, (batch, length), device=device)


def emulation(moe: FusedMoE, x: torch.Tensor, device) -> torch.Tensor:
    """The project's emulation of a converted fp8 layer: reference routing, dequantised
    experts with fp8 activations where the launch's tiles use them, the shared expert."""
    c = moe.config
    weights, ids = route_reference(x, moe.router_weight, c.top_k, c.scoring, c.renormalize,
                                   c.n_group, c.topk_group, moe.score_bias, c.routed_scaling_factor)
    fp8_acts = tuple(get_tile_config(stage, c.num_experts, c.hidden_size, c.intermediate_size,
                                     x.shape[0], c.top_k, x.dtype, x.device, "block").A_FP8
                     for stage in ("gate_up", "down"))
    out = fused_experts_reference(x, weights, ids, moe.w_gate_up, moe.w_down, moe.w_gate_up_scale,
                                  moe.w_down_scale, fp8_activations=fp8_acts)
    shared = moe.shared_expert(x)
    return out if shared is None else out + shared


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp8_block_parity(name, device):
    """from_hf of an FP8Experts block (DeepSeek: fp8 shared expert too, float32 router)
    against transformers on the dequantised weights and against the emulation."""
    model, reference = fp8_pair(name, device, skip=(r".*self_attn", "lm_head"))
    block, ref_block = model.model.layers[0].mlp, reference.model.layers[0].mlp
    x = torch.randn(64, HIDDEN, device=device, dtype=DTYPE)
    hidden_dtype = None
    if name == "deepseek_v3":
        assert isinstance(block.shared_experts.gate_proj, FP8Linear)
        # transformers >= 5.2x keeps this router in float32 (bf16 values in checkpoints).
        block.gate.weight.data = block.gate.weight.data.float()
        with pytest.raises(ValueError, match="pass hidden_dtype"):
            FusedMoE.from_hf(block)
        hidden_dtype = DTYPE
    else:
        x = drop_routing_near_ties(x, ref_block.gate.weight, 2)
    x = x[:12].reshape(2, 6, HIDDEN)
    moe = FusedMoE.from_hf(block, hidden_dtype=hidden_dtype)
    assert moe.fp8_scheme == "block" and moe.w_gate_up.dtype == torch.float8_e4m3fn
    assert moe.router_weight.dtype == DTYPE
    with torch.no_grad():
        out = moe(x)
        assert_close_l2(out, ref_block(x), FP8_TOL)
        assert_close_l2(out.reshape(-1, HIDDEN), emulation(moe, x.reshape(-1, HIDDEN), device),
                        TOLERANCE[DTYPE])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_patch_fp8_model(name, device):
    """patch_hf_model converts every FP8Experts block; logits match the dequantised model."""
    model, reference = fp8_pair(name, device)
    ids = tokens(device)
    with torch.no_grad():
        expected = reference(ids).logits
        assert patch_hf_model(model) == 2
        assert all(isinstance(layer.mlp, PatchedMoEBlock) and layer.mlp.moe.fp8_scheme == "block"
                   for layer in model.model.layers)
        assert_close_l2(model(ids).logits, expected, FP8_TOL)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls the "tritonmoe" experts functions make to fused_experts."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[3].dtype)
        return moe_ops_fused_experts(*args, **kwargs)

    moe_ops_fused_experts = hf_experts.fused_experts
    monkeypatch.setattr(hf_experts, "fused_experts", counting)
    return calls


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_experts_implementation_float(name, device, spy):
    model = float_model(name, FLOAT_DTYPE, device)
    reference = copy.deepcopy(model)
    reference.set_experts_implementation("eager")
    model.set_experts_implementation("tritonmoe")
    assert model.config._experts_implementation == "tritonmoe"
    ids = tokens(device)
    with torch.no_grad():
        assert_close_l2(model(ids).logits, reference(ids).logits, TOLERANCE[FLOAT_DTYPE])
    assert spy == [FLOAT_DTYPE] * 2  # one call per layer


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_experts_implementation_fp8(name, device, spy):
    """FP8Experts through "tritonmoe" (DeepSeek's shared expert left in float: transformers'
    FP8Linear needs a Hub kernel)."""
    model, reference = fp8_pair(name, device, skip=(r".*self_attn", "lm_head", r".*shared_experts"))
    model.set_experts_implementation("tritonmoe")
    ids = tokens(device)
    with torch.no_grad():
        assert_close_l2(model(ids).logits, reference(ids).logits, FP8_TOL)
    assert spy == [torch.float8_e4m3fn] * 2


def test_from_pretrained_experts_implementation(tmp_path, device, spy):
    """The documented way in: from_pretrained(..., experts_implementation="tritonmoe")."""
    model = float_model("qwen3_moe", FLOAT_DTYPE, device)
    model.save_pretrained(tmp_path)
    loaded = Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=FLOAT_DTYPE,
                                                 experts_implementation="tritonmoe").to(device)
    assert loaded.config._experts_implementation == "tritonmoe"
    ids = tokens(device, batch=1)
    with torch.no_grad():
        assert_close_l2(loaded(ids).logits, model(ids).logits, TOLERANCE[FLOAT_DTYPE])
    assert len(spy) == 2


def test_registered_in_both_interfaces():
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["tritonmoe"] is hf_experts.tritonmoe_experts_forward
    assert ALL_FP8_EXPERTS_FUNCTIONS["tritonmoe"] is hf_experts.tritonmoe_fp8_experts_forward


@pytest.mark.parametrize("option, match", [
    (dict(block_size=(64, 64)), r"experts\.block_size=\(64, 64\) is not supported"),
    (dict(activation_scheme="static"), r"experts\.activation_scheme='static' is not supported"),
], ids=["block_size", "static_activations"])
def test_unsupported_fp8_options_are_refused(option, match, device):
    model, _ = fp8_pair("qwen3_moe", device, **option)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(Qwen3MoeSparseMoeBlock\): " + match):
        patch_hf_model(model)
    assert not any(isinstance(layer.mlp, PatchedMoEBlock) for layer in model.model.layers)
    with pytest.raises(ValueError, match=match):
        FusedMoE.from_hf(model.model.layers[1].mlp)
    model.set_experts_implementation("tritonmoe")
    x = torch.randn(3, HIDDEN, device=device, dtype=DTYPE)
    ids = torch.zeros(3, 2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=r"FP8Experts \(experts_implementation='tritonmoe'\): " + match):
        model.model.layers[0].mlp.experts(x, ids, torch.rand(3, 2, device=device))


def test_ue8m0_scales_are_refused(device):
    model, _ = fp8_pair("qwen3_moe", device)
    experts = model.model.layers[0].mlp.experts
    experts.down_proj_scale_inv = nn.Parameter(
        torch.exp2(torch.log2(experts.down_proj_scale_inv).ceil()).to(torch.float8_e8m0fnu),
        requires_grad=False)
    with pytest.raises(ValueError, match="down_proj_scale_inv is torch.float8_e8m0fnu.*ue8m0"):
        FusedMoE.from_hf(model.model.layers[0].mlp)
    assert math.isfinite(experts.gate_up_proj_scale_inv.float().sum().item())


def mixtral_experts(device, **attrs):
    """transformers' MixtralExperts (the plain SwiGLU every float experts path converts),
    random, with ``attrs`` set on it."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    experts = MixtralExperts(MixtralConfig(hidden_size=64, intermediate_size=32,
                                           num_local_experts=4)).to(device)
    with torch.no_grad():
        for weight in experts.parameters():
            weight.normal_(0.0, 1.0 / math.sqrt(weight.shape[-1]))
    for name, value in attrs.items():
        experts._modules.pop(name, None)  # a function in place of a submodule
        setattr(experts, name, value)
    return experts


def test_experts_that_gate_their_own_way_are_refused(device):
    """A class with its own ``_apply_gate`` (DeepSeek-V4's, gpt-oss's and others' clamped
    SwiGLU) or no ``act_fn`` is refused by name, never computed as a plain SwiGLU."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    class ClampedExperts(MixtralExperts):
        def _apply_gate(self, gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate.clamp(max=1.0)) * up.clamp(-1.0, 1.0)

    experts = mixtral_experts(device)
    experts.__class__ = ClampedExperts
    x, ids = torch.randn(3, 64, device=device), torch.zeros(3, 2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=r"ClampedExperts\._apply_gate .* is not supported"):
        hf_experts.tritonmoe_experts_forward(experts, x, ids, torch.rand(3, 2, device=device))
    no_act = mixtral_experts(device)
    del no_act.act_fn
    with pytest.raises(ValueError, match=r"the experts have no act_fn"):
        hf_experts.tritonmoe_experts_forward(no_act, x, ids, torch.rand(3, 2, device=device))


def test_torch_silu_as_the_experts_activation(device):
    """Some models hold ``torch.nn.functional.silu`` itself (LFM2-MoE): the same SwiGLU."""
    experts = mixtral_experts(device, act_fn=nn.functional.silu)
    x = torch.randn(5, 64, device=device)
    weights, ids = torch.rand(5, 2, device=device), torch.randperm(4, device=device)[:2].repeat(5, 1)
    with torch.no_grad():
        out = hf_experts.tritonmoe_experts_forward(experts, x, ids, weights)
    expected = fused_experts_reference(x, weights, ids.int(), experts.gate_up_proj, experts.down_proj)
    assert_close_l2(out, expected, TOLERANCE[torch.float32])


@pytest.mark.parametrize("attr", ["limit", "swiglu_limit", "gate_softcap"])
def test_fp8_experts_with_a_clamped_or_capped_gate_are_refused(attr, device):
    """FP8Experts' own gate clamps (DeepSeek-V4's ``limit``) or soft-caps when these are set."""
    model, _ = fp8_pair("qwen3_moe", device)
    experts = model.model.layers[0].mlp.experts
    setattr(experts, attr, 10.0)
    model.set_experts_implementation("tritonmoe")
    x = torch.randn(3, HIDDEN, device=device, dtype=DTYPE)
    ids = torch.zeros(3, 2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=rf"experts\.{attr}=10\.0 is not supported"):
        experts(x, ids, torch.rand(3, 2, device=device))
