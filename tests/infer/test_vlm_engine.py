"""Images through the engine (issue #18 item 5): greedy output equals transformers'
`Gemma3ForConditionalGeneration.generate`, chunks never split an image, the vision tower runs
once per image, image requests never share KV across different images, clear errors."""

from __future__ import annotations

import pytest
import torch

import geode
from geode.infer import Engine, Request, RequestError
from geode.infer.multimodal import PromptImages, placeholder_runs
from tests.test_vlm import IMAGE_ID, SEQUENCES, N, _hf_vlm, _pixels


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(transformers VLM, geode.load_model of its checkpoint): window 8, images of 16 tokens."""
    ref = _hf_vlm(seed=3)
    path = tmp_path_factory.mktemp("vlm-engine")
    ref.save_pretrained(path)
    return ref, geode.load_model(path)


def _hf_greedy(ref, prompt: list[int], pixels: torch.Tensor, n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = ref.generate(
        ids, pixel_values=pixels, token_type_ids=(ids == IMAGE_ID).long(), do_sample=False,
        max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None,
        attention_mask=torch.ones_like(ids),
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _greedy(n: int, **kw) -> dict:
    return dict(temperature=0, max_new_tokens=n, ignore_eos=True, **kw)


# chunk 512: the whole prompt in one chunk; 6: every image (16 tokens) is longer than the chunk
# and gets one of its own; 9: chunk ends fall inside images and move back to their start
@pytest.mark.parametrize("images,chunk,native", [(1, 512, True), (2, 6, False), (2, 9, True)])
def test_greedy_with_images_equals_transformers_generate(vlm, images, chunk, native):
    ref, model = vlm
    prompt, pixels, new = SEQUENCES[images], _pixels(images, 10 + images), 12
    want = _hf_greedy(ref, prompt, pixels, new)
    eng = Engine(model, prefill_chunk=chunk, native=native)
    got = eng.generate(Request(prompt, images=pixels, **_greedy(new)))[0]
    assert got.token_ids == want and got.prompt_token_ids == prompt
    assert eng.vision_cache.stats["encoded"] == images
    if images == 1:  # the images matter: the same ids with other pixels continue otherwise
        other = eng.generate(Request(prompt, images=-pixels, **_greedy(new)))[0]
        assert other.token_ids == _hf_greedy(ref, prompt, -pixels, new) != want


def test_chunks_never_split_an_image(vlm):
    """Record every prompt chunk the scheduler plans: no chunk end lies inside an image, and
    an image longer than the chunk budget gets a chunk of exactly its tokens."""
    _, model = vlm
    prompt = SEQUENCES[2]
    spans = placeholder_runs(prompt, IMAGE_ID)
    assert spans == [(3, 3 + N), (24, 24 + N)]
    eng = Engine(model, prefill_chunk=5, native=False)
    seen: list[tuple[int, int]] = []
    plan_chunk = eng.scheduler._chunk

    def spy(seq, row, budget):
        c = plan_chunk(seq, row, budget)
        seen.append((c.start, c.end))
        return c

    eng.scheduler._chunk = spy
    eng.generate(Request(prompt, images=_pixels(2, 1), **_greedy(2)))
    cuts = {e for _, e in seen}
    assert all(not a < e < b for a, b in spans for e in cuts)
    assert (3, 3 + N) in seen and (24, 24 + N) in seen  # 16 > 5: one chunk each
    assert seen[0] == (0, 3)  # the text before image 1 ends where the image starts
    im = PromptImages(IMAGE_ID, torch.zeros(2, 3, 32, 32), ["a", "b"], spans, [range(1)] * 2)
    assert im.fit(0, 10) == 3 and im.fit(3, 5) == 19 and im.fit(19, 22) == 22
    assert im.fit(20, 30) == 24 and im.fit(24, 40) == 40


def test_tower_runs_once_per_image_and_kv_is_never_shared_across_images(vlm):
    ref, model = vlm
    prompt = SEQUENCES[1]
    a, b = _pixels(1, 20), _pixels(1, 21)
    want_a, want_b = (_hf_greedy(ref, prompt, p, 6) for p in (a, b))
    # prefix cache on, identical ids admitted together: only equal images share a prefill
    eng = Engine(model, max_batch=4, prefix_cache_bytes=1 << 24, native=False)
    reqs = [Request(prompt, images=p, **_greedy(6)) for p in (a, b, a.clone(), b)]
    out = [r.token_ids for r in eng.generate(reqs)]
    assert out == [want_a, want_b, want_a, want_b]
    assert eng.vision_cache.stats["encoded"] == 2  # a and b once each
    assert eng.stats["prefix_hits"] == 0  # image prompts skip the prefix cache
    again = eng.generate(Request(prompt, images=b, **_greedy(6)))[0].token_ids
    assert again == want_b and eng.vision_cache.stats["encoded"] == 2
    hits = eng.vision_cache.stats["hits"]
    # one image twice in one prompt: encoded once; a bounded cache evicts the oldest image
    eng = Engine(model, native=False, vision_cache=1)
    two = torch.cat([a, a])
    got = eng.generate(Request(SEQUENCES[2], images=two, **_greedy(4)))[0].token_ids
    assert got == _hf_greedy(ref, SEQUENCES[2], two, 4)
    assert eng.vision_cache.stats == dict(encoded=1, hits=1, evictions=0) and hits >= 1
    eng.generate(Request(prompt, images=b, **_greedy(1)))
    assert eng.vision_cache.stats["evictions"] == 1 and len(eng.vision_cache) == 1


def test_bad_image_requests_are_clear_errors(vlm, model):
    _, vlm_model = vlm
    eng = Engine(vlm_model, max_seq_len=30, native=False)
    with pytest.raises(RequestError, match=r"1 images give 16 soft tokens"):
        eng.add_request(Request(SEQUENCES[2], images=_pixels(1, 0)))
    with pytest.raises(RequestError, match=r"images must be pixel values \(N_images, 3, 32, 32\)"):
        eng.add_request(Request(SEQUENCES[1], images=torch.zeros(1, 3, 16, 16)))
    with pytest.raises(RequestError, match="too many images for the context: 2 images take 32"):
        eng.add_request(Request(SEQUENCES[2], images=_pixels(2, 0)))
    with pytest.raises(RequestError, match="not a whole number of images"):
        eng.add_request(Request([2, *[IMAGE_ID] * 8, 5, *[IMAGE_ID] * 8], images=_pixels(1, 0)))
    text_only = Engine(model)  # the tests/infer text model
    with pytest.raises(RequestError, match="image inputs sent to a text-only model"):
        text_only.add_request(Request([2, 5, 6], images=_pixels(1, 0)))
    assert not eng.has_unfinished() and not text_only.has_unfinished()
