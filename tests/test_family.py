"""The family registry, Gemma 4 and RecurrentGemma decoders equal transformers (random weights,
every parameter and stored buffer randomised), load/save both ways, counts and bad input."""

from __future__ import annotations

import json

import pytest
import torch

import geode
from geode.checkpoint import CheckpointError, read_config
from geode.config import FULL, RECURRENT, SLIDING, ConfigError, ModelConfig, get_preset
from geode.family import FAMILY_SPECS, get_family, parameter_counts, state_bytes
from geode.model.transformer import Transformer

SEQ = 13  # longer than every attention window below
G4_BASE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
    sliding_window=4, max_position_embeddings=256, hidden_size_per_layer_input=0,
    layer_types=[SLIDING, SLIDING, FULL] * 2,
)  # fmt: skip
# MoE on/off, per-layer inputs on/off, kv sharing on/off, window 4 < 13 tokens in all.
G4_CONFIGS = {
    "moe-kvshare-softcap": dict(
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
        num_kv_shared_layers=2, final_logit_softcapping=30.0,
    ),
    "ple-keqv-doublewide-kvshare": dict(
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=128, attention_k_eq_v=True,
        num_global_key_value_heads=1, num_kv_shared_layers=3, use_double_wide_mlp=True,
    ),
    "dense-untied-rope": dict(
        tie_word_embeddings=False, global_head_dim=16,
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 100.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e4},
        },
    ),
}  # fmt: skip
RG_BASE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
    num_attention_heads=4, attention_window_size=4,
)  # fmt: skip
RG_CONFIGS = {
    "lru-equal-hidden": dict(),
    "lru-wider-gqa": dict(lru_width=48, num_key_value_heads=2, block_types=["recurrent", "attention"]),
    "lru-narrower-mqa-bias": dict(
        lru_width=16, num_key_value_heads=1, attention_bias=True, logits_soft_cap=5.0
    ),
}  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and the stored layer scalars: scales near 1, weights small, router sharp."""
    g = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters())
    tensors += [(n, b) for n, b in model.named_buffers() if n.endswith("layer_scalar")]
    gemma4 = "Gemma4" in type(model).__name__
    with torch.no_grad():
        for name, p in tensors:
            if gemma4 and ("norm" in name or "scale" in name or "layer_scalar" in name):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("router.proj.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                std = 0.3 if "norm" in name else (0.05 if gemma4 else 0.1)
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_gemma4(seed: int = 0, **overrides):
    """A random transformers Gemma4ForCausalLM (eager attention and experts)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(**{**G4_BASE, **overrides}, attn_implementation="eager")
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    return _randomize(Gemma4ForCausalLM(config), seed)


def hf_recurrent(seed: int = 0, **overrides):
    """A random transformers RecurrentGemmaForCausalLM (eager attention)."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    config = RecurrentGemmaConfig(**{**RG_BASE, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    return _randomize(RecurrentGemmaForCausalLM(config), seed)


def _ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(2))


def _reload(cls, path):
    """transformers' model from a directory geode wrote; every tensor must be found there."""
    model, info = cls.from_pretrained(path, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("name", list(G4_CONFIGS))
def test_gemma4_float32_logits_match_transformers_both_ways(name, tmp_path):
    from transformers import Gemma4ForCausalLM

    ref = hf_gemma4(seed=len(name), **G4_CONFIGS[name])
    ref.save_pretrained(tmp_path / "hf")
    model = geode.load_model(tmp_path / "hf")
    assert model.config.family == "gemma4" and model.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
        assert (got - expected).abs().max().item() <= 1e-4
        geode.save_model(model, tmp_path / "geode")
        back = _reload(Gemma4ForCausalLM, tmp_path / "geode")
        back.config._experts_implementation = "eager"
        assert torch.equal(back(ids).logits, expected)


@pytest.mark.parametrize("name", list(RG_CONFIGS))
def test_recurrent_gemma_float32_logits_match_transformers_both_ways(name, tmp_path):
    from transformers import RecurrentGemmaForCausalLM

    ref = hf_recurrent(seed=len(name), **RG_CONFIGS[name])
    ref.save_pretrained(tmp_path / "hf")
    model = geode.load_model(tmp_path / "hf")
    assert model.config.family == "recurrent_gemma"
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids, use_cache=False).logits
        got = model(ids)
        assert (got - expected).abs().max().item() <= 1e-4
        geode.save_model(model, tmp_path / "geode")
        back = _reload(RecurrentGemmaForCausalLM, tmp_path / "geode")
        assert torch.equal(back(ids, use_cache=False).logits, expected)


