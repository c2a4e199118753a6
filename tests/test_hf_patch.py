"""The Hugging Face drop-in against transformers' own blocks and models (no download)."""
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (DeepseekV3Config, MixtralConfig, MixtralForCausalLM,  # noqa: E402
                          Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

from helpers import (ALLOW_NON_FINITE, TOLERANCE, assert_close_l2, assert_rows_unchanged,  # noqa: E402
                     drop_routing_near_ties, skip_bf16_on_cpu)
from moe_ops.hf_patch import PatchedMoEBlock, patch_hf_model  # noqa: E402
from moe_ops.module import FusedMoE  # noqa: E402

HIDDEN = 64
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


# Small configs of each supported block. Standalone blocks start with zero router
# weights (and a zero DeepSeek bias), so `randomize_` redraws everything.
def mixtral_block(**overrides):
    return MixtralSparseMoeBlock(MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        **overrides))


def qwen2_moe_block(norm_topk_prob=False, **overrides):
    return Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob, **overrides))


def qwen3_moe_block(norm_topk_prob=True, **overrides):
    return Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=norm_topk_prob, **overrides))


def deepseek_v3_block(norm_topk_prob=True, **overrides):
    return DeepseekV3MoE(DeepseekV3Config(
        hidden_size=HIDDEN, moe_intermediate_size=32, n_routed_experts=16, n_group=4,
        topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5, n_shared_experts=2,
        norm_topk_prob=norm_topk_prob, **overrides))


BLOCKS = {
    "mixtral": mixtral_block,
    "qwen2_moe": qwen2_moe_block,
    "qwen2_moe-norm": lambda: qwen2_moe_block(norm_topk_prob=True),
    "qwen3_moe": qwen3_moe_block,
    "qwen3_moe-no-norm": lambda: qwen3_moe_block(norm_topk_prob=False),
    "deepseek_v3": deepseek_v3_block,
    "deepseek_v3-no-norm": lambda: deepseek_v3_block(norm_topk_prob=False),
}


@torch.no_grad()
def randomize_(block: nn.Module) -> nn.Module:
    """Every weight ~ N(0, 1/fan_in) so outputs are O(1); DeepSeek's bias ~ N(0, 0.1^2)."""
    for weight in block.parameters():
        weight.normal_(0.0, 1.0 / math.sqrt(weight.shape[-1]))
    bias = getattr(block.gate, "e_score_correction_bias", None)
    if bias is not None:
        bias.normal_(0.0, 0.1)
    return block.eval()


def make_block(name, device, dtype=torch.float32):
    block = randomize_(BLOCKS[name]()).to(device=device, dtype=dtype)
    if hasattr(block.gate, "e_score_correction_bias"):  # the models keep it in fp32
        block.gate.e_score_correction_bias = block.gate.e_score_correction_bias.float()
    return block


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_parity(name, dtype, device):
    """from_hf and the patched block both reproduce the transformers block."""
    skip_bf16_on_cpu(dtype, device)
    block = make_block(name, device, dtype)
    x = torch.randn(2, 7, HIDDEN, device=device, dtype=dtype)
    if dtype != torch.float32 and not name.startswith("deepseek"):  # DeepSeek routes in fp32
        x = torch.randn(256, HIDDEN, device=device, dtype=dtype)
        x = drop_routing_near_ties(x, block.gate.weight, block.gate.top_k)[:14].reshape(2, 7, -1)
    with torch.no_grad():
        expected = block(x)
        converted = FusedMoE.from_hf(block)
        assert_close_l2(converted(x), expected, TOLERANCE[dtype])

        holder = nn.ModuleDict({"mlp": block})
        assert patch_hf_model(holder) == 1
        patched = holder["mlp"]
        assert isinstance(patched, PatchedMoEBlock)
        out = patched(x)
    assert type(out) is type(expected)  # same return convention (a plain tensor in 5.x)
    assert_close_l2(out, expected, TOLERANCE[dtype])


