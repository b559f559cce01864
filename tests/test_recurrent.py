"""Griffin's recurrent block equals transformers' RecurrentGemmaRecurrentBlock (random weights)."""

from __future__ import annotations

import pytest
import torch

from geode.config import ConfigError
from geode.model.recurrent import HF_KEYS, RecurrentBlock, RecurrentConfig

# lru_width equal to and different from hidden (wider and narrower), several heads.
CONFIGS = {
    "lru-eq-hidden": dict(hidden_size=32, num_attention_heads=4, lru_width=None),
    "lru-wider": dict(hidden_size=32, num_attention_heads=4, lru_width=48),
    "lru-narrower-gelu": dict(
        hidden_size=48, num_attention_heads=2, lru_width=16, hidden_activation="gelu"
    ),
}
T = 11


def hf_block(seed: int, **overrides):
    """transformers' RecurrentGemmaRecurrentBlock, every parameter randomised."""
    from transformers import RecurrentGemmaConfig
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import (
        RecurrentGemmaRecurrentBlock,
    )

    config = RecurrentGemmaConfig(vocab_size=64, num_hidden_layers=3, **overrides)
    block = RecurrentGemmaRecurrentBlock(config, 0).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name == "rg_lru.recurrent_param":  # a in [0.5, 0.999]: long and short memories
                a = 0.5 + 0.499 * torch.rand(p.shape, generator=g)
                p.copy_(torch.log(1 / a - 1))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return config, block


def geode_block(config, hf) -> RecurrentBlock:
    """Our block (config from the HF config's dict) loaded key for key (HF_KEYS) from hf's."""
    block = RecurrentBlock(RecurrentConfig.from_hf(config.to_dict()))
    state = hf.state_dict()
    block.load_state_dict({ours: state[theirs] for ours, theirs in HF_KEYS.items()}, strict=True)
    return block


def make(name: str, seed: int = 0):
    config, hf = hf_block(seed, **CONFIGS[name])
    return config, hf, geode_block(config, hf)


def inputs(config, batch: int = 2, t: int = T, seed: int = 1) -> torch.Tensor:
    """Random block inputs (B, T, d)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, t, config.hidden_size, generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sequence_matches_transformers_forward_and_backward(name):
    config, hf, ours = make(name, seed=len(name))
    x = inputs(config)
    pos = torch.arange(T).expand(2, T)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, _ = hf(x_hf, pos, None, use_cache=False)
    got, state = ours(x_ours, pos)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
    assert state.lru.dtype == torch.float32
    assert state.conv.shape == (2, config.lru_width, config.conv1d_width - 1)

    w = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    (expected * w).sum().backward()
    (got * w).sum().backward()
    assert (x_ours.grad - x_hf.grad).abs().max().item() <= 1e-5
    theirs = dict(hf.named_parameters())
    for key, p in ours.named_parameters():
        scale = max(1.0, theirs[HF_KEYS[key]].grad.abs().max().item())
        assert (p.grad - theirs[HF_KEYS[key]].grad).abs().max().item() <= 1e-5 * scale, key


@pytest.mark.parametrize("name", ["lru-eq-hidden", "lru-wider"])
def test_decode_matches_transformers_cache(name):
    """Prefill 5 tokens, then decode one at a time: transformers' cache path vs our state."""
    config, hf, ours = make(name, seed=7)
    x = inputs(config, t=T)
    pos = torch.arange(T).expand(2, T)
    with torch.no_grad():
        expected = [hf(x[:, :5], pos[:, :5], None, use_cache=True)[0]]
        got_prefill, state = ours(x[:, :5], pos[:, :5])
        got = [got_prefill]
        for t in range(5, T):
            expected.append(hf(x[:, t : t + 1], pos[:, t : t + 1], None, use_cache=True)[0])
            y, state = ours(x[:, t : t + 1], pos[:, t : t + 1], state)
            got.append(y)
    err = (torch.cat(got, 1) - torch.cat(expected, 1)).abs().max().item()
    assert err <= 1e-5
    assert (state.lru - hf.rg_lru.recurrent_states).abs().max().item() <= 1e-5
    assert (state.conv - hf.conv1d_state).abs().max().item() <= 1e-5


