"""Chat format: OpenAI-shaped messages <-> Gemma 3 turn text, and parsing of model output.

`render` produces exactly what the Gemma 3 chat template produces for the messages that
template handles (system prompt folded into the first user turn, `assistant` -> `model`,
image parts -> `<start_of_image>`, the same role-alternation errors), and extends it with
tool declarations, tool calls, tool results and thinking sections:

    <bos><start_of_turn>user
    SYSTEM PROMPT

    <start_of_tools>
    {"type": "function", "function": {"name": "add", "parameters": {...}}}
    <end_of_tools>

    What is 2+3?<end_of_turn>
    <start_of_turn>model
    <start_of_thinking>I should call add.<end_of_thinking><start_of_tool_call>{"name": "add",
    "arguments": {"a": 2, "b": 3}, "id": "call_0"}<end_of_tool_call><end_of_turn>
    <start_of_turn>user
    <start_of_tool_response>{"name": "add", "id": "call_0", "content": "5"}<end_of_tool_response><end_of_turn>
    <start_of_turn>model
    2+3 = 5<end_of_turn>

`render_multimodal` renders the same text with the images: image parts become Gemma 3's image
sequence and video parts their timestamped frames, returned with the images in order for the
processor (docs/vision.md). `parse` turns a model's raw output back into content, thinking and
tool calls; it never raises on malformed output but lists what failed in
`ParsedOutput.errors`. See docs/tokenizer.md for the full description.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

from .tokenizer import (
    BOS,
    END_OF_THINKING,
    END_OF_TOOL_CALL,
    END_OF_TOOL_RESPONSE,
    END_OF_TOOLS,
    END_OF_TURN,
    EOS,
    SPECIAL_TOKENS,
    START_OF_IMAGE,
    START_OF_THINKING,
    START_OF_TOOL_CALL,
    START_OF_TOOL_RESPONSE,
    START_OF_TOOLS,
    START_OF_TURN,
)

# The Gemma 3 template's error messages (raise_exception), reused verbatim.
ALTERNATION_ERROR = "Conversation roles must alternate user/assistant/user/assistant/..."
CONTENT_TYPE_ERROR = "Invalid content type"

ROLES = ("system", "user", "assistant", "model", "tool")
IMAGE_PART_TYPES = ("image", "image_url")  # the template knows "image"; image_url is OpenAI's
VIDEO_PART_TYPES = ("video", "video_url")  # render_multimodal only (video_url as vLLM's)


class ChatFormatError(ValueError):
    """Messages that cannot be rendered (bad roles, order or content)."""


@dataclass
class ToolCall:
    """A function call: its name, its arguments (a JSON object) and an optional call id."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI `tool_calls` entry (arguments as a JSON string)."""
        out: dict[str, Any] = {
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }
        if self.id is not None:
            out = {"id": self.id, **out}
        return out


@dataclass
class ParsedOutput:
    """A model turn split into its parts; `errors` lists what could not be parsed."""

    content: str = ""
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing failed to parse."""
        return not self.errors

    def to_message(self) -> dict[str, Any]:
        """An OpenAI-shaped assistant message (with `thinking` when there is any)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.thinking:
            msg["thinking"] = self.thinking
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


# ---- rendering ------------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _role(msg: Any, i: int) -> str:
    if not isinstance(msg, Mapping):
        raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', got {msg!r}")
    role = msg.get("role")
    if role not in ROLES:
        raise ChatFormatError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
    return role


def _parts(content: Sequence[Any], i: int) -> list[Mapping[str, Any]]:
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise ChatFormatError(
                f"message {i}, part {j}: expected a dict with 'type', got {part!r}"
            )
    return list(content)


# A media hook: (part, message index, part index) -> the text the part renders to.
MediaHook = Callable[[Mapping[str, Any], int, int], str]


