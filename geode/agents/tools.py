"""Tools an agent calls: declared as JSON schemas in the one chat format, run safely.

    calc = tool(lambda expression: ...)            # or @tool on a typed, documented function
    box = Toolbox([calculator_tool(), python_tool(), *file_tools("ws"), search_tool(texts)])
    render(messages, tools=box.declarations())     # the model sees the declarations
    result = box.call(ToolCall("calculator", {"expression": "2**64"}))   # a ToolResult

A `Tool` is a name, a description, a JSON schema of its arguments (type "object") and a
function called with the validated arguments as keywords. `tool(fn)` builds one from a
function's signature, type hints and docstring. `Toolbox` checks every declaration's schema
at construction (jsonschema's meta-schema: a bad schema is a ValueError naming the tool) and
never raises out of `call` for a tool's faults: an unknown tool, arguments that do not
validate, a function that raises, hangs (run in a worker thread and abandoned after its
timeout) or returns something that is not JSON, all come back as a `ToolResult` with
`error=True` and content "error: ..." naming the tool and the problem, so the model sees it
and the episode goes on. Output longer than `max_output_chars` is cut with a note.

Built-ins: `python_tool` (code runs in `geode.sandbox`: time, memory and process limits, no
network, writes only inside its private work dir, which starts with a copy of the workspace),
`calculator_tool` (exact arithmetic by walking the expression's AST, no eval), `file_tools`
(read / write / list inside a workspace directory; paths that escape it are refused),
`search_tool` (BM25 over a local corpus with `bm25s`) and `mcp_tools` (the tools of an MCP
server started as a subprocess, over stdio, with the `mcp` package).
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import inspect
import json
import math
import operator
import os
import re
import tempfile
import threading
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geode.chat import ToolCall

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


class ToolError(Exception):
    """A tool's own report of failure (its message goes to the model as the error)."""


@dataclass
class Tool:
    """A callable the model may use: name, description, JSON schema of its arguments, fn."""

    name: str
    description: str
    parameters: dict  # JSON schema of the arguments (type "object"); validated per call
    fn: Callable[..., Any]  # called with the validated arguments as keywords
    timeout: float = 10.0  # seconds of wall time; a hang is abandoned after it

    def declaration(self) -> dict[str, Any]:
        """The OpenAI-shaped declaration `geode.chat.render(tools=...)` takes."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass
class ToolResult:
    """What one call gave: the text the model sees, whether it failed, and its wall time."""

    name: str
    content: str
    error: bool
    seconds: float

    def message(self, call_id: str | None = None) -> dict[str, Any]:
        """The role "tool" chat message carrying this result."""
        msg: dict[str, Any] = {"role": "tool", "name": self.name, "content": self.content}
        if call_id is not None:
            msg["tool_call_id"] = call_id
        return msg


# ---------------------------------------------------------------------- schemas from functions
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema_of(hint: Any, where: str) -> dict[str, Any]:
    """The JSON schema of one type hint (str/int/float/bool, list[X], dict, Literal, X | None)."""
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        return {"type": "array", "items": _schema_of(args[0], where)} if args else {"type": "array"}
    if origin is dict or hint is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1:
            return _schema_of(kinds[0], where)
        return {"anyOf": [_schema_of(a, where) for a in kinds]}
    if hint is Any:
        return {}
    raise ValueError(f"{where}: type hint {hint!r} has no JSON schema (use str, int, float, "
                     "bool, list[...], dict, Literal[...] or X | None)")  # fmt: skip


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float = 10.0,
) -> Any:
    """A Tool from a function's signature (type hints -> JSON schema, no default -> required)
    and docstring (the description); usable as `tool(fn)`, `@tool` or `@tool(name=...)`."""
    if fn is None:
        return lambda f: tool(f, name=name, description=description, timeout=timeout)
    label = name or getattr(fn, "__name__", "tool")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise ValueError(f"tool {label!r}: cannot read its type hints: {e}") from e
    props: dict[str, Any] = {}
    required: list[str] = []
    for p in inspect.signature(fn).parameters.values():
        where = f"tool {label!r}, parameter {p.name!r}"
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ValueError(f"{where}: *args, **kwargs and positional-only parameters cannot "
                             "be passed as JSON arguments")  # fmt: skip
        props[p.name] = _schema_of(hints.get(p.name, Any), where)
        if p.default is p.empty:
            required.append(p.name)
        else:
            props[p.name]["default"] = p.default
    doc = inspect.getdoc(fn) or ""
    schema = {"type": "object", "properties": props, "required": required,
              "additionalProperties": False}  # fmt: skip
    text = description if description is not None else doc.split("\n\n")[0].replace("\n", " ")
    return Tool(label, text, schema, fn, timeout)


# ---------------------------------------------------------------------- the toolbox
def _validator(t: Tool) -> Any:
    """jsonschema's validator of `t.parameters`; ValueError naming the tool if the schema is bad."""
    import jsonschema

    if not isinstance(t.parameters, dict) or t.parameters.get("type") != "object":
        raise ValueError(f"tool {t.name!r}: parameters must be a JSON schema with type "
                         f"'object', got {t.parameters!r}")  # fmt: skip
    cls = jsonschema.validators.validator_for(t.parameters)
    try:
        cls.check_schema(t.parameters)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"tool {t.name!r}: parameters are not a valid JSON schema at {path}: "
                         f"{e.message}") from None  # fmt: skip
    return cls(t.parameters)


