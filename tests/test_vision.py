"""Gemma 3 vision: SigLIP tower + projector and the image processor equal transformers'."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import geode
from geode.config import ConfigError
from geode.image import (
    ImageError,
    expand_image_tokens,
    load_image,
    pan_and_scan_boxes,
    process_images,
)
from geode.model.vision import (
    VISION_LAYOUTS,
    MultiModalProjector,
    SiglipVisionTower,
    VisionConfig,
    get_vision_preset,
    hf_vision_keys,
    image_group_ids,
    place_image_features,
)
from tests.reference import hf_text_config, randomize_

IMAGE_ID, BOI_ID, EOI_ID = 299, 297, 298  # inside the tiny vocabulary (300)


def _hf_vlm(vision: VisionConfig, seed: int = 0, window: int = 8):
    """A random-weight transformers Gemma3ForConditionalGeneration with this vision shape and
    sliding window, every tensor randomised."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    hf_vision = vision.to_hf()
    config = Gemma3Config(
        text_config=hf_text_config(sliding_window=window).to_dict(),
        vision_config=hf_vision["vision_config"],
        mm_tokens_per_image=hf_vision["mm_tokens_per_image"],
        image_token_index=IMAGE_ID,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return randomize_(Gemma3ForConditionalGeneration(config), seed).eval()


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """(transformers model, its save_pretrained directory) for the nano vision preset."""
    ref = _hf_vlm(get_vision_preset("nano-vision"))
    path = tmp_path_factory.mktemp("vlm")
    ref.save_pretrained(path)
    return ref, path


def _geode_parts(vision: VisionConfig, state: dict[str, torch.Tensor], text_hidden: int):
    """geode's tower and projector loaded from HF tensors through `hf_vision_keys`."""
    names = hf_vision_keys(state)
    tower, projector = SiglipVisionTower(vision), MultiModalProjector(vision, text_hidden)
    for module, prefix in ((tower, "vision_tower."), (projector, "multi_modal_projector.")):
        sd = {n[len(prefix) :]: state[k] for k, n in names.items() if n.startswith(prefix)}
        module.load_state_dict(sd, strict=True)  # every parameter given, none left over
    return tower.eval(), projector.eval()


def test_tower_and_projector_match_transformers(hf_saved):
    ref, path = hf_saved
    vision = VisionConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert vision == get_vision_preset("nano-vision").replace(
        name="", image_token_index=IMAGE_ID, boi_token_index=BOI_ID, eoi_token_index=EOI_ID
    )
    state = load_file(path / "model.safetensors")
    tower, projector = _geode_parts(vision, state, ref.config.text_config.hidden_size)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = ref.model.vision_tower(pixel_values=pixels).last_hidden_state  # (3, 64, 64)
        want_soft = ref.model.get_image_features(pixels).pooler_output  # (3, 16, 64)
        patches = tower(pixels)
        soft = projector(patches)
    assert soft.shape == (3, 16, ref.config.text_config.hidden_size)
    torch.testing.assert_close(patches, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(soft, want_soft, rtol=0, atol=1e-5)
    assert not torch.equal(soft[0], soft[1])  # the pooling and the images are real


def test_soft_tokens_replace_placeholders_unscaled_like_transformers(hf_saved):
    """Logits with the image features placed into the text embeddings equal transformers'
    (causal mask: the bidirectional image mask belongs to the engine's part of the issue)."""
    ref, path = hf_saved
    state = load_file(path / "model.safetensors")
    vision = get_vision_preset("nano-vision")
    tower, projector = _geode_parts(vision, state, ref.config.text_config.hidden_size)
    text = geode.load_model(path)  # the language-model part of the same file
    n = vision.mm_tokens_per_image
    ids = [5, BOI_ID, *[IMAGE_ID] * n, EOI_ID, 7, 8, BOI_ID, *[IMAGE_ID] * n, EOI_ID, 9]
    input_ids = torch.tensor([ids])
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        want = ref(input_ids=input_ids, pixel_values=pixels).logits
        embeds = place_image_features(
            text.embed_tokens(input_ids), input_ids, projector(tower(pixels)), IMAGE_ID
        )
        got = text(embeds=embeds)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_image_group_ids_match_transformers():
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    ids = torch.tensor([[1, 9, 9, 2, 9, 3, 9, 9, 9], [9, 9, 1, 1, 1, 1, 9, 2, 2]])
    want = get_block_sequence_ids_for_mask((ids == 9).long())
    assert torch.equal(image_group_ids(ids, 9), want)
    assert image_group_ids(ids, 9)[0].tolist() == [-1, 0, 0, -1, 1, -1, 2, 2, 2]


@pytest.mark.parametrize("layout", list(VISION_LAYOUTS))
def test_written_layouts_load_in_transformers(layout, hf_saved, tmp_path):
    """geode names -> each layout -> transformers loads the same weights; and back."""
    from transformers import Gemma3ForConditionalGeneration

    ref, path = hf_saved
    state = load_file(path / "model.safetensors")
    to_geode = hf_vision_keys(state)
    assert len(to_geode) == sum(k.startswith(("vision_tower.", "multi_modal")) for k in state)
    geode_state = {to_geode[k]: v for k, v in state.items() if k in to_geode}
    to_hf = hf_vision_keys(geode_state, to=layout)
    text_prefix = "language_model.model." if layout == "published" else "model.language_model."
    out = {to_hf[k]: v for k, v in geode_state.items()}
    out |= {
        k.replace("language_model.model.", text_prefix): v
        for k, v in state.items()
        if k not in to_geode
    }
    assert {hf_vision_keys(out)[k] for k in to_hf.values()} == set(geode_state)  # round trip
    save_file(out, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    loaded = Gemma3ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.model.get_image_features(pixels).pooler_output
        got = loaded.model.get_image_features(pixels).pooler_output
    assert torch.equal(got, want)


def test_hf_vision_keys_errors_and_unused_head():
    keys = ["vision_tower.vision_model.post_layernorm.weight", "multi_modal_projector.x"]
    mixed = keys + ["model.vision_tower.vision_model.post_layernorm.weight"]
    with pytest.raises(ValueError, match="two key layouts mixed"):
        hf_vision_keys(mixed)
    with pytest.raises(ValueError, match="not part of Gemma 3's SigLIP tower"):
        hf_vision_keys(["vision_tower.vision_model.pooler.weight"])
    with pytest.raises(ValueError, match="unknown key layout"):
        hf_vision_keys(keys, to="nope")
    with pytest.raises(ValueError, match="not a geode vision parameter"):
        hf_vision_keys(["model.layers.0.mlp.up_proj.weight"], to="model")
    head = "vision_tower.vision_model.head.probe"  # SigLIP's pooling head: never run by Gemma 3
    assert hf_vision_keys([head, "model.embed_tokens.weight", *keys]) == {k: k for k in keys}


def test_gemma3_preset_is_the_published_config_and_its_size():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    # google/gemma-3-4b-it config.json (vision part), as published.
    published = {
        "model_type": "gemma3",
        "mm_tokens_per_image": 256,
        "vision_config": {
            "hidden_size": 1152,
            "image_size": 896,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
            "vision_use_head": False,
        },
    }
    config = VisionConfig.from_hf(published)
    assert config == get_vision_preset("gemma3-vision").replace(name="")
    assert (config.num_patches, config.pool_kernel, config.mm_tokens_per_image) == (4096, 4, 256)
    with torch.device("meta"):
        ours = SiglipVisionTower(config)
        theirs = SiglipVisionModel(SiglipVisionConfig(**config.to_hf()["vision_config"]))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert 400e6 < count < 420e6  # "a 400M variant of SigLIP" (Gemma 3 report, 2.1)


def test_vision_config_errors():
    with pytest.raises(ConfigError, match="mm_tokens_per_image"):
        get_vision_preset("nano-vision").replace(mm_tokens_per_image=15)
    with pytest.raises(ConfigError, match="mm_tokens_per_image"):
        get_vision_preset("nano-vision").replace(mm_tokens_per_image=9)  # 3 does not divide 8
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        VisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="x.json:vision_config: vision model_type 'clip"):
        VisionConfig.from_hf(
            {"model_type": "gemma3", "vision_config": {"model_type": "clip_vision_model"}},
            source="x.json",
        )
    with pytest.raises(KeyError, match="known vision presets"):
        get_vision_preset("nope")
    tower = SiglipVisionTower(get_vision_preset("nano-vision"))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(N, 3, 32, 32\)"):
        tower(torch.zeros(1, 3, 28, 28))


def test_place_image_features_errors():
    embeds, ids = torch.zeros(1, 6, 4), torch.tensor([[1, 9, 9, 9, 9, 2]])
    with pytest.raises(ValueError, match="4 image placeholder tokens .* give 2 soft tokens"):
        place_image_features(embeds, ids, torch.ones(1, 2, 4), 9)
    out = place_image_features(embeds, ids, torch.arange(16.0).view(2, 2, 4), 9)
    assert torch.equal(out[0, 1:5], torch.arange(16.0).view(4, 4)) and not out[0, 0].any()


# ---------------------------------------------------------------------- the processor
def _rgb(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode=mode)


def _palette_with_transparency() -> Image.Image:
    image = _rgb(40, 30, 9).convert("P")
    image.info["transparency"] = 3
    return image


def _hf_processor(size: int):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    # google/gemma-3-4b-it preprocessor_config.json, at `size`.
    return Gemma3ImageProcessorPil(
        size={"height": size, "width": size},
        resample=2,
        rescale_factor=0.00392156862745098,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


# (height, width) of the test images: square, mildly wide, wide (3 and 7 crops: capped at 4),
# tall, tiny; RGBA, grayscale and paletted-transparent PIL inputs.
IMAGES = [
    _rgb(64, 64, 0),
    _rgb(300, 340, 1),
    _rgb(300, 900, 2),
    _rgb(260, 1820, 3),
    _rgb(1100, 520, 4),
    _rgb(7, 5, 5),
    _rgb(50, 120, 6, "RGBA"),
    _rgb(33, 21, 7, "L"),
    _palette_with_transparency(),
]
PAS = dict(
    pan_and_scan_min_crop_size=256,
    pan_and_scan_max_num_crops=4,
    pan_and_scan_min_ratio_to_activate=1.2,
)


@pytest.mark.parametrize("pas", [False, True], ids=["plain", "pan-and-scan"])
def test_pixels_equal_transformers(pas):
    size = 224  # the pipeline is size-independent; 896 is covered in the file test below
    want = _hf_processor(size)(IMAGES, do_pan_and_scan=pas, return_tensors="pt", **PAS)
    got = process_images(IMAGES, size, do_pan_and_scan=pas, **PAS)
    assert got.num_crops == want["num_crops"].tolist()
    assert got.pixel_values.dtype == torch.float32
    assert torch.equal(got.pixel_values, want["pixel_values"])
    if pas:
        assert got.num_crops == [0, 0, 3, 4, 2, 0, 0, 0, 0]


def test_small_crops_equal_transformers():
    """Many crop counts (min crop 8, size 32), ragged last crops included."""
    images = [_rgb(h, w, i) for i, (h, w) in enumerate([(10, 37), (41, 13), (9, 95), (20, 23)])]
    opts = dict(
        pan_and_scan_min_crop_size=8,
        pan_and_scan_max_num_crops=3,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    want = _hf_processor(32)(images, do_pan_and_scan=True, return_tensors="pt", **opts)
    got = process_images(images, 32, do_pan_and_scan=True, **opts)
    assert got.num_crops == want["num_crops"].tolist() == [3, 3, 3, 0]
    assert torch.equal(got.pixel_values, want["pixel_values"])
    assert pan_and_scan_boxes(37, 10, 8, 3) == [(0, 0, 13, 10), (13, 0, 26, 10), (26, 0, 37, 10)]


def test_files_equal_transformers_load_image(tmp_path):
    """Paths and bytes decode as transformers' load_image: EXIF orientation applied, alpha
    dropped (not composited), at Gemma 3's 896."""
    jpeg, png = tmp_path / "rotated.jpg", tmp_path / "alpha.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    _rgb(300, 1000, 11).save(jpeg, exif=exif, quality=90)
    _rgb(90, 60, 12, "RGBA").save(png)
    paths = [str(jpeg), str(png)]
    want = _hf_processor(896)(paths, do_pan_and_scan=True, return_tensors="pt", **PAS)
    got = process_images([jpeg, png.read_bytes()], do_pan_and_scan=True, **PAS)
    assert load_image(jpeg).size == (300, 1000)  # upright: portrait after the EXIF rotation
    assert got.num_crops == want["num_crops"].tolist() == [3, 0]
    assert torch.equal(got.pixel_values, want["pixel_values"])


def _char_tokenizer():
    """A transformers tokenizer with one token per character and Gemma 3's image tokens, so
    equal ids mean equal text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    specials += ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )


@pytest.mark.parametrize("pas", [False, True], ids=["plain", "pan-and-scan"])
@pytest.mark.parametrize("mm_tokens", [256, 16])
def test_expanded_prompt_equals_gemma3_processor(pas, mm_tokens):
    from transformers import Gemma3Processor

    tokenizer = _char_tokenizer()
    processor = Gemma3Processor(_hf_processor(64), tokenizer, image_seq_length=mm_tokens)
    prompt = "<bos>Compare <start_of_image> with\n<start_of_image>: which is wider?"
    images = [_rgb(40, 30, 1), _rgb(30, 130, 2)]
    opts = dict(PAS, pan_and_scan_min_crop_size=16)
    want = processor(text=[prompt], images=[images], do_pan_and_scan=pas, **opts)
    got = process_images(images, 64, do_pan_and_scan=pas, **opts)
    text = expand_image_tokens(prompt, got.num_crops, mm_tokens)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert ids == want["input_ids"][0]
    assert np.array_equal(got.pixel_values.numpy(), np.stack(want["pixel_values"]))
    assert text.count("<image_soft_token>") == mm_tokens * (2 + sum(got.num_crops))
    assert got.num_crops == ([2, 4] if pas else [0, 0])


def test_bad_images_are_clear_errors(tmp_path):
    png = io.BytesIO()
    _rgb(20, 20, 0).save(png, format="PNG")
    data = png.getvalue()
    with pytest.raises(ImageError, match=r"image 1: corrupt or truncated"):
        process_images([data, data[: len(data) // 2]])
    with pytest.raises(ImageError, match=r"image 0: not an image in a supported format"):
        process_images([b"GIF89a" + b"\x00" * 5])
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(ImageError, match=r"notes.txt: not an image in a supported format \(PNG"):
        load_image(notes)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # Pillow reads EPS; we refuse
    with pytest.raises(ImageError, match="upload.eps: not an image in a supported format"):
        load_image(eps, name="upload.eps")
    with pytest.raises(ImageError, match="missing.png: no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="image: empty image data"):
        load_image(b"")
    with pytest.raises(ImageError, match="2 <start_of_image> placeholders but 1 images"):
        expand_image_tokens("<start_of_image><start_of_image>", [0])
    with pytest.raises(ImageError, match="size must be a positive integer"):
        process_images([_rgb(4, 4, 0)], 0)
