"""Agent tools: schemas from functions, declarations checked against the JSON-schema
meta-schema, every tool fault returned as an error result, the sandbox's limits for agent
code, the calculator against Python's arithmetic, workspace confinement, BM25 search, MCP."""

from __future__ import annotations

import json
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Literal

import pytest

from geode.agents.tools import (
    Tool,
    Toolbox,
    ToolError,
    calculate,
    calculator_tool,
    file_tools,
    mcp_tools,
    python_tool,
    search_tool,
    tool,
)
from geode.chat import ToolCall, render

MCP_SERVER = '''
from mcp.server.mcpserver import MCPServer  # mcp 2.x: FastMCP renamed MCPServer

app = MCPServer("tiny")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@app.tool()
def shout(text: str) -> str:
    """Upper-case a text."""
    return text.upper() + "!"


@app.tool()
def broken(x: str) -> str:
    """Always fails."""
    raise RuntimeError("kaboom " + x)


if __name__ == "__main__":
    app.run()
'''


def write_mcp_server(directory) -> list[str]:
    """A tiny MCP server script (stdio) in `directory`; its command line."""
    path = directory / "mcp_server.py"
    path.write_text(MCP_SERVER)
    return [sys.executable, str(path)]


def test_tool_schema_from_signature_and_docstring():
    def lookup(city: str, days: int = 3, units: Literal["c", "f"] = "c",
               tags: list[str] | None = None, scale: float | None = None) -> str:  # fmt: skip
        """Weather forecast for a city.

        Longer text that is not part of the description."""
        return city

    t = tool(lookup)
    assert t.name == "lookup" and t.description == "Weather forecast for a city."
    assert t.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "default": 3},
            "units": {"enum": ["c", "f"], "default": "c"},
            "tags": {"type": "array", "items": {"type": "string"}, "default": None},
            "scale": {"type": "number", "default": None},
        },
        "required": ["city"],
        "additionalProperties": False,
    }
    decl = t.declaration()
    assert decl["function"]["name"] == "lookup"
    assert json.dumps(decl) in render([{"role": "user", "content": "hi"}], tools=[decl])

    @tool(name="renamed", timeout=2.0)
    def f(x: int) -> int:
        return x

    assert (f.name, f.timeout, f.parameters["required"]) == ("renamed", 2.0, ["x"])
    with pytest.raises(ValueError, match="tool 'g', parameter 'x'.*no JSON schema"):
        tool(_bad_hint, name="g")
    with pytest.raises(ValueError, match=r"\*args"):
        tool(lambda *a: a)


def _bad_hint(x: complex) -> None:
    return None


def test_bad_declarations_are_clear_errors_at_construction():
    ok = calculator_tool()
    bad = Tool("weather", "w", {"type": "object", "properties": {"city": {"type": "strng"}}},
               lambda city: city)  # fmt: skip
    with pytest.raises(ValueError, match=r"tool 'weather'.*not a valid JSON schema at "
                                         r"properties/city/type"):  # fmt: skip
        Toolbox([ok, bad])
    with pytest.raises(ValueError, match="tool 'arr'.*type 'object'"):
        Toolbox([Tool("arr", "", {"type": "array"}, lambda: 0)])
    with pytest.raises(ValueError, match="two tools named 'calculator'"):
        Toolbox([ok, calculator_tool()])
    with pytest.raises(ValueError, match="tool name 'has space'"):
        Toolbox([Tool("has space", "", {"type": "object"}, lambda: 0)])
    with pytest.raises(ValueError, match="expected Tool objects"):
        Toolbox([ok.declaration()])


