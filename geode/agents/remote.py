"""The client-side OpenAI tool-call loop: agent environments against any OpenAI-compatible
endpoint (`geode serve`, vLLM, llama.cpp's server), as OpenAI's own loop runs on the client.

Each episode: `env.reset()` -> the conversation; every turn POSTs `/v1/chat/completions` with
the whole conversation and the env's tool declarations (`env.tools`) as `tools`; the reply's
assistant message (content + `tool_calls`) is appended as the server returned it, and the
model's turn goes to `env.step` as the text the model wrote (`geode.agents.loop.turn_text`:
thinking, content, each call in the chat format), so a `geode.agents.loop.ToolEnv` executes the
calls with its own Toolbox exactly as in process and answers with role "tool" messages, which
are sent back on the next turn. The episode ends when the env says done, answers nothing,
the reply was cut at `max_tokens` (finish reason "length": truncated, as
`geode.post.rollout` ends a turn that hits its token cap) or after `env.max_turns` turns.

An endpoint error (HTTP error, unreachable after retries, a malformed reply) and an exception
in the env end that episode as a counted failure: `info["success"] = False`, `error` names the
cause; the other episodes go on. Image parts (PIL images, arrays, bytes) are sent as PNG data:
URLs. Greedy decoding through `geode serve` gives the in-process loop's results as long as the
model's turns re-render to the tokens it sampled (the server re-renders the conversation every
turn; the engine keeps the sampled tokens).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from geode.eval.backends import BackendError, EndpointBackend

from .loop import turn_text


@dataclass
class RemoteResult:
    """One episode through an endpoint (the fields of `geode.agents.loop.AgentResult` but the
    engine's Episode, plus the token counts the server reported)."""

    success: bool
    reward: float  # the env's rewards summed over the episode
    info: dict[str, Any]  # the env's info: success, steps, tool_calls, error
    transcript: list[dict[str, Any]]  # the conversation as sent (assistant messages as returned)
    rewards: list[float] = field(default_factory=list)  # per model turn
    tokens: int = 0  # completion tokens over the episode (the server's usage)
    prompt_tokens: int = 0  # prompt tokens over every request of the episode
    turns: int = 0  # model turns
    truncated: bool = False  # a turn hit max_tokens
    retryable: bool = False  # the error may go away on a rerun (endpoint down, timeout)


def _png_url(image: Any) -> str:
    """A PNG data: URL of a PIL image, an (H, W, 3) uint8 array or encoded image bytes."""
    from PIL import Image

    from geode.eval.tasks.shapes import image_data_url

    if isinstance(image, bytes | bytearray):
        image = Image.open(io.BytesIO(bytes(image)))
    elif not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return image_data_url(buf.getvalue())


def wire_message(msg: dict[str, Any]) -> dict[str, Any]:
    """A chat message as JSON for the endpoint: image parts as `image_url` data: URLs."""
    content = msg.get("content")
    if not isinstance(content, list):
        return dict(msg)
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image":
            ref = next((part[k] for k in ("image", "path", "url") if part.get(k) is not None), None)
            url = ref if isinstance(ref, str) else _png_url(ref)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append(part)
    return {**msg, "content": parts}


def _assistant(message: dict[str, Any]) -> dict[str, Any]:
    """The reply's assistant message as it goes back (role, content, reasoning, tool calls)."""
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("reasoning_content"):
        out["reasoning_content"] = message["reasoning_content"]
    if message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]
    return out


def run_episode(
    client: EndpointBackend,
    env: Any,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
) -> RemoteResult:
    """One episode of `env` through `client`'s endpoint (module doc); never raises for the
    endpoint's or the env's faults (they end the episode as a failure)."""
    res = RemoteResult(False, 0.0, {}, [])
    try:
        res.transcript = list(env.reset())
        tools = getattr(env, "tools", None)
        for turn in range(max(1, int(getattr(env, "max_turns", 1)))):
            body: dict[str, Any] = {
                "model": client.model,
                "messages": [wire_message(m) for m in res.transcript],
                "max_tokens": max_tokens,
                "temperature": temperature,
            }
            if tools:
                body["tools"] = list(tools)
            if seed is not None:
                body["seed"] = seed + turn
            data = client._request("POST", "/chat/completions", body)
            try:
                choice = data["choices"][0]
                message, finish = choice["message"], choice.get("finish_reason")
                usage = data.get("usage") or {}
            except (KeyError, IndexError, TypeError):
                raise BackendError(f"unexpected chat response: {str(data)[:300]}") from None
            res.tokens += int(usage.get("completion_tokens", 0))
            res.prompt_tokens += int(usage.get("prompt_tokens", 0))
            res.turns += 1
            reply = _assistant(message)
            res.transcript.append(reply)
            new, reward, done = env.step(turn_text(reply))
            res.rewards.append(float(reward))
            if finish == "length":  # as run_agent: a turn cut at its token cap ends the episode
                res.truncated = True
                break
            if done or not new:
                break
            res.transcript += list(new)
    except Exception as e:  # the endpoint's or the env's fault: a counted failure
        info = getattr(env, "info", None)
        if isinstance(info, dict):
            info["error"] = f"{type(e).__name__}: {e}"
        res.retryable = bool(getattr(e, "retryable", False))
        res.info = {"error": f"{type(e).__name__}: {e}"}
    info = getattr(env, "info", None)
    res.info = {**(copy.deepcopy(info) if isinstance(info, dict) else {}), **res.info}
    if res.truncated and not res.info.get("error"):
        res.info["error"] = f"token budget: a model turn reached max_new_tokens={max_tokens}"
    res.info.setdefault("error", None)
    res.info["tokens"] = res.tokens
    res.reward = float(sum(res.rewards))
    failed = res.retryable or res.turns == 0 or "success" not in res.info
    res.success = False if failed else bool(res.info["success"])  # run_agent's rule
    res.info["success"] = res.success
    return res


def run_remote(
    base_url: str,
    model: str | None,
    envs: Sequence[Any],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int | None = None,
    api_key: str | None = None,
    concurrency: int = 4,
    retries: int = 3,
    timeout: float = 120.0,
) -> list[RemoteResult]:
    """One episode of each env against the OpenAI-compatible endpoint at `base_url` (root or
    /v1; `model`: None = the server's first), `concurrency` episodes at a time, in env order.

    Sampling: `max_tokens` per model turn, `temperature` (0: greedy), `seed` (episode i's turn
    t sends seed + 1000 * i + t). Failed episodes are counted (RemoteResult.info["error"])."""
    client = EndpointBackend(base_url, api_key=api_key, model=model, retries=retries,
                             timeout=timeout)  # fmt: skip

    def one(i: int) -> RemoteResult:
        s = None if seed is None else seed + 1000 * i
        return run_episode(client, envs[i], max_tokens=max_tokens, temperature=temperature, seed=s)

    if not envs:
        return []
    _ = client.model  # resolve the model name once, before the threads start
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(one, range(len(envs))))