def test_all_at_once_equals_one_at_a_time_and_any_chunks():
    config, _, ours = make("lru-wider", seed=3)
    x = inputs(config, t=T)
    pos = torch.arange(T).expand(2, T)
    with torch.no_grad():
        full, full_state = ours(x, pos)
        for chunks in ([1] * T, [3, 1, 4, 2, 1], [2, 9]):
            state, outs, start = None, [], 0
            for n in chunks:
                y, state = ours(x[:, start : start + n], pos[:, start : start + n], state)
                outs.append(y)
                start += n
            assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-5, chunks
            assert (state.lru - full_state.lru).abs().max().item() <= 1e-5
            # linear_x rounds differently for other T (matmul blocking), hence not bit-equal
            assert (state.conv - full_state.conv).abs().max().item() <= 1e-5


def test_state_is_constant_size():
    config, _, ours = make("lru-eq-hidden")
    x = inputs(config, batch=1, t=64)
    pos = torch.arange(64)[None]
    with torch.no_grad():
        _, state = ours(x[:, :1], pos[:, :1])
        first = state.nbytes
        for t in range(1, 64):
            _, state = ours(x[:, t : t + 1], pos[:, t : t + 1], state)
    width = config.lru_width
    assert state.nbytes == first == width * (config.conv1d_width - 1) * 4 + width * 4


def test_reset_at_position_zero_matches_transformers():
    """Packed rows: a second document starts mid-row (position 0) and the recurrence restarts."""
    config, hf, ours = make("lru-wider", seed=5)
    x = inputs(config)
    pos = torch.cat([torch.arange(4), torch.arange(T - 4)])[None].expand(2, T).clone()
    pos[1] = torch.arange(20, 20 + T)  # no reset in row 1 (a continuation)
    with torch.no_grad():
        expected, _ = hf(x, pos, None, use_cache=False)
        got, _ = ours(x, pos)
        no_reset, _ = ours(x, pos + 1)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got[0, 4:] - no_reset[0, 4:]).abs().max().item() > 1e-3  # the reset matters
    assert torch.equal(got[1], no_reset[1])


def test_bfloat16_matches_transformers_and_accumulates_in_float32():
    config, hf, ours = make("lru-wider", seed=2)
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    x = inputs(config).to(torch.bfloat16)
    pos = torch.arange(T).expand(2, T)
    with torch.no_grad():
        expected, _ = hf(x, pos, None, use_cache=False)
        y, state = ours(x, pos)
    assert y.dtype == torch.bfloat16 and state.conv.dtype == torch.bfloat16
    assert state.lru.dtype == torch.float32
    # The same operations in the same dtypes; only matmul blocking differs (transformers'
    # scan output is strided): at most a bfloat16 rounding step of the largest value.
    err = (y.float() - expected.float()).abs().max().item()
    assert err <= 2**-7 * expected.abs().max().item()


def test_config_and_state_errors():
    with pytest.raises(ConfigError, match=r"num_attention_heads \(3\) does not divide lru_width"):
        RecurrentConfig(hidden_size=36, num_attention_heads=3, lru_width=32)
    with pytest.raises(ConfigError, match=r"num_attention_heads \(5\) does not divide hidden_size"):
        RecurrentConfig(hidden_size=32, num_attention_heads=5, lru_width=40)
    with pytest.raises(ConfigError, match="cfg.json: RecurrentConfig.conv1d_width"):
        RecurrentConfig.from_hf({"hidden_size": 8, "num_attention_heads": 2, "conv1d_width": 0},
                                "cfg.json")  # fmt: skip
    assert RecurrentConfig(hidden_size=32, num_attention_heads=4).lru_width == 32
    block = RecurrentBlock(RecurrentConfig(hidden_size=16, num_attention_heads=2))
    state = block.initial_state(3)
    with pytest.raises(ValueError, match="state is for batch 3"):
        block(torch.zeros(2, 1, 16), torch.zeros(2, 1, dtype=torch.long), state)
