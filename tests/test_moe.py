"""Gemma 4's MoE feed-forward block equals transformers' Gemma4 decoder layer (random weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geode.config import ConfigError
from geode.model.moe import HF_KEYS, MoEBlock, MoEConfig, expert_load, init_moe_
from geode.train.objectives.balance import load_balancing_loss

CONFIGS = {
    "e8-top3-tanh": dict(num_experts=8, top_k_experts=3, hidden_activation="gelu_pytorch_tanh"),
    "e4-top1-gelu": dict(num_experts=4, top_k_experts=1, hidden_activation="gelu"),
}
SIZES = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, rms_norm_eps=1e-6)


class NoAttention(nn.Module):
    """Stands in for Gemma4TextAttention: adds nothing, so the layer's output is x + FFN(x)."""

    def forward(self, hidden_states, **kwargs):
        return torch.zeros_like(hidden_states), None


def hf_layer(seed: int, **moe):
    """transformers' Gemma4TextDecoderLayer with the MoE block, every parameter randomised."""
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer

    config = Gemma4TextConfig(
        vocab_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, global_head_dim=16, layer_types=["full_attention"],
        hidden_size_per_layer_input=0, enable_moe_block=True, **SIZES, **moe,
    )  # fmt: skip
    config._experts_implementation = "eager"
    layer = Gemma4TextDecoderLayer(config, 0).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name or "scale" in name:  # multiplicative scales around 1
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name == "router.proj.weight":  # sharp enough that routing differs per token
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    layer.self_attn = NoAttention()
    return config, layer


def geode_block(layer) -> MoEBlock:
    """A MoEBlock loaded, key for key (HF_KEYS), from the transformers layer."""
    c = layer.config
    block = MoEBlock(MoEConfig.from_hf(c.to_dict()))
    hf_state = layer.state_dict()
    block.load_state_dict({ours: hf_state[theirs] for ours, theirs in HF_KEYS.items()}, strict=True)
    return block


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_matches_transformers_forward_and_backward(name):
    config, layer = hf_layer(seed=len(name), **CONFIGS[name])
    block = geode_block(layer)
    x = torch.randn(2, 7, SIZES["hidden_size"], generator=torch.Generator().manual_seed(5))
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = layer(x_hf)
    out = block(x_ours)
    got = x_ours + out.hidden
    assert (got - expected).abs().max().item() <= 1e-5
    # Routing really sends tokens to different experts (else the test could not catch a mix-up).
    assert (out.expert_load > 0).sum().item() >= min(3, config.num_experts)

    weight = torch.randn(expected.shape, generator=torch.Generator().manual_seed(6))
    (expected * weight).sum().backward()
    (got * weight).sum().backward()
    assert (x_ours.grad - x_hf.grad).abs().max().item() <= 1e-5
    hf_params = dict(layer.named_parameters())
    for ours, theirs in HF_KEYS.items():
        g_ours, g_hf = dict(block.named_parameters())[ours].grad, hf_params[theirs].grad
        assert g_ours is not None and g_hf is not None, ours
        scale = max(1.0, g_hf.abs().max().item())  # gradients reach ~5: float32 sums, relative
        assert (g_ours - g_hf).abs().max().item() <= 1e-5 * scale, ours


def test_bfloat16_matches_transformers():
    _, layer = hf_layer(seed=1, **CONFIGS["e8-top3-tanh"])
    block = geode_block(layer).to(torch.bfloat16)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(2, 7, SIZES["hidden_size"], generator=torch.Generator().manual_seed(8))
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
        out = block(x)
    assert out.hidden.dtype == torch.bfloat16 and out.router_logits.dtype == torch.bfloat16
    err = ((x + out.hidden).float() - expected.float()).abs().max().item()
    assert err <= 2**-7 * expected.abs().max().item()  # one bfloat16 rounding step at most


def test_router_matches_transformers_and_reports_load():
    config, layer = hf_layer(seed=3, **CONFIGS["e8-top3-tanh"])
    block = geode_block(layer)
    x = torch.randn(40, SIZES["hidden_size"], generator=torch.Generator().manual_seed(7))
    probs, weights, experts = layer.router(x)
    ours = block.router(x)
    assert torch.equal(ours.experts, experts)
    assert (ours.weights - weights).abs().max().item() <= 1e-6
    assert (torch.softmax(ours.logits, -1) - probs).abs().max().item() <= 1e-6
    load = expert_load(ours.experts, config.num_experts)
    assert load.sum().item() == pytest.approx(1.0)
    assert torch.equal(load * experts.numel(), torch.bincount(experts.reshape(-1), minlength=8))
    # The block returns the pre-softmax logits of all B*T tokens for the balancing loss.
    out = block(x[None])
    assert torch.equal(out.router_logits, ours.logits)
    assert torch.equal(out.expert_load, load)


