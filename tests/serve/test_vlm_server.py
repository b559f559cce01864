"""Images through the server (issue #18 item 5): `/v1/chat/completions` with `image_url` parts
(data: URLs, files under `--image-dir`) answers through the openai client as the engine does
in process; bad images, http URLs, too many images and images for a text-only model are 400s
naming the message part."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

import geode
from geode.chat import render_multimodal
from geode.cli import main
from geode.eval.backends import BackendError, EngineBackend, Gen
from geode.infer import Engine, Request
from geode.model.vision import get_vision_preset
from tests.serve.helpers import LiveServer
from tests.serve.test_server import check_error

CONTEXT = 96  # one image (16 soft tokens) fits; six do not


def _png(color: str, size: tuple[int, int] = (40, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _messages(*urls: str, text: str = "what colour is this?") -> list[dict[str, Any]]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


@pytest.fixture(scope="module")
def vlm_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The serve tests' tiny text model with a nano vision tower; the image tokens are the
    tokenizer's own."""
    tok = geode.load_tokenizer(checkpoint)
    config = geode.load_model(checkpoint).config
    specials = tok.special_ids
    vision = get_vision_preset("nano-vision").replace(
        image_token_index=specials["<image_soft_token>"],
        boi_token_index=specials["<start_of_image>"],
        eoi_token_index=specials["<end_of_image>"],
    )
    model = geode.build_model(config, seed=1, vision=vision)
    path = tmp_path_factory.mktemp("vlm-serve") / "model"
    geode.save_model(model, path, files={"tokenizer.model": checkpoint / "tokenizer.model"})
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "red.png").write_bytes(_png("red"))
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def vlm_server(vlm_dir: Path, image_dir: Path) -> Iterator[LiveServer]:
    from geode.serve.app import create_app

    app = create_app(vlm_dir, max_seq_len=CONTEXT, image_dir=image_dir, prefix_cache_bytes=1 << 20)
    live = LiveServer(app).start()
    yield live
    live.stop()


def test_chat_with_a_data_url_image_through_the_openai_client(vlm_server, vlm_dir, image_dir):
    import openai

    client = openai.OpenAI(base_url=vlm_server.url + "/v1", api_key="x", max_retries=0)
    messages = _messages(_data_url(_png("blue")))
    r = client.chat.completions.create(
        model="model", messages=messages, max_tokens=8, temperature=0
    )
    # in process: the same rendered prompt through an engine gives the same reply
    model, tok = geode.load_model(vlm_dir), geode.load_tokenizer(vlm_dir)
    prompt = render_multimodal(messages, mm_tokens_per_image=16)
    want = Engine(model, tok).generate(Request(prompt, temperature=0, max_new_tokens=8))[0]
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    image_id = tok.special_ids["<image_soft_token>"]
    assert want.prompt_token_ids.count(image_id) == 16  # one image's soft tokens
    backend = EngineBackend(model, tok, chat=True)  # geode eval's in-process backend
    assert backend.generate([Gen(messages, max_tokens=8)]) == [want.text]
    # a file under --image-dir, twice: the tower runs once for it
    engine = vlm_server.state.engine
    before = engine.vision_cache.stats["encoded"]
    for _ in range(2):
        r = client.chat.completions.create(
            model="model", messages=_messages("red.png"), max_tokens=4, temperature=0
        )
        assert r.choices[0].finish_reason in ("stop", "length")
    assert engine.vision_cache.stats["encoded"] == before + 1
    ids = httpx.post(vlm_server.url + "/tokenize", json={"messages": _messages("red.png")}).json()
    assert ids["tokens"].count(image_id) == 16


BAD = [
    ("http://example.com/cat.png", "not fetched: no network"),
    (_data_url(b"\x89PNG\r\n\x1a\n truncated"), "corrupt or truncated"),
    (_data_url(b"%!PS-Adobe-3.0 EPSF-3.0\n", "image/eps"), "not an image in a supported format"),
    ("data:image/png;base64,@@@", "bad base64"),
    ("notes.txt", "not an image in a supported format"),
    ("../outside.png", "outside the allowed directory"),
    ("ftp://host/x.png", "unsupported URL scheme"),
]


@pytest.mark.parametrize(("url", "why"), BAD)
def test_bad_images_are_400s_naming_the_part(vlm_server, url, why):
    body = {"messages": _messages(_data_url(_png("red")), url), "max_tokens": 2}
    r = httpx.post(vlm_server.url + "/v1/chat/completions", json=body, timeout=30)
    err = check_error(r, 400)
    assert err["param"] == "messages.0.content.2", err
    assert err["message"].startswith("messages.0.content.2: ") and why in err["message"], err


def test_too_many_images_and_text_only_models_are_400s(vlm_server, server):
    url = _data_url(_png("green"))
    body = {"messages": _messages(*[url] * 6), "max_tokens": 2}
    r = httpx.post(vlm_server.url + "/v1/chat/completions", json=body, timeout=30)
    err = check_error(r, 400)
    assert "too many images for the context: 6 images take 96" in err["message"], err
    assert err["code"] == "context_length_exceeded"
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)  # text-only
    err = check_error(r, 400)
    assert err["param"] == "messages.0.content.1"
    assert "image sent to a text-only model" in err["message"]
    assert torch.is_grad_enabled()  # (the server thread's inference mode does not leak here)


def test_geode_eval_images_runs_user_rows_through_a_vlm(vlm_dir, checkpoint, tmp_path, capsys):
    """`geode eval shapes --images rows.jsonl` scores the user's image questions in process;
    a text-only model refuses image prompts."""
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        (tmp_path / name).write_bytes(_png(color))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"image": "a.png", "question": "What colour?", "answer": "red"}\n'
        '{"image": "b.png", "question": "What colour?", "answer": "blue", "id": "b"}\n'
    )
    args = ["eval", "shapes", "--images", str(rows), "--max-tokens", "3", "--no-progress"]
    assert main([*args, "--model", str(vlm_dir), "--out", str(tmp_path / "out")]) == 0
    samples = (tmp_path / "out" / "shapes" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 and '"b"' in samples[1]
    assert main([*args, "--model", str(checkpoint), "--out", str(tmp_path / "text")]) == 2
    assert "the model is text-only" in capsys.readouterr().err
    with pytest.raises(BackendError, match="text-only"):
        EngineBackend(geode.load_model(checkpoint), geode.load_tokenizer(checkpoint)).generate(
            [Gen(_messages(_data_url(_png("red"))))]
        )