def test_recurrent_gemma_embedding_normaliser_is_bfloat16_rounded():
    """sqrt(2560) = 50.596 is stored by transformers as bfloat16 50.5 and used even in float32."""
    emb = geode.build_model(get_preset("recurrentgemma-nano"), seed=0).embed_tokens
    assert emb.scale_dtype == torch.bfloat16
    emb.scale = 2560**0.5
    torch.nn.init.ones_(emb.weight)
    assert emb(torch.tensor([[1]]))[0, 0, 0].item() == 50.5


# Published counts: Gemma 4 model card (google/gemma-4-26B-A4B: 25.2B total / 3.8B active,
# google/gemma-4-31B: 30.7B, google/gemma-4-E2B: 2.3B effective = without the per-layer
# embedding table); RecurrentGemma report (arXiv:2404.07839) Table 1: 2B 2.68B total / 0.65B
# embedding, 9B 8.58B / 1.05B.
PUBLISHED = {
    "gemma4-26b-a4b": {"total": 25.2e9, "active": 3.8e9},
    "gemma4-31b": {"total": 30.7e9},
    "recurrentgemma-2b": {"total": 2.68e9, "embedding": 0.65e9},
    "recurrentgemma-9b": {"total": 8.58e9, "embedding": 1.05e9},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_presets_match_the_published_counts(name):
    counts = parameter_counts(get_preset(name))
    for key, value in PUBLISHED[name].items():
        assert counts[key] == pytest.approx(value, rel=0.01), key


def test_gemma4_e2b_effective_parameters_exclude_the_per_layer_table():
    cfg = get_preset("gemma4-e2b")
    table = cfg.vocab_size_per_layer_input * cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
    assert parameter_counts(cfg)["total"] - table == pytest.approx(2.3e9, rel=0.01)


def test_registry_names_every_family_and_gemma3_stays_the_plain_transformer():
    assert set(FAMILY_SPECS) == {"gemma3", "gemma4", "recurrent_gemma"}
    assert get_family("gemma3").runner_paths == ("forward", "torch", "native")
    assert get_family("gemma4").runner_paths == ("forward", "torch")
    model = geode.build_model(get_preset("nano-1m"), seed=0)
    assert type(model) is Transformer and model.config.family == "gemma3"
    assert get_family("gemma4").fsdp_units(model) == list(model.layers)
    with pytest.raises(ConfigError, match="family 'llama' is unknown"):
        get_family("llama")


def test_gemma4_multimodal_checkpoint_layout_loads(tmp_path):
    """`Gemma4ForConditionalGeneration` keeps the decoder under model.language_model. and a
    `text_config`; the towers' tensors are left out."""
    from safetensors.torch import load_file, save_file

    model = geode.build_model(get_preset("gemma4-nano-moe"), seed=0)
    geode.save_model(model, tmp_path / "text")
    state = load_file(tmp_path / "text" / "model.safetensors")
    state = {k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}
    state["model.vision_tower.patch.weight"] = torch.zeros(2)
    state["model.embed_audio.proj.weight"] = torch.zeros(2)
    (tmp_path / "mm").mkdir()
    save_file(state, tmp_path / "mm" / "model.safetensors")
    text = json.loads((tmp_path / "text" / "config.json").read_text())
    wrapper = {"model_type": "gemma4", "text_config": text}
    (tmp_path / "mm" / "config.json").write_text(json.dumps(wrapper))
    loaded = geode.load_model(tmp_path / "mm")
    ids = torch.randint(0, 4096, (1, 9))
    with torch.no_grad():
        assert (loaded(ids) - model(ids)).abs().max().item() <= 1e-5  # same weights, new memory


def test_published_config_form_reads_global_head_dim_and_kv_heads():
    """The published config.json form (global_head_dim, num_global_key_value_heads) and the
    per_layer_config table transformers 5.25 writes give the same geode config."""
    from transformers import Gemma4TextConfig

    published = {
        "model_type": "gemma4_text", **G4_BASE, "attention_k_eq_v": True,
        "num_global_key_value_heads": 1, "hidden_size_per_layer_input": 0,
    }  # fmt: skip
    a = ModelConfig.from_hf(published)
    b = ModelConfig.from_hf(Gemma4TextConfig(**{**published, "model_type": None}).to_dict())
    assert a == b
    assert (a.global_head_dim, a.num_global_key_value_heads) == (32, 1)
    assert a.partial_rotary_factor == 0.25 and a.rope_theta == 1e6  # transformers' defaults


@pytest.mark.parametrize(
    "change,message",
    [
        ({"use_bidirectional_attention": "vision"}, "use_bidirectional_attention='vision' is not implemented"),
        ({"enable_moe_block": True, "num_experts": 2, "top_k_experts": 3, "moe_intermediate_size": 8},
         "top_k_experts \\(3\\) is larger than num_experts \\(2\\)"),
        ({"enable_moe_block": True, "num_experts": 2}, "enable_moe_block is True but top_k_experts is not set"),
        ({"rope_parameters": {FULL: {"rope_type": "yarn", "rope_theta": 1.0}}}, "'yarn' is not supported"),
        ({"num_kv_shared_layers": 6}, "num_kv_shared_layers must be in"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not implemented"),
    ],
)  # fmt: skip
def test_gemma4_bad_options_are_refused_by_name(change, message, tmp_path):
    cfg = {"model_type": "gemma4_text", **G4_BASE, **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        read_config(tmp_path)


def test_recurrent_heads_not_dividing_the_width_is_a_clear_error(tmp_path):
    cfg = {"model_type": "recurrent_gemma", **RG_BASE, "lru_width": 30}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"num_attention_heads \(4\) does not divide lru_width"
    ):
        read_config(tmp_path)


def test_family_fields_are_refused_in_another_family():
    with pytest.raises(ConfigError, match="num_experts=8 is a gemma4 option"):
        get_preset("nano-1m").replace(num_experts=8)
    with pytest.raises(ConfigError, match="'recurrent' layers need recurrent_gemma"):
        get_preset("nano-1m").replace(layer_types=(RECURRENT,) * 6)


@pytest.mark.parametrize("name", ["gemma4-nano-moe", "gemma4-nano-ple", "recurrentgemma-nano"])
def test_nano_presets_build_count_and_run(name):
    cfg = get_preset(name)
    model = geode.build_model(cfg, seed=0)
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.randint(0, cfg.vocab_size, (1, 9)))
    assert logits.shape == (1, 9, cfg.vocab_size) and torch.isfinite(logits).all()


def test_active_parameters_of_moe_presets_subtract_the_idle_experts():
    cfg = get_preset("gemma4-nano-moe")
    c = parameter_counts(cfg)
    idle = cfg.num_hidden_layers * (cfg.num_experts - cfg.top_k_experts)
    assert c["total"] - c["active"] == idle * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    dense = parameter_counts(get_preset("nano-1m"))
    assert dense["active"] == dense["total"]


def test_recurrent_state_is_constant_and_gemma3_state_is_the_kv_formula():
    from geode.infer.cache import kv_cache_bytes

    rg = get_preset("recurrentgemma-2b")
    recurrent_only = rg.replace(layer_types=tuple(RECURRENT for _ in rg.layer_types))
    assert state_bytes(recurrent_only, 10) == state_bytes(recurrent_only, 100_000) > 0
    assert state_bytes(rg, 4096) == state_bytes(rg, 100_000)  # attention windows are full
    g3 = get_preset("gemma3-1b")
    for n in (1, 600, 9000):
        assert state_bytes(g3, n) == kv_cache_bytes(g3, n, torch.bfloat16, ring_buffer=True)


def test_geode_info_prints_active_parameters_and_the_constant_recurrent_state(capsys):
    from geode.cli import main
    from geode.info import model_summary

    assert main(["info", "gemma4-26b-a4b"]) == 0
    out = capsys.readouterr().out
    assert "25.23 B total" in out and "active/token     3.82 B" in out
    s = model_summary(get_preset("recurrentgemma-2b"))
    rows = s["kv_cache"]
    assert rows["8K"]["ring"] == rows["128K"]["ring"]  # windows full: constant from here on
    assert s["state_bytes_constant"] == state_bytes(get_preset("recurrentgemma-2b"), 0) > 0
    assert main(["info", "recurrentgemma-2b"]) == 0
    assert "recurrent state" in capsys.readouterr().out


# config.json of google/recurrentgemma-2b and the text_config of google/gemma-4-26B-A4B, as
# published (fields transformers' defaults supply left out as there).
RG_2B_JSON = {
    "_block_types": ["recurrent", "recurrent", "attention"], "attention_bias": False,
    "attention_dropout": 0.0, "attention_window_size": 2048, "conv1d_width": 4,
    "embeddings_scale_by_sqrt_dim": True, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2560, "intermediate_size": 15360, "logits_soft_cap": 30.0, "lru_width": 2560,
    "model_type": "recurrent_gemma", "num_attention_heads": 10, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "vocab_size": 256000,
}  # fmt: skip
G4_26B_JSON = {
    "model_type": "gemma4",
    "text_config": {
        "attention_k_eq_v": True, "enable_moe_block": True, "final_logit_softcapping": 30.0,
        "global_head_dim": 512, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 2816, "hidden_size_per_layer_input": 0, "intermediate_size": 2112,
        "layer_types": ([SLIDING] * 5 + [FULL]) * 5, "max_position_embeddings": 262144,
        "moe_intermediate_size": 704, "num_attention_heads": 16, "num_experts": 128,
        "num_global_key_value_heads": 2, "num_hidden_layers": 30, "num_key_value_heads": 8,
        "num_kv_shared_layers": 0, "rms_norm_eps": 1e-06, "sliding_window": 1024,
        "rope_parameters": {
            FULL: {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            SLIDING: {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "tie_word_embeddings": True, "top_k_experts": 8, "vocab_size": 262144,
    },
}  # fmt: skip


@pytest.mark.parametrize(
    "preset,published", [("recurrentgemma-2b", RG_2B_JSON), ("gemma4-26b-a4b", G4_26B_JSON)]
)
def test_published_config_json_reads_as_the_preset(preset, published):
    assert ModelConfig.from_hf(published).replace(name=preset) == get_preset(preset)


@pytest.mark.parametrize("name", ["gemma4-nano-moe", "gemma4-nano-ple", "recurrentgemma-nano"])
def test_every_parameter_gets_a_gradient_and_moe_layers_report_routing(name):
    small = {  # three layers: a producer of each kind and one kv-shared consumer where used
        "gemma4-nano-moe": (SLIDING, SLIDING, FULL),
        "gemma4-nano-ple": (SLIDING, FULL, FULL),
        "recurrentgemma-nano": (RECURRENT, RECURRENT, SLIDING),
    }
    cfg = get_preset(name)
    shared = min(cfg.num_kv_shared_layers, 1)
    cfg = cfg.replace(num_hidden_layers=3, layer_types=small[name], num_kv_shared_layers=shared)
    model = geode.build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    if cfg.enable_moe_block:
        logits, load = model.layers[0].routing
        assert logits.shape == (14, cfg.num_experts) and load.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["gemma4-nano-moe", "recurrentgemma-nano"])
def test_decoding_through_the_engine_cache_equals_the_full_forward(name):
    """Prefill 5 tokens, then one at a time, through the family's per-layer cache states."""
    from geode.infer.cache import HybridCache

    cfg = get_preset(name).replace(sliding_window=4)
    model = geode.build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = HybridCache(cfg, 2, 16)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :5], torch.arange(5).expand(2, 5), cache)]
        steps += [model(ids[:, t : t + 1], torch.full((2, 1), t), cache) for t in range(5, 9)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4