def _content(msg: Mapping[str, Any], i: int, media: MediaHook | None = None) -> str:
    """A user/model turn's content as the template renders it (trimmed text, image tokens);
    `media` renders image and video parts instead (`render_multimodal`)."""
    content = msg.get("content")
    if content is None and msg.get("tool_calls"):
        return ""
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, (list, tuple)):
        out = []
        for j, part in enumerate(_parts(content, i)):
            kind = part["type"]
            if kind in IMAGE_PART_TYPES:
                out.append(START_OF_IMAGE if media is None else media(part, i, j))
            elif kind in VIDEO_PART_TYPES and media is not None:
                out.append(media(part, i, j))
            elif kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ChatFormatError(f"message {i}, part {j}: text part without a 'text' str")
                out.append(part["text"].strip())
            else:
                video = " (video parts need render_multimodal)" if kind in VIDEO_PART_TYPES else ""
                raise ChatFormatError(
                    f"message {i}, part {j}: unsupported part type {kind!r} "
                    f"(expected 'text' or one of {IMAGE_PART_TYPES}){video}"
                )
        return "".join(out)
    raise ChatFormatError(f"{CONTENT_TYPE_ERROR}: message {i} content is {type(content).__name__}")


def _plain_text(msg: Mapping[str, Any], i: int, what: str) -> str:
    """Text-only content (system prompt, tool result), untrimmed; images are errors."""
    content = msg.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(_parts(content, i)):
            if part["type"] != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(f"message {i}, part {j}: a {what} may only have text parts")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatFormatError(f"{CONTENT_TYPE_ERROR}: {what} message {i} content is {content!r}")


def _tool_declaration(tool: Any, k: int) -> dict[str, Any]:
    if isinstance(tool, Mapping) and isinstance(tool.get("function"), Mapping):
        fn = tool["function"]
    elif isinstance(tool, Mapping):
        fn = tool
    else:
        raise ChatFormatError(f"tools[{k}] must be a dict, got {tool!r}")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(f"tools[{k}]: a tool needs a non-empty 'name'")
    return {"type": "function", "function": dict(fn)}


def render_tools(tools: Sequence[Any]) -> str:
    """The tool-declaration block: one OpenAI-shaped JSON declaration per line."""
    lines = [_dumps(_tool_declaration(t, k)) for k, t in enumerate(tools)]
    return START_OF_TOOLS + "\n" + "\n".join(lines) + "\n" + END_OF_TOOLS


def _tool_call(call: Any, i: int, j: int) -> ToolCall:
    """Normalise an OpenAI / flat / ToolCall tool call."""
    if isinstance(call, ToolCall):
        return call
    if not isinstance(call, Mapping):
        raise ChatFormatError(f"message {i}: tool_calls[{j}] must be a dict, got {call!r}")
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"message {i}: tool_calls[{j}] has no function name")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ChatFormatError(
                f"message {i}: tool_calls[{j}] ({name}) arguments are not JSON: {e}"
            ) from e
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise ChatFormatError(f"message {i}: tool_calls[{j}] ({name}) arguments must be an object")
    call_id = call.get("id")
    return ToolCall(name, dict(args), None if call_id is None else str(call_id))


def render_tool_call(call: ToolCall) -> str:
    """One tool call as the model writes it."""
    obj: dict[str, Any] = {"name": call.name, "arguments": call.arguments}
    if call.id is not None:
        obj["id"] = call.id
    return START_OF_TOOL_CALL + _dumps(obj) + END_OF_TOOL_CALL


def _model_body(
    msg: Mapping[str, Any], i: int, media: MediaHook | None = None
) -> list[tuple[str, str]]:
    """A model turn's body as ("assistant", thinking + content) and ("tool_call", call) parts."""
    thinking = msg.get("thinking", msg.get("reasoning_content"))
    if thinking is not None and not isinstance(thinking, str):
        raise ChatFormatError(f"message {i}: 'thinking' must be a str")
    thinking = (thinking or "").strip()
    out = START_OF_THINKING + thinking + END_OF_THINKING if thinking else ""
    parts = [("assistant", out + _content(msg, i, media))]
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, (list, tuple)):
        raise ChatFormatError(f"message {i}: tool_calls must be a list")
    parts += [("tool_call", render_tool_call(_tool_call(c, i, j))) for j, c in enumerate(calls)]
    return parts


