"""geode's decoder is numerically transformers' Gemma3 (random weights, norms included)."""

from __future__ import annotations

import pytest
import torch

import geode
from tests.reference import hf_text_config, randomize_

# Four shapes: GQA ratios 2, 4 (MQA) and 1 (MHA); head_dim != hidden/heads; windows
# shorter than the sequence; final-logit soft-capping on and off; linear RoPE
# scaling; tied and untied heads; a custom layer pattern.
CONFIGS = {
    "gqa2-softcap-linear-rope": dict(
        final_logit_softcapping=30.0, rope_scaling={"rope_type": "linear", "factor": 8.0}
    ),
    "mqa-no-softcap": dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        num_hidden_layers=6, sliding_window=8, query_pre_attn_scalar=32,
    ),
    "mha-untied-alternating": dict(
        hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=4, sliding_window=3, query_pre_attn_scalar=12,
        final_logit_softcapping=15.0, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    "gqa4-27b-like-scalar": dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=8, sliding_window=6, rope_theta=50_000.0, rope_local_base_freq=500.0,
    ),
}  # fmt: skip
SEQ = 23  # longer than every window above


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_logits_match_transformers(name, hf_checkpoint):
    ref, path = hf_checkpoint(seed=len(name), **CONFIGS[name])
    model = geode.load_model(path)
    assert model.dtype == torch.float32
    ids = torch.randint(
        0, ref.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_explicit_positions_match_transformers(hf_checkpoint):
    ref, path = hf_checkpoint(seed=3)
    model = geode.load_model(path)
    ids = torch.randint(0, 300, (1, 17))
    pos = torch.arange(40, 57)[None]
    with torch.no_grad():
        expected = ref(ids, position_ids=pos).logits
        got = model(ids, positions=pos)
    assert (got - expected).abs().max().item() <= 1e-4


def test_packed_documents_equal_separate_forwards(hf_checkpoint):
    """segment_ids + restarted positions make packed documents independent."""
    _, path = hf_checkpoint(seed=4)
    model = geode.load_model(path)
    a, b = torch.randint(0, 300, (1, 9)), torch.randint(0, 300, (1, 12))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(9), torch.arange(12)])[None]
    seg = torch.cat([torch.zeros(9), torch.ones(12)]).long()[None]
    with torch.no_grad():
        together = model(packed, positions=pos, segment_ids=seg)
        apart = torch.cat([model(a), model(b)], 1)
    assert (together - apart).abs().max().item() <= 1e-5


def test_bfloat16_within_documented_tolerance(hf_checkpoint):
    """bfloat16 (docs/architecture.md): within 4% of the logit range of transformers' bfloat16,
    and no further from the float32 reference than 1.5x transformers' own bfloat16 error."""
    ref, path = hf_checkpoint(seed=5, final_logit_softcapping=30.0)
    model = geode.load_model(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = ref(ids).logits
        ref_bf16 = ref.to(torch.bfloat16)(ids).logits.float()
        got = model(ids).float()
    scale = exact.abs().max().item()
    assert (got - ref_bf16).abs().max().item() <= 0.04 * scale
    ref_err = (ref_bf16 - exact).abs().max().item()
    assert (got - exact).abs().max().item() <= 1.5 * ref_err + 1e-3


def _multimodal(seed: int):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14,
    )  # fmt: skip
    text = hf_text_config(vocab_size=400)
    cfg = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=399,
        boi_token_index=397, eoi_token_index=398,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_(Gemma3ForConditionalGeneration(cfg), seed).eval()


def test_multimodal_checkpoint_text_part_matches(tmp_path):
    ref = _multimodal(7)
    ref.save_pretrained(tmp_path / "mm")
    model = geode.load_model(tmp_path / "mm")
    ids = torch.randint(0, 396, (1, SEQ))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = model(ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_both_multimodal_key_layouts_load(tmp_path):
    """Published checkpoints (and transformers 5's save) use `language_model.model.*`;
    transformers 4.52-4.57 saved `model.language_model.*`. Both load to the same model."""
    from safetensors.torch import load_file, save_file

    ref = _multimodal(8)
    ref.save_pretrained(tmp_path / "published")
    state = load_file(tmp_path / "published" / "model.safetensors")
    assert any(k.startswith("language_model.model.") for k in state)
    newer = {}
    for k, v in state.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k.removeprefix("language_model.model.")
        elif k.startswith(("vision_tower.", "multi_modal_projector.")):
            k = "model." + k
        newer[k] = v
    (tmp_path / "newer").mkdir()
    save_file(newer, tmp_path / "newer" / "model.safetensors", metadata={"format": "pt"})
    config = (tmp_path / "published" / "config.json").read_text()
    (tmp_path / "newer" / "config.json").write_text(config)
    ids = torch.randint(0, 396, (1, 11))
    with torch.no_grad():
        a = geode.load_model(tmp_path / "published")(ids)
        b = geode.load_model(tmp_path / "newer")(ids)
        expected = ref(input_ids=ids).logits
    assert torch.equal(a, b)
    assert (b - expected).abs().max().item() <= 1e-4


def test_attention_softcap_field_is_ignored_like_transformers(hf_checkpoint):
    """transformers' Gemma3 stores attn_logit_softcapping but never applies it."""
    ref, path = hf_checkpoint(seed=9, attn_logit_softcapping=5.0)
    with pytest.warns(UserWarning, match="attn_logit_softcapping"):
        model = geode.load_model(path)
    assert model.config.attn_logit_softcapping is None
    ids = torch.randint(0, 300, (1, SEQ))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() <= 1e-4