def test_from_hf_reads_routing_and_copies(device):
    block = make_block("deepseek_v3", device)
    moe = FusedMoE.from_hf(block)
    c = moe.config
    assert (c.num_experts, c.top_k, c.scoring, c.n_group, c.topk_group) == (16, 4, "sigmoid", 4, 2)
    assert c.routed_scaling_factor == 2.5 and c.renormalize and c.score_bias
    assert c.shared_intermediate_size == 64 and not c.shared_gated
    torch.testing.assert_close(moe.score_bias, block.gate.e_score_correction_bias)
    torch.testing.assert_close(moe.w_gate_up, block.experts.gate_up_proj.detach())
    # A copy: later changes to the block do not reach the converted module.
    with torch.no_grad():
        block.experts.gate_up_proj.zero_()
    assert moe.w_gate_up.abs().sum() > 0


# Whole tiny models: 2 layers, hidden 64, vocab 128. initializer_range = 1/sqrt(hidden)
# so the MoE layers carry real weight in the logits.
COMMON = dict(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.125,
              num_experts_per_tok=2, pad_token_id=0)
MODELS = {
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(
        intermediate_size=32, num_local_experts=8, **COMMON)),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, **COMMON)),
}


def greedy(model, ids):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                          min_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_whole_model_logits_and_generate(name, device):
    model = MODELS[name]().to(device).eval()
    ids = torch.randint(1, 128, (2, 6), device=device)
    with torch.no_grad():
        expected_logits = model(ids).logits
    expected_tokens = greedy(model, ids)

    assert patch_hf_model(model) == 2
    assert all(isinstance(layer.mlp, PatchedMoEBlock) for layer in model.model.layers)
    with torch.no_grad():
        assert_close_l2(model(ids).logits, expected_logits, TOLERANCE[torch.float32])
    tokens = greedy(model, ids)
    assert tokens.shape == (2, 6 + 8)
    assert torch.equal(tokens, expected_tokens)


def test_patched_blocks_compile_fullgraph(device):
    torch._dynamo.reset()
    model = MODELS["mixtral"]().to(device).eval()
    ids = torch.randint(1, 128, (2, 6), device=device)
    x = torch.randn(2, 6, HIDDEN, device=device)
    with torch.no_grad():
        expected_block = model.model.layers[0].mlp(x)
    expected_tokens = greedy(model, ids)

    patch_hf_model(model)
    for layer in model.model.layers:
        layer.mlp.compile(fullgraph=True)
    with torch.no_grad():
        assert_close_l2(model.model.layers[0].mlp(x), expected_block, TOLERANCE[torch.float32])
    assert torch.equal(greedy(model, ids), expected_tokens)  # prefill and decode shapes


@pytest.mark.parametrize("class_name, router", [("ToySparseMoeBlock", "gate"), ("ToyMLP", "router")])
def test_refusal_leaves_model_unchanged(class_name, router):
    """An MoE block this package does not know: by its name, or (gpt-oss's ``GptOssMLP``,
    Aria's, Gemma 4's decoder layer) by the experts it holds."""
    def __init__(self):
        nn.Module.__init__(self)
        setattr(self, router, nn.Linear(HIDDEN, 4, bias=False))
        self.experts = nn.Linear(HIDDEN, HIDDEN)

    block = type(class_name, (nn.Module,), {"__init__": __init__})()
    first = mixtral_block()
    model = nn.ModuleDict({"a": first, "b": nn.ModuleDict({"mlp": block})})
    with pytest.raises(TypeError, match=rf"b\.mlp .*{class_name}\): unsupported MoE block"):
        patch_hf_model(model)
    assert model["a"] is first


def test_subclass_of_supported_block_is_refused():
    class MyMixtralBlock(MixtralSparseMoeBlock):
        pass

    block = MyMixtralBlock(MixtralConfig(hidden_size=HIDDEN, intermediate_size=32))
    with pytest.raises(TypeError, match="MyMixtralBlock: unsupported MoE block type"):
        FusedMoE.from_hf(block)


def test_lone_block_is_refused_by_patch():
    with pytest.raises(TypeError, match="is itself an MoE block.*FusedMoE.from_hf"):
        patch_hf_model(mixtral_block())