def test_tool_faults_come_back_as_error_results():
    class Opaque:
        pass

    def boom(x: str) -> str:
        raise RuntimeError(f"kaboom {x}")

    def hang() -> str:
        time.sleep(30)
        return "never"

    def garbage() -> object:
        return Opaque()

    def nan() -> float:
        return float("nan")

    def own(x: int) -> str:
        raise ToolError(f"x={x} is not allowed")

    def big() -> str:
        return "abcdefghij" * 1000

    def structured() -> dict:
        return {"a": [1, 2.5, None], "b": "ü"}

    box = Toolbox([tool(boom), tool(hang, timeout=0.3), tool(garbage), tool(nan), tool(own),
                   tool(big), tool(structured), calculator_tool()], max_output_chars=300)  # fmt: skip
    cases = [
        (ToolCall("boom", {"x": "y"}), "error: tool 'boom' raised RuntimeError: kaboom y"),
        (ToolCall("hang", {}), "error: tool 'hang' timed out after 0.3 s (abandoned)"),
        (ToolCall("garbage", {}), "error: tool 'garbage' returned a Opaque, which is not JSON"),
        (ToolCall("nan", {}), "error: tool 'nan' returned a float, which is not JSON"),
        (ToolCall("own", {"x": 3}), "error: tool 'own': x=3 is not allowed"),
        (ToolCall("nosuch", {}), "error: unknown tool 'nosuch'; the tools are ['big', 'boom'"),
        (ToolCall("boom", {}), "error: bad arguments for tool 'boom': 'x' is a required property"),
        (
            ToolCall("boom", {"x": 1}),
            "error: bad arguments for tool 'boom' at x: 1 is not of type 'string'",
        ),
        (
            ToolCall("boom", {"x": "a", "z": 1}),
            "error: bad arguments for tool 'boom': Additional "
            "properties are not allowed ('z' was unexpected)",
        ),
        (
            ToolCall("calculator", {"expression": "1/0"}),
            "error: tool 'calculator': division by zero",
        ),
    ]
    t0 = time.perf_counter()
    for call, expected in cases:
        r = box.call(call)
        assert r.error and r.content.startswith(expected), (call, r.content)
        assert r.name == call.name
    assert time.perf_counter() - t0 < 5  # the hang was abandoned after its timeout
    r = box.call(ToolCall("big", {}))
    assert not r.error and len(r.content) <= 300
    assert r.content.startswith("abcdefghij") and "[output cut: 10000 chars, the first" in r.content
    assert box.call(ToolCall("structured", {})).content == '{"a": [1, 2.5, null], "b": "ü"}'
    # the caller's remaining budget caps the tool's timeout
    r = box.call(ToolCall("hang", {}), timeout=0.05)
    assert r.error and "timed out after 0.05 s" in r.content and r.seconds < 0.3
    assert box.call(ToolCall("calculator", {"expression": "6*7"})).message("c1") == {
        "role": "tool", "name": "calculator", "content": "42", "tool_call_id": "c1"}  # fmt: skip


def test_calculator_is_exact_and_refuses_code():
    rng = random.Random(0)
    for _ in range(200):  # Python's own arithmetic is the reference
        a, b, c = (rng.randint(-(10**12), 10**12) for _ in range(3))
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        expr = f"({a} {op1} {b}) {op2} {c}"
        assert calculate(expr) == eval(expr), expr
    assert calculate("2**200") == 2**200
    assert calculate("7 // 2") == 3 and calculate("7 % 4") == 3
    assert calculate("84 / 2") == 42 and isinstance(calculate("84 / 2"), int)
    assert calculate("7 / 2") == 3.5 and calculate("2^10") == 1024
    assert calculate("sqrt(16) + factorial(5)") == 124
    assert abs(calculate("sin(pi / 2)") - 1.0) < 1e-12
    for bad, why in [
        ("__import__('os').system('true')", "unsupported expression"),
        ("(1).__class__", "unsupported expression"),
        ("open('x')", "unsupported expression"),
        ("[1, 2]", "unsupported expression"),
        ("10 ** 10 ** 10", "too large"),
        ("9 ** 99999", "too large"),
        ("factorial(5000)", "over 1000"),
        ("1 +", "cannot parse"),
        ("exp(1000)", "OverflowError"),
    ]:
        with pytest.raises(ToolError, match=why):
            calculate(bad)


def test_file_tools_stay_inside_the_workspace(tmp_path):
    ws = tmp_path / "ws"
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    box = Toolbox(file_tools(ws))
    (ws / "link").symlink_to(outside)
    (ws / "dirlink").symlink_to(tmp_path)
    r = box.call(ToolCall("write_file", {"path": "sub/notes.txt", "content": "héllo"}))
    assert not r.error and r.content == "wrote 6 bytes to sub/notes.txt"
    assert (ws / "sub" / "notes.txt").read_text() == "héllo"
    assert box.call(ToolCall("read_file", {"path": "sub/notes.txt"})).content == "héllo"
    assert json.loads(box.call(ToolCall("list_files", {})).content) == ["sub/notes.txt"]
    for name, args in [
        ("read_file", {"path": "../secret.txt"}),
        ("read_file", {"path": str(outside)}),
        ("read_file", {"path": "link"}),
        ("read_file", {"path": "dirlink/secret.txt"}),
        ("write_file", {"path": "../evil.txt", "content": "x"}),
        ("write_file", {"path": "link", "content": "x"}),
        ("list_files", {"path": ".."}),
    ]:
        r = box.call(ToolCall(name, args))
        assert r.error and "is outside the workspace" in r.content, (name, args, r.content)
    assert outside.read_text() == "secret" and not (tmp_path / "evil.txt").exists()
    r = box.call(ToolCall("read_file", {"path": "missing.txt"}))
    assert r.error and "no file 'missing.txt'" in r.content