def as_text(value: Any) -> str:
    """A tool's return value as the text the model reads: str as is, JSON for the rest;
    ValueError for values JSON cannot carry."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"returned a {type(value).__name__}, which is not JSON ({e})") from None


def _run_abandonable(
    fn: Callable[[], Any], timeout: float
) -> tuple[bool, Any, BaseException | None]:
    """(finished, value, exception) of fn() run in a daemon thread, waited on for `timeout` s
    (a thread that hangs is abandoned: it cannot be killed, and holds nothing of the caller's)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the model, whatever it is
            box["error"] = e

    th = threading.Thread(target=target, daemon=True, name="geode-tool")
    th.start()
    th.join(timeout)
    if th.is_alive():
        return False, None, None
    return True, box.get("value"), box.get("error")


class Toolbox:
    """Tools by name: declarations for the prompt, and `call`, which never raises for a
    tool's faults (module doc)."""

    def __init__(self, tools: Sequence[Tool], max_output_chars: int = 2000):
        if max_output_chars < 100:
            raise ValueError(f"Toolbox: max_output_chars must be >= 100, got {max_output_chars}")
        self.tools: dict[str, Tool] = {}
        self._validators: dict[str, Any] = {}
        for t in tools:
            if not isinstance(t, Tool):
                raise ValueError(f"Toolbox: expected Tool objects, got {t!r}")
            if not isinstance(t.name, str) or not NAME_RE.match(t.name):
                raise ValueError(f"Toolbox: tool name {t.name!r} must match {NAME_RE.pattern}")
            if t.name in self.tools:
                raise ValueError(f"Toolbox: two tools named {t.name!r}")
            if not (t.timeout > 0):
                raise ValueError(f"tool {t.name!r}: timeout must be > 0, got {t.timeout}")
            self._validators[t.name] = _validator(t)
            self.tools[t.name] = t
        self.max_output_chars = max_output_chars

    def __len__(self) -> int:
        return len(self.tools)

    def close(self) -> None:
        """Stop what the tools hold open (the MCP servers behind mcp_tools)."""
        for t in self.tools.values():
            client = getattr(t.fn, "client", None)
            if isinstance(client, MCPClient):
                client.close()

    def declarations(self) -> list[dict[str, Any]]:
        """The tools' declarations, in order (for `geode.chat.render(tools=...)`)."""
        return [t.declaration() for t in self.tools.values()]

    def cut(self, text: str) -> str:
        """`text` within max_output_chars: the head, then a note of how much was cut."""
        n = len(text)
        if n <= self.max_output_chars:
            return text
        note = f"\n[output cut: {n} chars, the first {{k}} shown]"
        k = self.max_output_chars - len(note.format(k=self.max_output_chars))
        return text[:k] + note.format(k=k)

    def call(self, call: ToolCall, timeout: float | None = None) -> ToolResult:
        """Run one call; faults come back as an error result (never raised). `timeout` caps
        the tool's own (the caller's remaining tool-time budget)."""
        from jsonschema.exceptions import best_match

        t0 = time.perf_counter()
        name = getattr(call, "name", None)

        def fail(why: str) -> ToolResult:
            return ToolResult(str(name), self.cut(f"error: {why}"), True, time.perf_counter() - t0)

        t = self.tools.get(name) if isinstance(name, str) else None
        if t is None:
            return fail(f"unknown tool {name!r}; the tools are {sorted(self.tools)}")
        args = call.arguments
        if not isinstance(args, dict):
            return fail(f"tool {name!r}: arguments must be a JSON object, got {args!r}")
        problem = best_match(self._validators[name].iter_errors(args))
        if problem is not None:
            at = "/".join(str(p) for p in problem.absolute_path)
            return fail(f"bad arguments for tool {name!r}{f' at {at}' if at else ''}: "
                        f"{problem.message}")  # fmt: skip
        limit = t.timeout if timeout is None else max(0.0, min(t.timeout, timeout))
        done, value, exc = _run_abandonable(lambda: t.fn(**args), limit)
        if not done:
            return fail(f"tool {name!r} timed out after {limit:.3g} s (abandoned)")
        if exc is not None:
            if isinstance(exc, ToolError):
                return fail(f"tool {name!r}: {exc}")
            return fail(f"tool {name!r} raised {type(exc).__name__}: {exc}")
        try:
            text = as_text(value)
        except ValueError as e:
            return fail(f"tool {name!r} {e}")
        return ToolResult(name, self.cut(text), False, time.perf_counter() - t0)


# ---------------------------------------------------------------------- python (sandboxed)
def _workspace_files(workspace: Path, max_bytes: int) -> dict[str, bytes]:
    """Every regular file under `workspace` (relative names), at most `max_bytes` in all."""
    out: dict[str, bytes] = {}
    total = 0
    for p in sorted(workspace.rglob("*")):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            total += len(data)
            if total > max_bytes:
                raise ToolError(f"the workspace {workspace} holds over {max_bytes} bytes")
            out[p.relative_to(workspace).as_posix()] = data
    return out


def python_tool(
    workspace: str | os.PathLike | None = None,
    *,
    limits: Any = None,
    name: str = "python",
) -> Tool:
    """Run Python source in `geode.sandbox` (no network, limits on time, memory, processes,
    writes only in its private work dir, seeded with a copy of `workspace`); returns stdout,
    stderr and how the program ended."""
    from geode import sandbox

    lim = limits or sandbox.Limits(timeout=10.0, cpu_seconds=10, memory_bytes=512 << 20,
                                   total_memory_bytes=512 << 20)  # fmt: skip
    ws = Path(workspace).resolve() if workspace is not None else None

    def run_python(code: str) -> str:
        files = _workspace_files(ws, lim.work_dir_bytes // 2) if ws is not None else {}
        r = sandbox.run_code(code, limits=lim, files=files)
        parts = [r.stdout]
        if r.stderr:
            parts.append(f"[stderr]\n{r.stderr}")
        if r.timed_out:
            parts.append(f"[timed out after {lim.timeout:g} s: killed]")
        elif "total_memory_bytes" in r.limits_hit:
            parts.append(f"[killed: over the memory limit of {lim.total_memory_bytes} bytes]")
        elif r.killed_by_signal is not None:
            parts.append(f"[killed by {r.signal_name}]")
        elif r.exit_code:
            parts.append(f"[exit code {r.exit_code}]")
        return "\n".join(p.rstrip("\n") for p in parts if p) or "[no output]"

    desc = ("Run a Python 3 program and return its stdout and stderr (print what you need). "
            "No network; files you write are discarded after the run.")  # fmt: skip
    params = {"type": "object", "properties": {"code": {"type": "string"}},
              "required": ["code"], "additionalProperties": False}  # fmt: skip
    return Tool(name, desc, params, run_python, timeout=lim.timeout + 10.0)


# ---------------------------------------------------------------------- calculator
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS: dict[str, Callable[..., Any]] = {
    "abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "exp": math.exp,
    "log": math.log, "log10": math.log10, "log2": math.log2, "sin": math.sin, "cos": math.cos,
    "tan": math.tan, "floor": math.floor, "ceil": math.ceil, "gcd": math.gcd,
    "factorial": math.factorial, "comb": math.comb,
}  # fmt: skip
_CONSTS = {"pi": math.pi, "e": math.e}
MAX_DIGITS = 4000  # the largest integer result (in decimal digits) the calculator returns


def _check_size(v: Any) -> Any:
    if isinstance(v, int) and v.bit_length() > MAX_DIGITS * 3.33:
        raise ToolError(f"result has more than {MAX_DIGITS} digits")
    if isinstance(v, float) and not math.isfinite(v):
        raise ToolError("result is not finite")
    return v


def calculate(expression: str) -> int | float:
    """Evaluate arithmetic (+ - * / // % **, parentheses, math functions) exactly for
    integers, by walking the AST (no eval); `/` of integers that divide is an integer."""
    if len(expression) > 2000:
        raise ToolError("expression longer than 2000 characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"cannot parse {expression!r}: {e.msg}") from None

    def ev(n: ast.AST) -> Any:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return n.value
        if isinstance(n, ast.Name) and n.id in _CONSTS:
            return _CONSTS[n.id]
        if isinstance(n, ast.UnaryOp) and type(n.op) in _UNARY:
            return _UNARY[type(n.op)](ev(n.operand))
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            if isinstance(n.op, ast.Pow):
                if abs(b) > 10_000 or (isinstance(a, int) and isinstance(b, int)
                                       and abs(a) > 1 and a.bit_length() * b > MAX_DIGITS * 3.33):  # fmt: skip
                    raise ToolError(f"{a} ** {b} is too large")
                return _check_size(a**b)
            if isinstance(n.op, ast.Div):
                if isinstance(a, int) and isinstance(b, int) and b and a % b == 0:
                    return a // b
                return _check_size(a / b)
            if type(n.op) in _BINARY:
                return _check_size(_BINARY[type(n.op)](a, b))
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _FUNCS
                and not n.keywords):  # fmt: skip
            args = [ev(a) for a in n.args]
            if n.func.id in ("factorial", "comb") and any(abs(a) > 1000 for a in args):
                raise ToolError(f"{n.func.id} argument over 1000")
            return _check_size(_FUNCS[n.func.id](*args))
        raise ToolError(f"unsupported expression: {ast.unparse(n)!r} (allowed: numbers, "
                        f"+ - * / // % **, {', '.join(sorted(_FUNCS))}, pi, e)")  # fmt: skip

    try:
        value = ev(tree)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (OverflowError, ValueError, TypeError) as e:
        raise ToolError(f"{type(e).__name__}: {e}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def calculator_tool(name: str = "calculator") -> Tool:
    """The calculator: `calculate` as a tool (exact integers; its result as text)."""
    t = tool(calculate, name=name, timeout=5.0)
    t.fn = lambda expression: str(calculate(expression))
    return t


# ---------------------------------------------------------------------- files in a workspace
def _inside(workspace: Path, path: str) -> Path:
    """`workspace / path` resolved (symlinks followed); ToolError if it leaves the workspace."""
    p = (workspace / path).resolve()
    if not p.is_relative_to(workspace):
        raise ToolError(f"path {path!r} is outside the workspace")
    return p


def file_tools(workspace: str | os.PathLike, max_write_bytes: int = 1 << 20) -> list[Tool]:
    """read_file, write_file and list_files inside `workspace` (created if missing); any path
    that resolves outside it is refused. Writes are atomic."""
    from geode.fileio import atomic_write_bytes

    ws = Path(workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)

    def read_file(path: str) -> str:
        """Read a text file of the workspace."""
        p = _inside(ws, path)
        if not p.is_file():
            raise ToolError(f"no file {path!r} in the workspace")
        return p.read_text(encoding="utf-8", errors="replace")

    def write_file(path: str, content: str) -> str:
        """Write a text file in the workspace (replacing it)."""
        p = _inside(ws, path)
        data = content.encode("utf-8")
        if len(data) > max_write_bytes:
            raise ToolError(f"content of {len(data)} bytes is over the {max_write_bytes} limit")
        if p == ws or p.is_dir():
            raise ToolError(f"{path!r} is a directory")
        atomic_write_bytes(p, data)
        return f"wrote {len(data)} bytes to {p.relative_to(ws).as_posix()}"

    def list_files(path: str = ".") -> list[str]:
        """List the files under a directory of the workspace."""
        p = _inside(ws, path)
        if not p.is_dir():
            raise ToolError(f"no directory {path!r} in the workspace")
        return sorted(q.relative_to(ws).as_posix() for q in p.rglob("*")
                      if q.is_file() and q.resolve().is_relative_to(ws))  # fmt: skip

    return [tool(read_file), tool(write_file), tool(list_files)]


# ---------------------------------------------------------------------- BM25 search
def read_corpus(corpus: str | os.PathLike | Sequence[str]) -> tuple[list[str], list[str]]:
    """(texts, sources) of a corpus: a list of texts, a directory (each .txt/.md/.json/.py
    file a document) or a .jsonl file (each line's "text")."""
    if isinstance(corpus, (str, os.PathLike)) and Path(corpus).exists():
        path = Path(corpus)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix in (".txt", ".md", ".json", ".py", ".rst"))  # fmt: skip
            return [p.read_text(encoding="utf-8", errors="replace") for p in files], [
                p.relative_to(path).as_posix() for p in files
            ]
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}: line {i + 1} is not a JSON object with "
                                     "'text'") from None  # fmt: skip
        return texts, [f"{path.name}:{i}" for i in range(len(texts))]
    if isinstance(corpus, (str, os.PathLike)):
        raise ValueError(f"search corpus {corpus}: no such file or directory")
    texts = [str(t) for t in corpus]
    return texts, [str(i) for i in range(len(texts))]