def _tool_results(group: list[tuple[int, Mapping[str, Any]]], names: dict[str, str]) -> str:
    blocks = []
    for i, msg in group:
        obj: dict[str, Any] = {}
        call_id = msg.get("tool_call_id")
        name = msg.get("name") or (names.get(str(call_id)) if call_id is not None else None)
        if name:
            obj["name"] = name
        if call_id is not None:
            obj["id"] = str(call_id)
        obj["content"] = _plain_text(msg, i, "tool result")
        blocks.append(START_OF_TOOL_RESPONSE + _dumps(obj) + END_OF_TOOL_RESPONSE)
    return "\n".join(blocks)


def render(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Any] | None = None,
    bos: bool = True,
    *,
    think: bool = False,
) -> str:
    """Messages -> Gemma 3 prompt text (the chat template, plus tools and thinking).

    `tools` are declared in the first user turn, after the system prompt. Consecutive
    `tool` messages form one user turn of tool results. `think=True` opens a thinking
    section after the generation prompt (parse the output with `in_thinking=True`).
    """
    parts = render_parts(messages, add_generation_prompt, tools, bos, think=think)
    return "".join(text for _, text in parts)


def render_parts(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: Sequence[Any] | None = None,
    bos: bool = True,
    *,
    think: bool = False,
) -> list[tuple[str, str]]:
    """`render`'s text cut into labelled spans: [(kind, text)], joined they equal `render`.

    kind is "assistant" for what the model writes in its turns (thinking, content and the
    closing `<end_of_turn>`), "tool_call" for its tool calls, and "prompt" for everything
    else (turn headers, user, system and tool-result text): SFT trains on the model's spans.
    """
    return _spans(messages, add_generation_prompt, tools, bos, think, None)


