"""`geode agent`: run the agent loop (tools, plan-act-verify) of a model on one task."""

from __future__ import annotations

import argparse

_FMT = argparse.RawDescriptionHelpFormatter
TOOL_NAMES = ("python", "calculator", "files", "search")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `agent` verb."""
    from ..agents.loop import MODES

    p = sub.add_parser(
        "agent",
        help="run a model as an agent with tools on a task",
        description="The model works on the task in the agent loop on the engine: its tool "
        "calls run (sandboxed python, calculator, files in a workspace, BM25 search over a "
        "local corpus, an MCP server's tools), their results are appended to its context (the "
        "KV of earlier turns is reused), until it answers or a budget (turns, tokens per turn, "
        "tool seconds) ends the episode. Prints the transcript; docs/agents.md.",
        epilog="examples:\n"
        "  geode agent out/model --task 'What is 123456 * 654321?' --tools calculator\n"
        "  geode agent out/model --task 'Summarise notes.txt' --tools files,python "
        "--workspace ws/\n"
        "  geode agent out/model --task 'Who wrote it?' --tools search --corpus docs/ "
        "--mode plan-act-verify\n"
        "  geode agent out/model --task 'Add 2 and 3' --tools '' --mcp 'python server.py' "
        "--transcript run.jsonl\n"
        "  geode agent model --endpoint http://localhost:8000 --task 'What is 17 * 23?'",
        formatter_class=_FMT,
    )
    p.add_argument("model", help="checkpoint directory (HF layout) or .gguf")
    p.add_argument("--task", required=True, metavar="TEXT", help="the task (a user message)")
    p.add_argument("--tools", default="calculator", metavar="LIST",
                   help=f"comma-separated built-in tools from {','.join(TOOL_NAMES)} "
                   "(default: calculator; '' for none)")  # fmt: skip
    p.add_argument("--workspace", metavar="DIR",
                   help="directory of the files tools (and the python tool's starting files)")  # fmt: skip
    p.add_argument("--corpus", metavar="PATH",
                   help="search corpus: a directory of text files or a .jsonl of {\"text\"}")  # fmt: skip
    p.add_argument("--mcp", action="append", default=[], metavar="CMD",
                   help="an MCP server command (stdio) whose tools are added (repeatable)")  # fmt: skip
    p.add_argument("--mode", choices=MODES, default="act", help="act (default) or plan-act-verify")
    p.add_argument("--max-turns", type=int, default=8, metavar="N", help="model turns (8)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="tokens per model turn (256)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--tool-seconds", type=float, default=60.0, metavar="S",
                   help="tool wall time for the whole episode (60)")  # fmt: skip
    p.add_argument("--transcript", metavar="OUT.jsonl",
                   help="write the episode (messages, info) as one JSON line")  # fmt: skip
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model (default: in MODEL)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: as stored)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--endpoint", metavar="URL",
                   help="run through an OpenAI-compatible server (geode serve) instead: MODEL "
                   "is the served model's name, the tool calls run here (geode.agents.remote)")  # fmt: skip
    p.set_defaults(func=run)


def build_toolbox(args: argparse.Namespace):  # -> Toolbox
    """The Toolbox of the --tools/--workspace/--corpus/--mcp flags; bad flags -> CLIError."""
    import shlex

    from ..agents import tools as T
    from . import CLIError

    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    bad = [n for n in names if n not in TOOL_NAMES]
    if bad:
        raise CLIError(f"--tools: unknown tool(s) {bad}; choose from {list(TOOL_NAMES)}")
    if "files" in names and not args.workspace:
        raise CLIError("--tools files needs --workspace DIR")
    if "search" in names and not args.corpus:
        raise CLIError("--tools search needs --corpus PATH")
    if args.corpus and "search" not in names:
        raise CLIError("--corpus is given but search is not in --tools")
    tools = []
    for n in names:
        if n == "python":
            tools.append(T.python_tool(args.workspace))
        elif n == "calculator":
            tools.append(T.calculator_tool())
        elif n == "files":
            tools += T.file_tools(args.workspace)
        else:
            tools.append(T.search_tool(args.corpus))
    for cmd in args.mcp:
        try:
            tools += T.mcp_tools(shlex.split(cmd))
        except (RuntimeError, ValueError) as e:
            raise CLIError(f"--mcp {cmd!r}: {e}") from None
    return T.Toolbox(tools)


def format_message(m: dict) -> str:
    """One transcript message as text: its role, thinking, content and tool calls."""
    import json

    lines = [f"[{m['role']}{' ' + m['name'] if m.get('name') else ''}]"]
    if m.get("thinking"):
        lines.append(f"(thinking) {m['thinking']}")
    if isinstance(m.get("content"), str) and m["content"]:
        lines.append(m["content"])
    for c in m.get("tool_calls") or []:
        fn = c.get("function", c)
        args = fn.get("arguments")
        args = json.loads(args) if isinstance(args, str) else args
        lines.append(f"-> {fn['name']}({json.dumps(args, ensure_ascii=False)})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the episode and print its transcript and outcome."""
    from . import CLIError

    for flag, value in (("--max-turns", args.max_turns), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    box = build_toolbox(args)
    try:
        episode(args, box)
    finally:
        box.close()  # the MCP servers
    return 0


def episode(args: argparse.Namespace, box) -> None:
    """One ToolEnv episode of --task on the model with `box`; prints it, writes --transcript."""
    import json

    from ..agents.loop import ToolEnv, run_agent
    from ..fileio import atomic_write_bytes
    from ..infer import Engine, SamplingParams
    from ..infer.load import load_for_inference
    from . import CLIError

    try:
        env = ToolEnv(args.task, box, mode=args.mode, max_turns=args.max_turns,
                      tool_seconds=args.tool_seconds)  # fmt: skip
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.endpoint:  # the OpenAI tool-call loop, client-side
        from ..agents.remote import run_remote

        [r] = run_remote(args.endpoint, args.model, [env], max_tokens=args.max_new_tokens,
                         temperature=args.temperature, seed=args.seed)  # fmt: skip
    else:
        model, tok = load_for_inference(args.model, args.dtype, args.device,
                                        tokenizer=args.tokenizer, require_tokenizer=True)  # fmt: skip
        engine = Engine(model, tok, max_batch=1, seed=args.seed)
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, seed=args.seed)  # fmt: skip
        [r] = run_agent(engine, [env], sampling=sampling)
    print(f"tools: {', '.join(box.tools) or '(none)'}\n")
    for m in r.transcript:
        print(format_message(m) + "\n")
    info = r.info
    print(f"steps {info['steps']}, tool calls {info['tool_calls']} ({info['tool_errors']} "
          f"errors), tokens {info['tokens']}, success {r.success}, reward {r.reward:g}"
          + (f", error: {info['error']}" if info.get("error") else ""))  # fmt: skip
    if args.transcript:
        row = {"task": args.task, "mode": args.mode, "success": r.success, "reward": r.reward,
               "info": info, "messages": r.transcript, "tools": env.tools}  # fmt: skip
        atomic_write_bytes(args.transcript, (json.dumps(row, ensure_ascii=False) + "\n").encode())