def test_search_ranks_by_bm25(tmp_path):
    import bm25s

    texts = ["Paris is the capital of France.", "The Nile is a river in Africa.",
             "Python is a programming language.", "France borders Spain and Italy."]  # fmt: skip
    box = Toolbox([search_tool(texts, k=2)])
    hits = json.loads(box.call(ToolCall("search", {"query": "capital of France"})).content)
    assert [h["source"] for h in hits] == ["0", "3"]
    # the scores are bm25s's own (Lucene BM25) on the same tokens
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    _, scores = ref.retrieve(bm25s.tokenize(["capital of France"], stopwords="en",
                                            show_progress=False), k=2, show_progress=False)  # fmt: skip
    assert [h["score"] for h in hits] == [round(float(s), 4) for s in scores[0]]
    assert json.loads(box.call(ToolCall("search", {"query": "the of"})).content) == []
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "nile.md").write_text("The Nile flows north.")
    (docs / "rhine.txt").write_text("The Rhine flows to the North Sea.")
    hits = json.loads(
        Toolbox([search_tool(docs)]).call(ToolCall("search", {"query": "Nile"})).content
    )
    assert hits[0]["source"] == "nile.md"
    lines = tmp_path / "c.jsonl"
    lines.write_text('{"text": "alpha beta"}\n{"text": "gamma delta"}\n')
    box = Toolbox([search_tool(lines)])
    assert (
        json.loads(box.call(ToolCall("search", {"query": "gamma"})).content)[0]["source"]
        == "c.jsonl:1"
    )
    lines.write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="line 1 is not a JSON object with 'text'"):
        search_tool(lines)
    with pytest.raises(ValueError, match="no such file"):
        search_tool(str(tmp_path / "nope"))


def test_python_tool_runs_agent_code_inside_the_sandbox_limits(tmp_path):
    from geode.sandbox import Limits

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data.txt").write_text("41")
    lim = Limits(timeout=1.5, cpu_seconds=2, memory_bytes=256 << 20,
                 total_memory_bytes=256 << 20)  # fmt: skip
    box = Toolbox([python_tool(ws, limits=lim)])

    def run(code: str) -> str:
        r = box.call(ToolCall("python", {"code": code}))
        assert not r.error, r.content
        return r.content

    assert run("print(int(open('data.txt').read()) + 1)") == "42"
    t0 = time.perf_counter()
    assert "[timed out after 1.5 s: killed]" in run("while True:\n    pass")
    assert time.perf_counter() - t0 < 6
    out = run("x = bytearray(2 << 30)\nprint('allocated')")  # 2 GiB > the 256 MiB limits
    assert "allocated" not in out and "MemoryError" in out
    out = run("import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
              "print('connected')")  # fmt: skip
    assert "connected" not in out and "OSError" in out and "[exit code 1]" in out
    escape = Path.cwd() / f"escape-{uuid.uuid4().hex}.txt"  # on the host's disk, not a tmpfs
    out = run(f"open({str(escape)!r}, 'w').write('x')\nprint('wrote')")
    # the host's disk is read-only inside the sandbox, or (a checkout under /tmp) hidden by the
    # sandbox's own tmpfs; either way the write fails and nothing reaches the host
    refused = "Read-only file system" in out or "No such file or directory" in out
    assert refused and "wrote" not in out and "[exit code 1]" in out and not escape.exists()
    run("open('data.txt', 'w').write('0')")  # the sandbox's copy; the workspace is unchanged
    assert (ws / "data.txt").read_text() == "41"
    assert (
        run("import sys\nsys.stderr.write('oops')\nsys.exit(3)") == "[stderr]\noops\n[exit code 3]"
    )


def test_mcp_server_tools_are_listed_and_called(tmp_path):
    tools = mcp_tools(write_mcp_server(tmp_path))
    box = Toolbox(tools)
    try:
        assert [t.name for t in tools] == ["add", "shout", "broken"]
        add = tools[0]
        assert add.description == "Add two integers." and add.parameters["required"] == ["a", "b"]
        assert box.call(ToolCall("add", {"a": 2, "b": 40})).content == "42"
        assert box.call(ToolCall("shout", {"text": "hi"})).content == "HI!"
        r = box.call(ToolCall("broken", {"x": "y"}))
        assert r.error and r.content.startswith("error: tool 'broken': Error executing tool broken")
        r = box.call(ToolCall("add", {"a": "two", "b": 1}))  # checked here against its schema
        assert r.error and "bad arguments for tool 'add' at a" in r.content
    finally:
        box.close()  # stops the server
    assert tools[0].fn.client._loop.is_closed()
    r = box.call(ToolCall("add", {"a": 1, "b": 1}))  # the server is gone: an error, no raise
    assert r.error and r.content.startswith("error: tool 'add'")
    with pytest.raises(RuntimeError, match="cannot connect"):
        mcp_tools([sys.executable, "-c", "import sys; sys.exit(1)"])
