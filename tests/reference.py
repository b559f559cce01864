"""Builders of tiny random-weight transformers Gemma 3 models: the reference in parity tests."""

from __future__ import annotations

from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def randomize_(model: torch.nn.Module, seed: int = 0, norm_std: float = 0.3) -> torch.nn.Module:
    """Randomise every parameter, the zero-initialised (1+w) norm weights included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = norm_std if "norm" in name else 0.05
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def hf_text_config(**overrides):
    """A tiny transformers Gemma3TextConfig (eager attention) with overrides."""
    from transformers import Gemma3TextConfig

    kwargs = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        sliding_window=5,
        query_pre_attn_scalar=20,
        max_position_embeddings=256,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return Gemma3TextConfig(**kwargs)


def hf_causal_lm(seed: int = 0, **overrides):
    """A random-weight transformers Gemma3ForCausalLM in eval mode."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    return randomize_(Gemma3ForCausalLM(hf_text_config(**overrides)), seed).eval()