def _spans(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    tools: Sequence[Any] | None,
    bos: bool,
    think: bool,
    media: MediaHook | None,
) -> list[tuple[str, str]]:
    """`render_parts` with image and video parts rendered by `media` (None: `<start_of_image>`)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("messages is empty")
    roles = [_role(m, i) for i, m in enumerate(messages)]
    prefix, start = "", 0
    if roles[0] == "system":
        prefix, start = _plain_text(messages[0], 0, "system") + "\n\n", 1
    if tools:
        prefix += render_tools(tools) + "\n\n"

    # Turns: each message, except that consecutive tool messages make one (user) turn.
    turns: list[tuple[str, list[tuple[int, Mapping[str, Any]]]]] = []
    for i in range(start, len(messages)):
        if roles[i] == "tool" and turns and turns[-1][0] == "tool":
            turns[-1][1].append((i, messages[i]))
        else:
            turns.append((roles[i], [(i, messages[i])]))

    names: dict[str, str] = {}  # tool call id -> function name, for tool results
    out: list[tuple[str, str]] = [("prompt", BOS if bos else "")]
    for k, (role, group) in enumerate(turns):
        i, msg = group[0]
        if (role in ("user", "tool")) != (k % 2 == 0):
            expected = "user (or tool results)" if k % 2 == 0 else "assistant"
            raise ChatFormatError(
                f"{ALTERNATION_ERROR} (message {i} has role {role!r}, expected {expected})"
            )
        if role == "tool":
            turn_role, body = "user", [("prompt", _tool_results(group, names))]
        elif role in ("assistant", "model"):
            turn_role, body = "model", _model_body(msg, i, media)
            for j, c in enumerate(msg.get("tool_calls") or []):
                call = _tool_call(c, i, j)
                if call.id is not None:
                    names[call.id] = call.name
        else:
            turn_role, body = role, [("prompt", _content(msg, i, media))]
        out.append(("prompt", START_OF_TURN + turn_role + "\n" + (prefix if k == 0 else "")))
        out.extend(body)
        if turn_role == "model":
            out += [("assistant", END_OF_TURN), ("prompt", "\n")]
        else:
            out.append(("prompt", END_OF_TURN + "\n"))
    if add_generation_prompt:
        out.append(("prompt", START_OF_TURN + "model\n" + (START_OF_THINKING if think else "")))
    return [(kind, text) for kind, text in out if text]


# ---- images and video -----------------------------------------------------------------------


@dataclass
class MultimodalPrompt:
    """A rendered prompt with its images (`render_multimodal`): text pieces and, per image and
    pan & scan crop, its count of `<image_soft_token>`s; `images` in the order of those."""

    parts: list[str | int]
    images: list[Any]  # PIL images: each image part's, each sampled video frame
    num_crops: list[int]  # pan & scan crops following each image (0 for video frames)
    pan_and_scan: list[bool]  # per image: processed with pan & scan (never for video frames)

    @property
    def text(self) -> str:
        """The expanded prompt text (transformers' Gemma3Processor's `text`)."""
        from .image import parts_text

        return parts_text(self.parts)

    def token_ids(self, tokenizer: Any, image_token_index: int | None = None) -> list[int]:
        """The prompt's token ids, soft tokens as the config's `image_token_index`."""
        return tokenizer.encode_with_images(self.parts, image_token_index=image_token_index)

    def process(self, size: int = 896) -> Any:
        """`geode.image.ProcessedImages` of the images: pixel_values (N, 3, size, size), each
        image then its crops, in the order of the soft tokens."""
        import torch

        from .image import ProcessedImages, process_images

        done = [
            process_images([image], size, do_pan_and_scan=pan)
            for image, pan in zip(self.images, self.pan_and_scan, strict=True)
        ]
        crops = [n for d in done for n in d.num_crops]
        assert crops == self.num_crops, (crops, self.num_crops)  # pan & scan decided at render
        pixels = [d.pixel_values for d in done] or [torch.empty(0, 3, size, size)]
        return ProcessedImages(torch.cat(pixels), crops)


def _media_ref(part: Mapping[str, Any], where: str, keys: tuple[str, ...]) -> Any:
    """What an image/video part points at: `<type>_url.url` (OpenAI) or the first of `keys`."""
    kind = part["type"]
    if kind.endswith("_url"):
        ref = part.get(kind)
        ref = ref.get("url") if isinstance(ref, Mapping) else ref
    else:
        ref = next((part[k] for k in keys if part.get(k) is not None), None)
    if ref is None:
        shape = f"{{'{kind}': {{'url': ...}}}}" if kind.endswith("_url") else f"one of {keys}"
        raise ChatFormatError(f"{where}: a {kind!r} part without its data (expected {shape})")
    return str(ref) if isinstance(ref, PathLike) else ref


def _part_image(part: Mapping[str, Any], where: str, image_dir: Any) -> Any:
    """The PIL image of an image part (a PIL image, bytes, a data: URL or an allowed file)."""
    from PIL import Image

    from .image import load_image, media_source

    ref = _media_ref(part, where, ("image", "path", "url"))
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, bytes | bytearray):
        return load_image(bytes(ref), name=where)
    if not isinstance(ref, str):
        raise ChatFormatError(f"{where}: image must be a PIL image, bytes or a str, got {ref!r}")
    return load_image(media_source(ref, image_dir, f"{where}: image"), name=f"{where}: image")


def _part_video(
    part: Mapping[str, Any], where: str, image_dir: Any, fps: float, max_frames: int | None
) -> Any:
    """The sampled frames (`geode.video.Video`) of a video part (bytes, data: URL or a file)."""
    from .video import VideoError, load_video

    rate = part.get("fps", fps)
    if not isinstance(rate, int | float) or isinstance(rate, bool):
        raise ChatFormatError(f"{where}: a video part's fps must be a number, got {rate!r}")
    ref = _media_ref(part, where, ("video", "path", "url"))
    if not isinstance(ref, str | bytes | bytearray):
        raise ChatFormatError(f"{where}: video must be bytes or a str, got {type(ref).__name__}")
    if isinstance(ref, str):
        from .image import media_source

        ref = media_source(ref, image_dir, f"{where}: video", VideoError)
    return load_video(ref, rate, max_frames, name=f"{where}: video")


def render_multimodal(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: Sequence[Any] | None = None,
    bos: bool = True,
    *,
    think: bool = False,
    mm_tokens_per_image: int = 256,
    do_pan_and_scan: bool = False,
    image_dir: str | PathLike | None = None,
    video_fps: float = 1.0,
    max_video_frames: int | None = 32,
) -> MultimodalPrompt:
    """`render` with the images: each image part becomes Gemma 3's image sequence
    (`geode.image.image_parts`, with pan & scan crops when `do_pan_and_scan`), each video part
    its frames sampled at `video_fps` (a part's own "fps" wins), each frame "mm:ss " then its
    image sequence, frames joined by spaces (`geode.video`). Image parts: `{"type":
    "image_url", "image_url": {"url": "data:image/png;base64,..."}}` or `{"type": "image",
    "image" | "path" | "url": ...}` (a PIL image, bytes, a data: URL or a file); video parts:
    `video_url` / `video` the same way. Files are read only inside `image_dir` (None: none);
    http(s) URLs are not fetched. Markers typed in text (`<start_of_image>`) are not images.
    """
    from .image import image_parts, merge_parts, pan_and_scan_boxes
    from .video import timestamp_text

    if not isinstance(mm_tokens_per_image, int) or mm_tokens_per_image < 1:
        raise ChatFormatError(f"mm_tokens_per_image must be >= 1, got {mm_tokens_per_image!r}")
    sentinel = f"\ue000{uuid.uuid4().hex}\ue000"  # stands for one media part in the text
    media: list[list[str | int]] = []
    images: list[Any] = []
    num_crops: list[int] = []
    pan: list[bool] = []

    def hook(part: Mapping[str, Any], i: int, j: int) -> str:
        where = f"message {i}, part {j}"
        if part["type"] in IMAGE_PART_TYPES:
            image = _part_image(part, where, image_dir)
            crops = len(pan_and_scan_boxes(image.width, image.height)) if do_pan_and_scan else 0
            images.append(image)
            num_crops.append(crops)
            pan.append(do_pan_and_scan)
            media.append(image_parts(mm_tokens_per_image, crops))
        else:
            video = _part_video(part, where, image_dir, video_fps, max_video_frames)
            seq: list[str | int] = []
            for k, (frame, t) in enumerate(zip(video.frames, video.timestamps, strict=True)):
                seq += [f"{' ' if k else ''}{timestamp_text(t)} "]
                seq += image_parts(mm_tokens_per_image)
                images.append(frame)
                num_crops.append(0)
                pan.append(False)
            media.append(seq)
        return sentinel

    spans = _spans(messages, add_generation_prompt, tools, bos, think, hook)
    pieces = "".join(text for _, text in spans).split(sentinel)
    if len(pieces) != len(media) + 1:  # the sentinel cannot be typed (a fresh uuid4)
        raise ChatFormatError("the message text collides with the media placeholder")
    parts: list[str | int] = [pieces[0]]
    for seq, rest in zip(media, pieces[1:], strict=True):
        parts += [*seq, rest]
    return MultimodalPrompt(merge_parts(parts), images, num_crops, pan)


# ---- parsing --------------------------------------------------------------------------------

_TOKENS = sorted(set(SPECIAL_TOKENS) | {"<unk>", "<mask>"}, key=len, reverse=True)
_TOKEN_RE = re.compile("|".join(re.escape(t) for t in _TOKENS))
_END_RE = re.compile(re.escape(END_OF_TURN) + "|" + re.escape(EOS))


def _parse_call(body: str) -> tuple[ToolCall | None, str]:
    """A tool call's JSON body -> (call, "") or (None, why it failed)."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at char {e.pos})"
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None, "missing or non-string 'name'"
    args = obj.get("arguments", {})
    if isinstance(args, str):  # tolerate OpenAI-style string arguments
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None, f"'arguments' of {name!r} is a string that is not JSON"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None, f"'arguments' of {name!r} is not an object"
    call_id = obj.get("id")
    return ToolCall(name, args, None if call_id is None else str(call_id)), ""


def _parse(text: str, in_thinking: bool) -> ParsedOutput:
    result = ParsedOutput()
    errors = result.errors
    end = _END_RE.search(text)
    if end:
        rest = _END_RE.sub("", text[end.end() :]).strip()
        if rest:
            errors.append(f"ignored {len(rest)} chars after {end.group()}: {rest[:40]!r}")
        text = text[: end.start()]

    content: list[str] = []
    thinking: list[str] = []
    state = "thinking" if in_thinking else "content"
    buf: list[str] = []  # text of the open thinking section or tool call
    call_raw: list[str] = []  # the open tool call as written (kept if it fails)

    def close_call(terminated: bool) -> None:
        body = "".join(buf)
        call, why = _parse_call(body.strip())
        n = len(result.tool_calls) + 1
        if call is None:
            errors.append(f"tool call {n}: {why}; its text is kept in content")
            content.append("".join(call_raw))
            return
        result.tool_calls.append(call)
        if not terminated:
            errors.append(f"tool call {n} ({call.name}): missing {END_OF_TOOL_CALL}")

    pos = 0
    for m in [*_TOKEN_RE.finditer(text), None]:
        chunk = text[pos : m.start()] if m else text[pos:]
        tok = m.group() if m else None
        pos = m.end() if m else len(text)
        if state == "content":
            content.append(chunk)
            if tok == START_OF_THINKING:
                state, buf = "thinking", []
            elif tok == START_OF_TOOL_CALL:
                state, buf, call_raw = "call", [], [tok]
            elif tok is not None:
                errors.append(f"unexpected {tok} removed")
        elif state == "thinking":
            buf.append(chunk)
            if tok is None:
                errors.append(f"unterminated thinking section (no {END_OF_THINKING})")
                thinking.append("".join(buf))
            elif tok == END_OF_THINKING:
                thinking.append("".join(buf))
                state = "content"
            elif tok == START_OF_TOOL_CALL:
                errors.append(f"unterminated thinking section (closed by {START_OF_TOOL_CALL})")
                thinking.append("".join(buf))
                state, buf, call_raw = "call", [], [tok]
            else:
                buf.append(tok)  # other tokens inside thinking are kept as text
        else:  # inside a tool call
            buf.append(chunk)
            call_raw.append(chunk)
            if tok is None:
                close_call(terminated=False)
            elif tok == END_OF_TOOL_CALL:
                call_raw.append(tok)
                close_call(terminated=True)
                state = "content"
            elif tok == START_OF_TOOL_CALL:
                close_call(terminated=False)
                buf, call_raw = [], [tok]
            else:
                buf.append(tok)
                call_raw.append(tok)

    result.content = "".join(content).strip()
    result.thinking = "\n".join(t.strip() for t in thinking if t.strip())
    return result


def parse(text: str, *, in_thinking: bool = False) -> ParsedOutput:
    """A model's raw output -> content, thinking and tool calls; never raises.

    Stops at the first `<end_of_turn>` or `<eos>`. Malformed parts are flagged in `errors`:
    a tool call that is not a JSON object with a `name` keeps its text in `content`; an
    unterminated thinking section keeps what was written; stray tokens are removed.
    `in_thinking=True` when the prompt already opened a thinking section (`render(think=True)`).
    """
    errors: list[str] = []
    if not isinstance(text, str):
        errors.append(f"expected str output, got {type(text).__name__}")
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        else:
            text = "" if text is None else str(text)
    try:
        result = _parse(text, in_thinking)
    except Exception as e:  # the contract: never raise on model output
        result = ParsedOutput(content=text, errors=[f"parser failure: {e!r}"])
    result.errors[:0] = errors
    return result


__all__ = [
    "ALTERNATION_ERROR",
    "ChatFormatError",
    "MultimodalPrompt",
    "ParsedOutput",
    "ToolCall",
    "parse",
    "render",
    "render_multimodal",
    "render_parts",
    "render_tool_call",
    "render_tools",
]
