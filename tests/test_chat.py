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
    render_tools,
)
from geode.tokenizer import SPECIAL_TOKENS

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
