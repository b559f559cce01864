"""The Gemma 3 VLM (issue #18 items 2, 3, 8): bidirectional image mask, multimodal checkpoints
in both key layouts, and `model(input_ids, pixel_values=...)`, against transformers'
Gemma3ForConditionalGeneration on random weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import geode
from geode.checkpoint import CheckpointError, save_model
from geode.model.attention import attention_mask
from geode.model.vision import VisionConfig, image_group_ids, place_image_features

IMAGE_ID, BOI_ID, EOI_ID = 299, 297, 298  # inside the tiny vocabulary (300)
WINDOW = 8  # shorter than every sequence below and than one image (16 soft tokens)
VISION = VisionConfig(
    image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, mm_tokens_per_image=16, image_token_index=IMAGE_ID,
    boi_token_index=BOI_ID, eoi_token_index=EOI_ID,
)  # fmt: skip
N = VISION.mm_tokens_per_image


def _hf_vlm(seed: int = 0):
    """A random-weight transformers Gemma3ForConditionalGeneration, every tensor randomised,
    with VISION's shape and the sliding window WINDOW."""
    from tests.test_vision import _hf_vlm as hf_vlm

    return hf_vlm(VISION, seed, WINDOW)


def _image(n: int = N) -> list[int]:
    return [BOI_ID, *[IMAGE_ID] * n, EOI_ID]