def test_block_logits_feed_the_balancing_loss():
    _, layer = hf_layer(seed=4, **CONFIGS["e8-top3-tanh"])
    block = geode_block(layer)
    x = torch.randn(2, 5, SIZES["hidden_size"], requires_grad=True)
    out = block(x)
    loss = load_balancing_loss([out.router_logits], num_experts=8, top_k=3)
    loss.backward()
    assert block.router.proj.weight.grad.abs().sum() > 0


def test_init_matches_transformers_conventions():
    block = MoEBlock(MoEConfig(32, 48, 24, num_experts=4, top_k_experts=2))
    init_moe_(block, std=0.02, generator=torch.Generator().manual_seed(0))
    assert torch.equal(block.router.scale, torch.ones(32))
    assert torch.equal(block.router.per_expert_scale, torch.ones(4))
    assert torch.equal(block.post_feedforward_layernorm_2.weight, torch.ones(32))
    assert block.router.norm.weight is None  # scale-free
    assert 0.015 < block.experts.gate_up_proj.std().item() < 0.025


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"top_k_experts \(9\) is larger than num_experts \(8\)"):
        MoEConfig(32, 48, 24, num_experts=8, top_k_experts=9)
    with pytest.raises(ConfigError, match="num_experts must be a positive integer"):
        MoEConfig(32, 48, 24, num_experts=0, top_k_experts=1)
    with pytest.raises(ConfigError, match="hidden_activation 'relu'"):
        MoEConfig(32, 48, 24, num_experts=4, top_k_experts=1, hidden_activation="relu")
    with pytest.raises(ConfigError, match="cfg.json: enable_moe_block is true but top_k_experts"):
        MoEConfig.from_hf(
            {"enable_moe_block": True, "num_experts": 4, "moe_intermediate_size": 8}, "cfg.json"
        )
    with pytest.raises(ConfigError, match=r"cfg.json: MoEConfig.top_k_experts \(5\)"):
        MoEConfig.from_hf(
            {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 5,
             "moe_intermediate_size": 8}, "cfg.json",
        )  # fmt: skip


def test_parameter_counts_match_the_module():
    config = MoEConfig(32, 48, 24, num_experts=8, top_k_experts=3)
    block = MoEBlock(config)
    total, active = config.params()
    assert total == sum(p.numel() for p in block.parameters())
    assert total - active == 5 * 3 * 32 * 24  # five idle experts per token


# ---------------------------------------------------------------- load-balancing loss
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_balancing_loss_equals_transformers(masked, dtype):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(11)
    layers = tuple((2.0 * torch.randn(3 * 5, 8, generator=g)).to(dtype) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]) if masked else None
    ours_in = [x.clone().requires_grad_() for x in layers]
    hf_in = tuple(x.clone().requires_grad_() for x in layers)
    got = load_balancing_loss(ours_in, num_experts=8, top_k=2, attention_mask=mask)
    expected = load_balancing_loss_func(hf_in, num_experts=8, top_k=2, attention_mask=mask)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)
    got.backward()
    expected.backward()
    for a, b in zip(ours_in, hf_in, strict=True):
        assert (a.grad.float() - b.grad.float()).abs().max().item() <= 1e-6


def test_balancing_loss_of_a_uniform_router_is_k():
    logits = [torch.zeros(10, 4), torch.zeros(10, 4)]
    assert load_balancing_loss(logits, num_experts=4, top_k=3).item() == pytest.approx(3.0)


def test_balancing_loss_errors():
    with pytest.raises(ValueError, match="top_k=5 must be in 1..num_experts=4"):
        load_balancing_loss([torch.zeros(3, 4)], num_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"router_logits\[1\] has shape \(3, 5\)"):
        load_balancing_loss([torch.zeros(3, 4), torch.zeros(3, 5)], num_experts=4, top_k=1)
    with pytest.raises(ValueError, match="attention_mask has 4 entries"):
        load_balancing_loss([torch.zeros(3, 4)], 4, 1, attention_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="no router logits"):
        load_balancing_loss([], num_experts=4, top_k=1)