@pytest.mark.parametrize("make, match", [
    (lambda: mixtral_block(hidden_act="gelu"), "activation GELUActivation is not supported"),
    (lambda: qwen2_moe_block(hidden_act="relu"), "activation ReLU.* is not supported"),
    (lambda: deepseek_v3_block(topk_method="greedy"), "topk_method='greedy' is not supported"),
    (lambda: deepseek_v3_block(scoring_func="softmax"), "scoring_func='softmax' is not supported"),
], ids=["mixtral-gelu", "qwen2-relu", "deepseek-topk_method", "deepseek-scoring_func"])
def test_unsupported_options_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        FusedMoE.from_hf(make())


def test_deepseek_bad_groups_are_refused():
    block = deepseek_v3_block()
    block.gate.num_group = 3  # 16 experts do not split into 3 groups
    with pytest.raises(ValueError, match="n_group=3 must be a positive int dividing "
                                         "n_routed_experts=16"):
        FusedMoE.from_hf(block)


def test_mixtral_jitter_in_training_is_refused(device):
    block = mixtral_block(router_jitter_noise=0.1).train()
    with pytest.raises(ValueError, match="router_jitter_noise=0.1 in training mode"):
        FusedMoE.from_hf(block)
    # In eval mode the jitter is inert and the block converts; training later is refused.
    holder = nn.ModuleDict({"mlp": randomize_(block).to(device)})
    assert patch_hf_model(holder) == 1
    holder.train()
    with pytest.raises(RuntimeError, match="router_jitter_noise=0.1 in training mode"):
        holder["mlp"](torch.randn(1, 2, HIDDEN, device=device))


def test_output_router_logits_is_refused():
    config = MixtralConfig(output_router_logits=True, intermediate_size=32, num_local_experts=8,
                           **{k: v for k, v in COMMON.items() if k != "initializer_range"})
    with pytest.raises(ValueError, match="output_router_logits=True is not supported"):
        patch_hf_model(MixtralForCausalLM(config))


@ALLOW_NON_FINITE
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_patched_block_non_finite_token(name, device):
    """Like transformers' block, a NaN token gets a non-finite row; the others keep theirs."""
    block = make_block(name, device)
    holder = nn.ModuleDict({"mlp": block})
    for lead in [(1, 5), (3, 7)]:  # the decode and the token-block routing paths
        clean = torch.randn(*lead, HIDDEN, device=device)
        x = clean.clone()
        x[0, 2, 5] = float("nan")
        others = torch.ones(lead, dtype=torch.bool, device=device)
        others[0, 2] = False
        with torch.no_grad():
            expected = block(x)
            patch_hf_model(holder)
            out, out_clean = holder["mlp"](x), holder["mlp"](clean)
        holder["mlp"] = block
        assert not torch.isfinite(expected[0, 2]).any()
        assert not torch.isfinite(out[0, 2]).any()
        assert_rows_unchanged(out[others], out_clean[others])
        assert_close_l2(out[others], expected[others], TOLERANCE[torch.float32])


def test_patching_twice_changes_nothing(device):
    model = MODELS["mixtral"]().to(device).eval()
    ids = torch.randint(1, 128, (1, 6), device=device)
    assert patch_hf_model(model) == 2
    patched = [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        logits = model(ids).logits
        assert patch_hf_model(model) == 0
        assert [layer.mlp for layer in model.model.layers] == patched  # the same modules
        assert torch.equal(model(ids).logits, logits)


def test_training_layers_before_a_patched_block_names_the_missing_input_gradient(device):
    """Attention trains, the patched experts are frozen: backward fails with an error that
    says input gradients are missing (not the untrue advice to freeze the MoE weights)."""
    model = MODELS["mixtral"]().to(device).train()
    patch_hf_model(model)
    assert not any(p.requires_grad for layer in model.model.layers for p in layer.mlp.parameters())
    ids = torch.randint(1, 128, (1, 6), device=device)
    loss = model(ids, labels=ids).loss
    with pytest.raises(RuntimeError, match="input hidden_states are not implemented") as error:
        loss.backward()
    assert "requires_grad=False" not in str(error.value)