# 0, 1 and 2 images; every image is wider than the window and straddles it.
SEQUENCES = {
    0: [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    1: [2, 5, 6, *_image(), 7, 8, 9, 10],
    2: [2, 5, *_image(), 7, 8, 9, *_image(), 10, 11, 12],
}


def _pixels(n: int, seed: int) -> torch.Tensor | None:
    if n == 0:
        return None
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _hf_logits(ref, ids: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
    """transformers' logits with the processor's token_type_ids (the bidirectional mask)."""
    kw = {} if pixels is None else {"pixel_values": pixels}
    with torch.no_grad():
        return ref(input_ids=ids, token_type_ids=(ids == IMAGE_ID).long(), **kw).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(transformers model, its save_pretrained directory)."""
    ref = _hf_vlm()
    path = tmp_path_factory.mktemp("vlm")
    ref.save_pretrained(path)
    return ref, path


@pytest.fixture(scope="module")
def model(saved):
    """geode.load_model of the transformers checkpoint: the VLM."""
    return geode.load_model(saved[1])


@pytest.mark.parametrize("images", [0, 1, 2])
def test_logits_match_transformers_with_zero_one_two_images(images, saved, model):
    ref, path = saved
    assert type(model) is geode.Transformer and model.vision == VISION
    ids = torch.tensor([SEQUENCES[images]])
    assert ids.shape[1] > WINDOW
    pixels = _pixels(images, images)
    want = _hf_logits(ref, ids, pixels)
    with torch.no_grad():
        got = model(ids, pixel_values=pixels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    if images:  # the bidirectional mask matters: the causal form differs
        with torch.no_grad():
            causal = ref(input_ids=ids, pixel_values=pixels).logits
        assert (causal - want).abs().max() > 1e-3


def test_batch_with_padding_rows_and_images_in_order(saved, model):
    """Two rows (1 and 2 images): pixel_values are the images in row-major order."""
    ref, _ = saved
    a, b = SEQUENCES[1], SEQUENCES[2]
    ids = torch.tensor([a + [0] * (len(b) - len(a)), b])
    pixels = _pixels(3, 5)
    want = _hf_logits(ref, ids, pixels)
    with torch.no_grad():
        got = model(ids, pixel_values=pixels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_without_pixel_values_it_is_the_text_model(saved, model):
    ref, path = saved
    vlm, text = model, geode.load_model(path, vision=False)
    assert vlm.vision_tower is not None and text.vision is None
    assert not any(k.startswith(("vision_tower", "multi_modal")) for k in text.state_dict())
    ids = torch.tensor([SEQUENCES[0]])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        assert torch.equal(vlm(ids), text(ids))
    torch.testing.assert_close(text(ids).detach(), want, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="no vision tower"):
        text(torch.tensor([SEQUENCES[1]]), pixel_values=_pixels(1, 0))


@pytest.mark.parametrize("layout", ["published", "model"])
def test_geode_saves_transformers_loads_both_layouts(layout, model, tmp_path):
    from transformers import Gemma3ForConditionalGeneration

    out = save_model(model, tmp_path / layout, layout=layout)
    keys = load_file(out / "model.safetensors").keys()
    text = {"published": "language_model.model.", "model": "model.language_model."}[layout]
    tower = {"published": "vision_tower.", "model": "model.vision_tower."}[layout]
    assert any(k.startswith(text) for k in keys) and any(k.startswith(tower) for k in keys)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert config["image_token_index"] == IMAGE_ID and config["mm_tokens_per_image"] == N
    theirs = Gemma3ForConditionalGeneration.from_pretrained(out, attn_implementation="eager")
    ids = torch.tensor([SEQUENCES[2]])
    pixels = _pixels(2, 9)
    with torch.no_grad():
        mine = model(ids, pixel_values=pixels)
    torch.testing.assert_close(_hf_logits(theirs.eval(), ids, pixels), mine, rtol=0, atol=1e-5)
    again = geode.load_model(out)  # and back: both layouts load in geode
    with torch.no_grad():
        assert torch.equal(again(ids, pixel_values=pixels), mine)


def test_checkpoint_errors_name_the_problem(saved, model, tmp_path):
    text_only = tmp_path / "text"
    save_model(geode.load_model(saved[1], vision=False), text_only)
    with pytest.raises(CheckpointError, match="vision=True, but this is not a Gemma3ForCond"):
        geode.load_model(text_only, vision=True)
    with pytest.raises(ValueError, match="family 'gemma4' has no vision tower"):
        geode.Transformer(geode.get_preset("gemma4-nano-moe"), VISION)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.tensor([SEQUENCES[1]]), pixel_values=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="2 images x 16"):
        model(torch.tensor([SEQUENCES[1]]), pixel_values=_pixels(2, 0))


def test_bidirectional_image_attention_mask():
    """transformers' test_bidirectional_image_attention (Gemma3), on the mask: an image of 4
    tokens and one of 3 see themselves fully, not each other's future; text stays causal."""
    T = 12
    groups = torch.full((1, T), -1)
    pos = torch.arange(T)[None]
    causal = attention_mask(pos, pos, None)[0, 0]
    assert not causal[:4, :4].all()
    groups[:, :4] = 0
    groups[:, 7:10] = 1
    for window in (None, 3):
        m = attention_mask(pos, pos, window, q_img=groups, k_img=groups)[0, 0]  # (T, T)
        if window is None:
            assert m[:4, :4].all() and m[7:10, 7:10].all()
        assert not m[:4, 7:10].any()  # no look-ahead into the later image
        for text in (4, 5, 6, 10, 11):  # text stays causal
            assert not m[text, text + 1 :].any()
    m = attention_mask(pos, pos, 3, q_img=groups, k_img=groups)[0, 0]
    # transformers' window (kv > q - W) bounds looking back only, not ahead within an image
    assert m[3, 1] and not m[3, 0] and m[0, 3]


def test_an_image_token_sees_its_image_but_not_the_next_and_text_stays_causal(model):
    """The same rule through the model: perturbing a late token of image 1 changes image 1's
    first token, not the text before it; perturbing image 2 leaves all of image 1 unchanged."""
    ids = torch.tensor([SEQUENCES[2]])
    groups = image_group_ids(ids, IMAGE_ID)
    first = [i for i, g in enumerate(groups[0].tolist()) if g == 0]
    second = [i for i, g in enumerate(groups[0].tolist()) if g == 1]
    embeds = model.embed_tokens(ids).detach()
    with torch.no_grad():
        base = model.hidden(embeds=embeds, image_groups=groups)
        e1 = embeds.clone()
        e1[0, first[-1]] += 1.0
        h1 = model.hidden(embeds=e1, image_groups=groups)
        e2 = embeds.clone()
        e2[0, second[-1]] += 1.0
        h2 = model.hidden(embeds=e2, image_groups=groups)
    assert (h1[0, first[0]] - base[0, first[0]]).abs().max() > 1e-4
    assert torch.equal(h1[0, : first[0]], base[0, : first[0]])
    assert torch.equal(h2[0, : second[0]], base[0, : second[0]])


def test_cached_prefill_applies_the_rule_within_the_chunk(model):
    """Prefill through the engine's cache in chunks that each hold whole images gives the
    full-sequence logits (the cache keeps positions; group ids come from the chunk)."""
    from geode.infer.cache import HybridCache

    ids = torch.tensor([SEQUENCES[2]])
    pixels = _pixels(2, 3)
    with torch.no_grad():
        want = model(ids, pixel_values=pixels)
        feats = model.image_features(pixels)  # (2, N, hidden)
        embeds = place_image_features(model.embed_tokens(ids), ids, feats, IMAGE_ID)
        groups = image_group_ids(ids, IMAGE_ID)
        cache = HybridCache(model.config, batch=1, capacity=ids.shape[1])
        cut = 2 + N + 2 + 3  # chunk 1: text + image 1; chunk 2: the rest (image 2)
        pos = torch.arange(ids.shape[1])[None]
        got = [
            model(
                embeds=embeds[:, a:b],
                positions=pos[:, a:b],
                cache=cache,
                image_groups=groups[:, a:b],
            )  # fmt: skip
            for a, b in ((0, cut), (cut, ids.shape[1]))
        ]
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=0, atol=1e-5)


def test_training_with_gradient_checkpointing_reaches_the_tower(saved):
    """Training forward (checkpointed layers) equals eval's and trains tower and projector."""
    model = geode.load_model(saved[1])
    ids = torch.tensor([SEQUENCES[1]])
    pixels = _pixels(1, 4)
    with torch.no_grad():
        want = model(ids, pixel_values=pixels)
    model.train()
    model.gradient_checkpointing = True
    logits = model(ids, pixel_values=pixels)
    torch.testing.assert_close(logits.detach(), want, rtol=0, atol=1e-6)
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
