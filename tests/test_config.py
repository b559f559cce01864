"""ModelConfig validation, HF mapping and presets (published values, nano sizes)."""

from __future__ import annotations

import pytest

import geode
from geode.config import FULL, SLIDING, ConfigError, ModelConfig, get_preset
from geode.info import parameter_counts
from tests.reference import hf_text_config


def test_default_layer_pattern_is_five_local_one_global():
    cfg = get_preset("gemma3-1b")
    assert cfg.layer_types[:6] == (SLIDING,) * 5 + (FULL,)
    assert cfg.num_global_layers == 4 and cfg.num_local_layers == 22


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hidden_size", 0, "hidden_size must be a positive integer"),
        ("num_key_value_heads", 3, "multiple of num_key_value_heads"),
        ("head_dim", 7, "head_dim must be even"),
        ("layer_types", ("sliding_attention",), "layer_types has 1 entries"),
        ("layer_types", ("local",) * 26, "unknown types"),
        ("rope_scaling_factor", 0.5, "rope_scaling_factor must be >= 1"),
        ("final_logit_softcapping", -1.0, "final_logit_softcapping must be None or > 0"),
        ("hidden_activation", "relu", "hidden_activation 'relu' is not supported"),
        ("eos_token_id", 10**7, "eos_token_id=10000000 is outside the vocabulary"),
        ("family", "llama", "family 'llama' is unknown"),
    ],
)
def test_validation_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("gemma3-1b").replace(**{field: value})


def test_from_hf_matches_transformers_defaults_and_rope_layouts():
    """Legacy keys (rope_theta / rope_local_base_freq / rope_scaling) and transformers 5's
    rope_parameters give the same ModelConfig."""
    legacy = {
        "model_type": "gemma3_text", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 24, "vocab_size": 300, "sliding_window": 5,
        "rope_theta": 1e6, "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }  # fmt: skip
    a = ModelConfig.from_hf(legacy)
    b = ModelConfig.from_hf(
        hf_text_config(rope_scaling={"rope_type": "linear", "factor": 8.0}).to_dict()
    )
    assert a.rope_scaling_factor == b.rope_scaling_factor == 8.0
    assert (a.rope_theta, a.rope_local_base_freq) == (b.rope_theta, b.rope_local_base_freq)
    assert a.layer_types == b.layer_types
    assert a.query_pre_attn_scalar == 256 and a.max_position_embeddings == 131_072  # HF defaults


def test_from_hf_reads_multimodal_text_config():
    from transformers import Gemma3Config

    text = hf_text_config(num_hidden_layers=8, rope_scaling={"rope_type": "linear", "factor": 8.0})
    cfg = ModelConfig.from_hf(Gemma3Config(text_config=text).to_dict())
    assert cfg.num_hidden_layers == 8 and cfg.rope_scaling_factor == 8.0 and cfg.head_dim == 24


def test_from_hf_errors():
    with pytest.raises(ConfigError, match="unknown model_type 'llama'"):
        ModelConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match="'gemma3' needs a 'text_config'"):
        ModelConfig.from_hf({"model_type": "gemma3"})
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_hf({"model_type": "gemma3_text", "rope_scaling": {"rope_type": "yarn"}})


@pytest.mark.parametrize("name", ["gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b", "nano-5m"])
def test_to_hf_round_trips_through_transformers(name):
    from transformers import Gemma3TextConfig

    cfg = get_preset(name)
    hf = Gemma3TextConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    back = ModelConfig.from_hf(hf.to_dict())
    assert back.replace(name=cfg.name, extra={}) == cfg


# Gemma 3 Technical Report (arXiv:2503.19786), Table 1: non-embedding parameters (millions).
# Embedding parameters there are within 1% of vocab x hidden.
PUBLISHED_NON_EMBEDDING_M = {
    "gemma3-1b": 698,
    "gemma3-4b": 3209,
    "gemma3-12b": 10759,
    "gemma3-27b": 25600,
}
PUBLISHED_EMBEDDING_M = {"gemma3-1b": 302, "gemma3-4b": 675, "gemma3-12b": 1012, "gemma3-27b": 1416}


@pytest.mark.parametrize("name", list(PUBLISHED_NON_EMBEDDING_M))
def test_published_presets_match_report_parameter_counts(name):
    counts = parameter_counts(get_preset(name))
    assert counts["non_embedding"] / 1e6 == pytest.approx(
        PUBLISHED_NON_EMBEDDING_M[name], rel=0.002
    )
    assert counts["embedding"] / 1e6 == pytest.approx(PUBLISHED_EMBEDDING_M[name], rel=0.01)


def test_published_preset_facts():
    assert get_preset("gemma3-27b").query_pre_attn_scalar == 168
    assert get_preset("gemma3-27b").head_dim == 128
    for name in ("gemma3-4b", "gemma3-12b", "gemma3-27b"):
        cfg = get_preset(name)
        assert cfg.vocab_size == 262_208 and cfg.rope_scaling_factor == 8.0
        assert cfg.max_position_embeddings == 131_072 and cfg.sliding_window == 1024
    assert get_preset("gemma3-1b").vocab_size == 262_144


@pytest.mark.parametrize(
    "name,millions", [("nano-1m", 1), ("nano-5m", 5), ("nano-20m", 20), ("nano-60m", 60)]
)
def test_nano_presets_sizes_and_real_parameter_count(name, millions):
    cfg = get_preset(name)
    counts = parameter_counts(cfg)
    assert 0.8 * millions <= counts["total"] / 1e6 <= 1.25 * millions
    assert cfg.layer_types[5] == FULL and cfg.layer_types[:5] == (SLIDING,) * 5
    if millions <= 20:
        model = geode.build_model(cfg, seed=0)
        assert sum(p.numel() for p in model.parameters()) == counts["total"]


def test_unknown_preset_lists_known():
    with pytest.raises(KeyError, match="known presets: .*gemma3-1b"):
        get_preset("gemma3-2b")