def search_tool(corpus: str | os.PathLike | Sequence[str], k: int = 3, name: str = "search",
                max_chars: int = 500) -> Tool:  # fmt: skip
    """BM25 search (bm25s, Lucene's scoring) over a local corpus: the top-k documents."""
    import bm25s

    texts, sources = read_corpus(corpus)
    if not texts:
        raise ValueError("search_tool: the corpus is empty")
    index = bm25s.BM25()
    index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    lock = threading.Lock()  # the index is not documented as thread-safe

    def search(query: str) -> list[dict[str, Any]]:
        """Search the documents; returns the best matches with their scores."""
        q = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not q.vocab:
            return []
        with lock:
            docs, scores = index.retrieve(q, k=min(k, len(texts)), show_progress=False)
        return [
            {
                "source": sources[int(d)],
                "score": round(float(s), 4),
                "text": texts[int(d)][:max_chars],
            }
            for d, s in zip(docs[0], scores[0], strict=True)
            if s > 0
        ]

    return tool(search, name=name)


# ---------------------------------------------------------------------- MCP servers (stdio)
class MCPClient:
    """A connection to an MCP server started as `command` (stdio), kept open on a background
    event loop; `tools` are its tools as geode Tools (their calls go over the connection)."""

    def __init__(self, command: Sequence[str], *, env: dict[str, str] | None = None,
                 timeout: float = 30.0, connect_timeout: float = 30.0):  # fmt: skip
        if not command:
            raise ValueError("mcp_tools: the server command is empty")
        self.command = [str(c) for c in command]
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="geode-mcp")  # fmt: skip
        self._thread.start()
        self._stop: asyncio.Event | None = None
        self._client: Any = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._errlog = tempfile.TemporaryFile("w+")  # the server's stderr (shown on failure)
        self._main = asyncio.run_coroutine_threadsafe(self._serve(env), self._loop)
        if not self._ready.wait(connect_timeout) or self._failure is not None:
            why = self._failure or TimeoutError(f"no answer in {connect_timeout} s")
            self._errlog.seek(0)
            err = self._errlog.read()[-500:].strip()
            self.close()
            raise RuntimeError(
                f"MCP server {' '.join(self.command)!r}: cannot connect: "
                f"{type(why).__name__}: {why}" + (f"; its stderr ends: {err}" if err else "")
            ) from None
        listed = self._run(self._client.list_tools(), connect_timeout)
        self.tools = [self._tool(t) for t in listed.tools]
        atexit.register(self.close)

    async def _serve(self, env: dict[str, str] | None) -> None:
        from mcp import Client, StdioServerParameters, stdio_client

        self._stop = asyncio.Event()
        params = StdioServerParameters(command=self.command[0], args=self.command[1:], env=env)
        try:
            async with Client(stdio_client(params, errlog=self._errlog)) as client:
                self._client = client
                self._ready.set()
                await self._stop.wait()
        except BaseException as e:  # noqa: BLE001 - reported by __init__ / the calls
            self._failure = e
            self._ready.set()

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _tool(self, t: Any) -> Tool:
        schema = dict(t.input_schema or {"type": "object"})
        schema.pop("title", None)

        def call(**arguments: Any) -> str:
            if self._failure is not None or self._loop.is_closed():
                raise ToolError(f"the MCP server is gone ({self._failure or 'closed'})")
            r = self._run(self._client.call_tool(t.name, arguments), self.timeout)
            text = "\n".join(getattr(c, "text", "") or json.dumps(c.model_dump(mode="json"))
                             for c in r.content)  # fmt: skip
            if r.is_error:
                raise ToolError(text or "the server reported an error")
            return text

        return Tool(t.name, t.description or "", schema, call, timeout=self.timeout + 1.0)

    def close(self) -> None:
        """Stop the server and the background loop (idempotent)."""
        if self._loop.is_closed():
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            try:
                self._main.result(10)
            except Exception:  # noqa: BLE001 - closing regardless
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        self._errlog.close()


def mcp_tools(command: Sequence[str], *, env: dict[str, str] | None = None,
              timeout: float = 30.0) -> list[Tool]:  # fmt: skip
    """The tools of the MCP server run as `command` (stdio), through the `mcp` package's
    client; the connection stays open until exit (or `tools[0].fn.client.close()`)."""
    client = MCPClient(command, env=env, timeout=timeout)
    for t in client.tools:
        t.fn.client = client  # type: ignore[attr-defined]
    return client.tools


__all__ = [
    "MCPClient",
    "Tool",
    "ToolError",
    "ToolResult",
    "Toolbox",
    "as_text",
    "calculate",
    "calculator_tool",
    "file_tools",
    "mcp_tools",
    "python_tool",
    "read_corpus",
    "search_tool",
    "tool",
]
