"""Chat format: `render` equals the Gemma 3 chat template (rendered by transformers' jinja
machinery) on everything the template handles; tools/thinking round-trip through `parse`;
`parse` never raises on malformed output."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from geode.chat import (
    ALTERNATION_ERROR,
    ChatFormatError,
    ParsedOutput,
    ToolCall,
    parse,
    render,
    render_multimodal,
    render_tools,
)
from geode.tokenizer import SPECIAL_TOKENS
from tests.test_tokenizer_json import real_tokenizer_json  # noqa: F401 (a fixture used below)

TEMPLATE = Path(__file__).resolve().parents[1].parent / "shared/fixtures/gemma3_chat_template.jinja"

WORDS = "hello world 日本語 中文 😀 Ünïcödé x=1; def f(): return 42 \\n { } [ ] \" ' ok".split()
PADDING = ["", " ", "  ", "\n", "\n\n", "\t", " \n "]


@pytest.fixture(scope="module")
def reference():
    """The Gemma 3 template rendered by transformers (bos_token, raise_exception, sandbox)."""
    if not TEMPLATE.is_file():
        pytest.skip(f"reference chat template not found at {TEMPLATE}")
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    template = TEMPLATE.read_text()

    def ref(messages: list[dict], add_generation_prompt: bool = True, bos_token: str = "<bos>"):
        out, _ = utils.render_jinja_template(
            conversations=[messages],
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
        )
        return out[0]

    return ref


def random_str(rng: random.Random, specials: bool = True) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randrange(0, 8))]
    if specials and rng.random() < 0.1:
        words.append(rng.choice(SPECIAL_TOKENS))
    inner = rng.choice([" ", "\n", "  "]).join(words)
    return rng.choice(PADDING) + inner + rng.choice(PADDING)


def random_content(rng: random.Random, image_type: str = "image") -> Any:
    if rng.random() < 0.5:
        return random_str(rng)
    parts: list[dict] = []
    for _ in range(rng.randrange(0, 4)):
        if rng.random() < 0.3:
            parts.append(
                {"type": image_type, image_type: "cat.png"}
                if rng.random() < 0.5
                else {"type": image_type}
            )
        else:
            parts.append({"type": "text", "text": random_str(rng)})
    return parts


def random_conversation(rng: random.Random, roles: list[str] | None = None) -> list[dict]:
    msgs: list[dict] = []
    if roles is None:
        if rng.random() < 0.5:
            system = random_str(rng)
            content = system if rng.random() < 0.6 else [{"type": "text", "text": system}]
            msgs.append({"role": "system", "content": content})
        roles = [["user", "assistant"][k % 2] for k in range(rng.randrange(1, 7))]
    for k, r in enumerate(roles):  # (a leading system prompt must be text, as in the template)
        content = random_str(rng) if (r, k) == ("system", 0) else random_content(rng)
        msgs.append({"role": r, "content": content})
    return msgs


def _both(ref, messages: list[dict], **kwargs: Any) -> tuple[Any, Any]:
    """(ours, reference): each the rendered text or the exception raised."""
    import copy

    results = []
    for fn in (lambda m: render(m, **kwargs), lambda m: ref(m, **kwargs)):
        try:
            results.append(fn(copy.deepcopy(messages)))
        except Exception as e:  # noqa: BLE001 - compared below
            results.append(e)
    return results[0], results[1]


# ---- equality with the Gemma 3 template ------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_template(reference, add_generation_prompt: bool) -> None:
    for seed in range(300):
        msgs = random_conversation(random.Random(seed))
        ours = render(msgs, add_generation_prompt=add_generation_prompt)
        assert ours == reference(msgs, add_generation_prompt=add_generation_prompt), msgs


def test_render_without_bos(reference) -> None:
    for seed in range(50):
        msgs = random_conversation(random.Random(seed))
        assert render(msgs, bos=False) == reference(msgs, bos_token="")


def test_image_url_parts_render_like_image_parts(reference) -> None:
    for seed in range(50):
        rng = random.Random(seed)
        msgs = [{"role": "user", "content": random_content(rng, "image_url")} for _ in range(1)]
        as_image = json.loads(json.dumps(msgs).replace('"image_url"', '"image"'))
        assert render(msgs) == reference(as_image)


def test_role_alternation_errors(reference) -> None:
    """Random role orders: we raise exactly when the template raises, with its message."""
    raised = rendered = 0
    for seed in range(400):
        rng = random.Random(seed)
        roles = [
            rng.choice(["user", "assistant", "system", "model"]) for _ in range(rng.randrange(1, 6))
        ]
        ours, ref = _both(reference, random_conversation(rng, roles))
        if isinstance(ref, Exception):
            raised += 1
            assert isinstance(ours, ChatFormatError), (roles, ours)
            assert str(ours).startswith(str(ref)), (roles, ours, ref)
            assert str(ref) == ALTERNATION_ERROR
        else:
            rendered += 1
            assert ours == ref, roles
    assert raised > 50 and rendered > 50  # both sides exercised


@pytest.mark.parametrize("bad", [None, 42, 3.5])
def test_invalid_content_type(reference, bad: Any) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": bad}]
    ours, ref = _both(reference, msgs)
    assert isinstance(ref, Exception) and isinstance(ours, ChatFormatError)
    assert str(ours).startswith(str(ref)) and "message 1" in str(ours)


def test_empty_conversation(reference) -> None:
    ours, ref = _both(reference, [])
    assert isinstance(ref, Exception) and isinstance(ours, ChatFormatError)


# ---- tools, thinking, round trip -------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city (°C).",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"name": "add", "parameters": {"type": "object", "properties": {"a": {}, "b": {}}}},
]


def random_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 2 and r < 0.25:
        return {
            random_str(rng, False).strip() or "k": random_json(rng, depth + 1)
            for _ in range(rng.randrange(3))
        }
    if depth < 2 and r < 0.4:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    return rng.choice(
        [random_str(rng, False), rng.randrange(-999, 999), rng.random(), True, None, '}{"<']
    )


def random_assistant(rng: random.Random) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": random_str(rng, specials=False)}
    if rng.random() < 0.5:
        msg["thinking"] = random_str(rng, specials=False)
    calls = []
    for k in range(rng.choice([0, 0, 1, 2, 3])):
        args = {f"arg{j}": random_json(rng) for j in range(rng.randrange(3))}
        call: dict[str, Any] = {
            "type": "function",
            "function": {
                "name": rng.choice(["get_weather", "add", "f_ü"]),
                "arguments": json.dumps(args),
            },
        }
        if rng.random() < 0.7:
            call["id"] = f"call_{seed_id(rng)}_{k}"
        calls.append(call)
    if calls:
        msg["tool_calls"] = calls
        if rng.random() < 0.3:
            msg["content"] = None
    return msg


def seed_id(rng: random.Random) -> str:
    return "".join(rng.choice("abcdef0123456789") for _ in range(6))


def _expected(msg: dict) -> ParsedOutput:
    calls = [
        ToolCall(c["function"]["name"], json.loads(c["function"]["arguments"]), c.get("id"))
        for c in msg.get("tool_calls", [])
    ]
    return ParsedOutput((msg["content"] or "").strip(), (msg.get("thinking") or "").strip(), calls)


def _model_output(msg: dict) -> str:
    """What the model would have generated for this assistant turn (up to <end_of_turn>)."""
    user = {"role": "user", "content": "hi"}
    prompt = render([user])
    full = render([user, msg], add_generation_prompt=False)
    assert full.startswith(prompt)
    return full[len(prompt) :]


def test_assistant_turn_round_trips_through_parse() -> None:
    for seed in range(300):
        msg = random_assistant(random.Random(seed))
        out = _model_output(msg)
        assert out.endswith("<end_of_turn>\n")
        parsed = parse(out)
        assert parsed == _expected(msg), (msg, out)
        # and back: rendering the parsed message gives the same text
        assert _model_output(parsed.to_message()) == out


def test_thinking_generation_prompt_round_trips() -> None:
    user = [{"role": "user", "content": "2+2?"}]
    prompt = render(user, think=True)
    assert prompt == render(user) + "<start_of_thinking>"
    msg = {"role": "assistant", "content": "4", "thinking": "two plus two"}
    out = _model_output(msg)
    assert out.startswith("<start_of_thinking>")
    assert parse(out[len("<start_of_thinking>") :], in_thinking=True) == _expected(msg)


def test_tool_declarations(reference) -> None:
    for seed in range(50):
        msgs = random_conversation(random.Random(seed))
        with_tools = render(msgs, tools=TOOLS)
        block = render_tools(TOOLS) + "\n\n"
        assert with_tools.replace(block, "", 1) == render(msgs) == reference(msgs)
        # declared once, inside the first user turn, right after the system prompt
        head = "<bos><start_of_turn>user\n"
        if msgs[0]["role"] == "system":
            system = msgs[0]["content"]
            head += (system if isinstance(system, str) else system[0]["text"]) + "\n\n"
        assert with_tools.startswith(head + block)
    lines = render_tools(TOOLS).splitlines()[1:-1]
    assert [json.loads(x)["function"]["name"] for x in lines] == ["get_weather", "add"]
    assert all(json.loads(x)["type"] == "function" for x in lines)


def test_tool_results_conversation() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    call2 = {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [call, call2]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "assistant", "content": "Done."},
    ]
    text = render(msgs, tools=TOOLS)
    turns = text.split("<start_of_turn>")[1:]
    assert [t.split("\n", 1)[0] for t in turns] == ["user", "model", "user", "model", "model"]
    results = turns[2].split("\n", 1)[1].removesuffix("<end_of_turn>\n").split("\n")
    decoded = [
        json.loads(
            r.removeprefix("<start_of_tool_response>").removesuffix("<end_of_tool_response>")
        )
        for r in results
    ]
    assert decoded == [
        {"name": "add", "id": "c1", "content": "4"},
        {"name": "get_weather", "id": "c2", "content": "sunny"},
    ]
    for bad in ([msgs[1], msgs[3]], [msgs[1], msgs[2], msgs[3], msgs[1]]):
        with pytest.raises(ChatFormatError, match="roles must alternate"):
            render(bad)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported part type 'audio'"),
        ([{"role": "user", "content": ["x"]}], "part 0"),
        ("hello", "list of dicts"),
        (
            [{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "x"}],
            "text parts",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                },
            ],
            "arguments are not JSON",
        ),
    ],
)
def test_render_errors(messages: Any, match: str) -> None:
    with pytest.raises(ChatFormatError, match=match):
        render(messages)


# ---- parse never raises ----------------------------------------------------------------------

FRAGMENTS = [
    *SPECIAL_TOKENS,
    "<eos>",
    "<end_of_turn>",
    '{"name": "f", "arguments": {"x": 1}}',
    '{"name": "f", "arguments": "{\\"x\\": 1}"}',
    '{"name": 3}',
    '{"arguments": {}}',
    "[1, 2]",
    '{"name": "g", "arguments": [1]}',
    "{",
    "}",
    '"',
    "\\",
    "null",
    "[" * 50,
    '{"a":' * 3000,
    "text ",
    "日本 😀",
    "\n",
    "\ud800",  # lone surrogate
    "\x00",
]


def test_parse_never_raises_on_fuzzed_output() -> None:
    for seed in range(2000):
        rng = random.Random(seed)
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(12)))
        out = parse(text, in_thinking=rng.random() < 0.2)
        assert isinstance(out, ParsedOutput)
        assert isinstance(out.content, str) and isinstance(out.thinking, str)
        assert all(
            isinstance(c, ToolCall) and isinstance(c.arguments, dict) for c in out.tool_calls
        )
        assert all(isinstance(e, str) for e in out.errors)
    for weird in (None, b"bytes \xff", 42, ["list"]):
        out = parse(weird)  # type: ignore[arg-type]
        assert isinstance(out, ParsedOutput) and out.errors


def test_parse_flags_malformed_output() -> None:
    bad_json = '<start_of_tool_call>{"name": "f", "arguments": {oops}<end_of_tool_call>'
    out = parse("Let me check." + bad_json + "<end_of_turn>")
    assert out.tool_calls == [] and "invalid JSON" in out.errors[0]
    assert out.content == "Let me check." + bad_json  # the text is kept, nothing lost

    out = parse("<start_of_thinking>still thinking when cut off")
    assert out.thinking == "still thinking when cut off" and out.content == ""
    assert "unterminated thinking" in out.errors[0]

    out = parse('<start_of_tool_call>{"name": "f", "arguments": {}}')
    assert out.tool_calls == [ToolCall("f", {})] and "missing <end_of_tool_call>" in out.errors[0]

    out = parse("answer<end_of_thinking> more<end_of_tool_call>")
    assert out.content == "answer more" and len(out.errors) == 2

    out = parse("hi<end_of_turn>\n<start_of_turn>user\nmore")
    assert out.content == "hi" and "after <end_of_turn>" in out.errors[0]

    out = parse("fine answer<end_of_turn><eos>")
    assert out.content == "fine answer" and out.ok


# ---- images and video: render_multimodal (issue #18 item 5) ---------------------------------


def _png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _noise(w: int, h: int, seed: int) -> Any:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def real_pair(real_hf: Path, real_tokenizer_json: Path):  # noqa: F811
    """(geode's tokenizer.model tokenizer of the real Gemma 3 270M, transformers' tokenizer of
    the same vocabulary with <image_soft_token> added as id 262144, as HF's tokenizer.json has)."""
    from transformers import PreTrainedTokenizerFast

    from geode.tokenizer import load_tokenizer

    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(real_tokenizer_json / "tokenizer.json"),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={  # the missing image token is added: id 262144
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    assert hf.image_token_id == 262144 and hf.boi_token_id == 255999
    return load_tokenizer(real_hf), hf


@pytest.mark.parametrize("pas", [False, True], ids=["plain", "pan-and-scan"])
def test_multimodal_prompt_equals_gemma3_processor(reference, real_pair, tmp_path, pas) -> None:
    """Template + Gemma3Processor (real 270M vocabulary, <image_soft_token> = 262144) against
    render_multimodal + encode_with_images + process: token ids and pixels equal."""
    from transformers import Gemma3Processor

    from tests.test_vision import PAS, _hf_processor

    tok, hf = real_pair
    wide, square, tall = _noise(600, 280, 1), _noise(90, 90, 2), _noise(300, 800, 3)
    wide.save(tmp_path / "wide.png")
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image", "path": "wide.png"},
                {"type": "text", "text": " and\n"},
                {"type": "image_url", "image_url": {"url": _data_url(_png(square))}},
            ],
        },
        {"role": "assistant", "content": "The first is wider."},
        {"role": "user", "content": [{"type": "image", "image": tall}, {"type": "text", "text": "And this?"}]},
    ]  # fmt: skip
    got = render_multimodal(msgs, do_pan_and_scan=pas, image_dir=tmp_path)
    as_template = [
        {**m, "content": [{"type": "image"} if p["type"] != "text" else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in msgs
    ]
    text = reference(as_template)
    processor = Gemma3Processor(_hf_processor(64), hf, image_seq_length=256)
    want = processor(
        text=[text],
        images=[[wide, square, tall]],
        do_pan_and_scan=pas,
        return_tensors="np",
        add_special_tokens=False,
        **PAS,
    )
    ids = got.token_ids(tok, image_token_index=262144)
    assert ids == want["input_ids"][0].tolist()
    assert ids.count(262144) == 256 * (3 + sum(got.num_crops))
    assert got.text.replace("<image_soft_token>", "") == processor.tokenizer.decode(
        want["input_ids"][0], skip_special_tokens=False
    ).replace("<image_soft_token>", "")
    pixels = got.process(64)
    assert got.num_crops == pixels.num_crops == ([2, 0, 3] if pas else [0, 0, 0])
    assert pixels.pixel_values.numpy().tobytes() == want["pixel_values"].tobytes()


def test_text_only_and_typed_markers(real_pair) -> None:
    """Text-only messages render as `render` does; image markers typed in text stay text."""
    from geode.chat import render_multimodal

    tok, _ = real_pair
    assert tok.encode("<start_of_image><end_of_image>") == [255999, 256000]  # single ids
    assert len(tok.encode("<image_soft_token>")) == 7  # not a piece of tokenizer.model
    assert tok.image_token_id() == 262144 == tok.encode_with_images([1])[0]
    for seed in range(20):
        msgs = random_conversation(random.Random(seed))
        msgs = [{**m, "content": random_str(random.Random(k))} for k, m in enumerate(msgs)]
        got = render_multimodal(msgs)
        assert got.parts == [render(msgs)] and got.images == [] and got.text == render(msgs)
    typed = [{"role": "user", "content": "see <start_of_image><image_soft_token><end_of_image>"}]
    got = render_multimodal(typed)
    assert got.images == [] and got.num_crops == []
    ids = got.token_ids(tok)
    assert 262144 not in ids and ids == tok.encode(render(typed))
    assert ids.count(255999) == 1  # one id, not expanded into an image sequence


def test_json_tokenizer_image_token() -> None:
    """A tokenizer.json with <image_soft_token>: its id is the image id; typed, it is an error."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    from geode.tokenizer import Tokenizer, TokenizerJsonVocab

    vocab = {p: i for i, p in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", *"abc"])}
    vocab |= {f"<0x{b:02X}>": len(vocab) + b for b in range(256)}
    tk = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback()])
    tk.add_special_tokens(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    tok = Tokenizer(TokenizerJsonVocab(tk.to_str()))
    soft = tok.piece_to_id("<image_soft_token>")
    boi, eoi = tok.piece_to_id("<start_of_image>"), tok.piece_to_id("<end_of_image>")
    assert tok.image_token_id() == soft
    assert tok.encode_with_images(["a<start_of_image>", 2, "<end_of_image>b"]) == [
        tok.encode("a")[0], boi, soft, soft, eoi, tok.encode("b")[0]
    ]  # fmt: skip
    with pytest.raises(ValueError, match="piece 0 holds <image_soft_token>.*typed as text"):
        tok.encode_with_images(["a<image_soft_token>"])
    with pytest.raises(ValueError, match=f"image_token_index 7 differs .* id {soft}"):
        tok.image_token_id(7)
    with pytest.raises(ValueError, match="part 1: expected text or a positive count, got 0"):
        tok.encode_with_images(["a", 0])


def test_media_errors_are_clear(tmp_path) -> None:
    from geode.image import ImageError

    inside = tmp_path / "allowed"
    inside.mkdir()
    _noise(8, 8, 0).save(tmp_path / "secret.png")
    (inside / "link.png").symlink_to(tmp_path / "secret.png")
    png = _png(_noise(8, 8, 1))

    def render_one(part: dict, **kw: Any) -> Any:
        return render_multimodal([{"role": "user", "content": [part]}], **kw)

    def url(u: str) -> dict:
        return {"type": "image_url", "image_url": {"url": u}}

    cases = [
        (url("https://example.com/cat.png"), "part 0: image https://.*not fetched: no network"),
        (url("http://example.com/cat.png"), "not fetched: no network"),
        (url("data:image/png;base64,%%%"), "corrupt data: URL .*bad base64"),
        (url("data:image/png,rawbytes"), r"corrupt data: URL .*expected data:<type>;base64"),
        (url(_data_url(b"not an image")), "not an image in a supported format"),
        (url(_data_url(png[: len(png) // 2])), "corrupt or truncated image data"),
        (url("ftp://host/cat.png"), "unsupported URL scheme 'ftp'"),
        ({"type": "image", "path": "../secret.png"}, "outside the allowed directory"),
        ({"type": "image", "path": str(tmp_path / "secret.png")}, "outside the allowed directory"),
        ({"type": "image", "path": "link.png"}, "outside the allowed directory"),
        ({"type": "image", "path": "missing.png"}, "missing.png: no such file in"),
        ({"type": "image", "url": "file://" + str(inside / "x.png")}, "no such file"),
        ({"type": "image"}, ChatFormatError),
        ({"type": "image_url", "image_url": {}}, ChatFormatError),
    ]
    for part, match in cases:
        err, pattern = (match, None) if isinstance(match, type) else (ImageError, match)
        with pytest.raises(err, match=pattern):
            render_one(part, image_dir=inside)
    with pytest.raises(ImageError, match="local files are not allowed here"):
        render_one({"type": "image", "path": str(tmp_path / "secret.png")})
    (inside / "ok.png").write_bytes(png)
    assert len(render_one({"type": "image", "url": "file://" + str(inside / "ok.png")}, image_dir=inside).images) == 1  # fmt: skip
    with pytest.raises(ChatFormatError, match="part 0: a video part's fps must be a number"):
        render_one({"type": "video", "path": "clip.mp4", "fps": "2"}, image_dir=inside)
    with pytest.raises(ChatFormatError, match="video parts need render_multimodal"):
        render([{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}]}])


def test_video_part_renders_frames_with_timestamps(tmp_path) -> None:
    """A video part: its sampled frames, each "mm:ss " + the image sequence, joined by spaces."""
    import numpy as np

    from geode.image import image_sequence
    from geode.video import load_video
    from tests.test_video import write_video

    write_video(tmp_path / "clip.mp4", frames=30, rate=10)  # 3 s
    msgs = [
        {"role": "user", "content": [
            {"type": "video", "path": "clip.mp4", "fps": 2},
            {"type": "text", "text": "What changes?"},
        ]},
    ]  # fmt: skip
    got = render_multimodal(msgs, image_dir=tmp_path, mm_tokens_per_image=4)
    video = load_video(tmp_path / "clip.mp4", fps=2)
    assert video.indices == [0, 5, 10, 15, 20, 25] and len(got.images) == 6
    frames = " ".join(f"00:0{int(t)} {image_sequence(4)}" for t in video.timestamps)
    assert frames.startswith("00:00 \n\n<start_of_image>") and "00:02 " in frames
    assert got.text == render([{"role": "user", "content": "X"}]).replace(
        "X", frames + "What changes?"
    )
    for image, frame in zip(got.images, video.frames, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(frame))
    assert got.process(16).pixel_values.shape == (6, 3, 16, 16)
    url = {"type": "video_url", "video_url": {"url": _data_url((tmp_path / "clip.mp4").read_bytes(), "video/mp4")}}  # fmt: skip
    again = render_multimodal([{"role": "user", "content": [url]}], video_fps=1, max_video_frames=2)
    assert len(again.images) == 2 and "00:01 " in again.text
