"""The chat page in real headless Chromium: a streamed reply, Stop, and a screenshot.

Python `playwright` (the dev extra) drives Debian's `chromium` through `executable_path`, so no
browser is downloaded; `make test` installs the package where it runs as root (scripts/
ensure-chromium.sh). `GEODE_CHROMIUM` names another Chromium binary. Outside CI a missing
browser or driver skips this test with the reason; with `CI=true` it fails.
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from geode.chat import render
from geode.infer import Engine, Request
from tests.serve.helpers import LiveServer, wait_until
from tests.serve.test_vlm_server import image_dir, vlm_dir, vlm_server  # noqa: F401 (fixtures)

STEP_DELAY = 0.01  # seconds added to every engine step, so that a reply visibly streams


def _unavailable(reason: str) -> None:
    """Skip with `reason`, except in CI (CI=true), where a missing browser is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser test must run; `make test` installs it)")
    pytest.skip(reason)


def _chromium() -> str | None:
    for name in (os.environ.get("GEODE_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def slow_server(checkpoint: Path) -> Iterator[LiveServer]:
    """Its own server whose engine steps take >= 10 ms: a 300-token reply lasts seconds."""
    from geode.serve.app import create_app

    live = LiveServer(create_app(checkpoint, max_batch=4, model_name="tiny")).start()
    engine = live.state.engine
    step = engine.step

    def slow_step() -> Any:
        time.sleep(STEP_DELAY)
        return step()

    engine.step = slow_step  # the scheduler calls engine.step() once per step
    yield live
    live.stop()


@pytest.fixture(scope="module")
def page(slow_server: LiveServer) -> Iterator[Any]:
    """A fresh headless Chromium page (Debian's binary, no download)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("python package `playwright` is not installed (pip install -e '.[dev]')")
    exe = _chromium()
    if exe is None:
        _unavailable(
            "no `chromium` on PATH: `apt-get install chromium` (make test does it as root), "
            "or set GEODE_CHROMIUM"
        )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True)
        try:
            p = browser.new_page(viewport={"width": 1000, "height": 700})
            p.set_default_timeout(30_000)
            yield p
        finally:
            browser.close()


def _text(page: Any, i: int) -> str:
    return page.evaluate(f"document.querySelectorAll('.msg.assistant .body')[{i}].textContent")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_chat_page_streams_stops_and_screenshots(page, slow_server, tmp_path: Path):
    live = slow_server
    page.goto(live.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    # every text change of the newest assistant bubble, as the page streams it
    page.evaluate(
        """() => {
        window.snaps = [];
        new MutationObserver(() => {
            const b = document.querySelectorAll('.msg.assistant .body');
            if (b.length) window.snaps.push(b[b.length - 1].textContent);
        }).observe(document.getElementById('log'),
                   {subtree: true, childList: true, characterData: true});
    }"""
    )

    # 1. a greedy reply streams in and equals the server's and the engine's greedy output
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "48")
    page.fill("#input", "hello there")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user")
    page.wait_for_function("document.getElementById('stats').textContent.includes('tokens in')")
    reply = _text(page, 0)
    snaps = [s for s in page.evaluate("window.snaps") if s]
    assert reply, "no reply text"
    assert len(set(snaps)) >= 3, f"the reply did not stream: {len(set(snaps))} distinct texts"
    assert all(reply.startswith(s) for s in snaps), "streamed text is not a growing prefix"
    assert "48 tokens" in page.inner_text("#stats")

    messages = [{"role": "user", "content": "hello there"}]
    body = {"messages": messages, "temperature": 0, "max_tokens": 48}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == reply
    tok = live.state.tokenizer
    ids = tok.encode(render(messages, add_generation_prompt=True))
    engine = Engine(live.state.engine.model, tok)
    (want,) = engine.generate(Request(ids, max_new_tokens=48, temperature=0))
    assert want.text == reply

    # 2. Stop cancels a long reply in the page and on the server
    aborted = live.state.scheduler.stats.requests_aborted
    page.fill("#max_tokens", "300")
    page.fill("#input", "tell me a long story")
    page.press("#input", "Enter")
    page.wait_for_function(
        "(document.querySelectorAll('.msg.assistant .body')[1] || {}).textContent?.length > 0"
    )
    page.click("#stop")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant .body')[1].textContent.endsWith('[stopped]')"
    )
    assert wait_until(
        lambda: not live.state.engine.has_unfinished() and live.state.scheduler.num_running == 0
    ), "the engine still runs the stopped reply"
    assert live.state.scheduler.stats.requests_aborted == aborted + 1
    assert page.evaluate("document.querySelectorAll('.msg').length") == 4
    assert page.is_enabled("#send") and not page.is_enabled("#stop")

    # 3. a screenshot of the conversation
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    width, height = _png_size(shot)
    assert width >= 600 and height >= 400, (width, height)
    assert shot.stat().st_size > 10_000, "screenshot looks blank"


def test_chat_page_attaches_an_image(page, vlm_server, vlm_dir, tmp_path: Path):  # noqa: F811
    """The attach button: a PNG from the file input shows as a thumbnail in the composer and
    the transcript, goes as an `image_url` data: URL part, and the greedy reply equals the
    engine's in process; a corrupt image is the server's 400, shown as an error, and the
    refused message leaves the conversation."""
    import base64
    import json

    from PIL import Image

    import geode
    from geode.chat import render_multimodal

    png = tmp_path / "blue.png"
    Image.new("RGB", (40, 28), "blue").save(png)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bodies: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda req: req.url.endswith("/v1/chat/completions") and bodies.append(json.loads(req.post_data)),
    )  # fmt: skip
    page.goto(vlm_server.url + "/")
    page.wait_for_function(
        "!['loading…', 'unavailable'].includes(document.getElementById('model').textContent)"
    )
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "8")

    # 1. a corrupt image: the 400's message in the reply's place, nothing kept
    page.set_input_files("#attach", str(bad))
    page.wait_for_selector("#attachments img.thumb")
    page.fill("#input", "what is this?")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error")
    error = page.inner_text(".msg.error .body")
    assert "HTTP 400" in error and "corrupt or truncated" in error, error
    assert page.evaluate("document.querySelectorAll('.msg.user.refused').length") == 1

    # 2. a real PNG: thumbnails, the image_url part, the engine's reply
    page.set_input_files("#attach", str(png))
    page.wait_for_selector("#attachments img.thumb")
    page.fill("#input", "what colour is this?")
    page.press("#input", "Enter")
    page.wait_for_function(
        "document.querySelectorAll('.msg').length === 4 && !document.getElementById('send').disabled"
    )
    assert page.evaluate("document.querySelectorAll('#attachments img').length") == 0
    assert page.evaluate("document.querySelectorAll('.msg.user img.thumb').length") == 2
    url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what colour is this?"}]}]  # fmt: skip
    assert len(bodies) == 2 and bodies[1]["messages"] == messages  # the refused turn is gone
    assert bodies[0]["messages"][0]["content"][0]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    model, tok = geode.load_model(vlm_dir), geode.load_tokenizer(vlm_dir)
    prompt = render_multimodal(messages, mm_tokens_per_image=16)
    (want,) = Engine(model, tok).generate([Request(prompt, temperature=0, max_new_tokens=8)])
    assert _text(page, 0) == want.text  # the refused turn's bubble is an error, not a reply
    assert (
        page.evaluate("document.querySelector('.msg.user:not(.refused) img.thumb').naturalWidth")
        == 40
    )
