"""`geode serve` and `geode chat`: an OpenAI-compatible server, and a terminal chat."""

from __future__ import annotations

import argparse
import sys

from .generate import add_draft_args, add_thinking_arg, draft_kwargs, thinking_budget

_FMT = argparse.RawDescriptionHelpFormatter


def _add_weight_args(p: argparse.ArgumentParser) -> None:
    """--dtype and --quant: how the weights are held in memory."""
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: as stored)")
    p.add_argument(
        "--quant", choices=["int8", "int4"], help="weight-only quantization after loading"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `serve` and `chat` verbs."""
    p = sub.add_parser(
        "serve",
        help="serve a model behind an OpenAI-compatible HTTP API (with a chat page at /)",
        description="Serve one model with FastAPI + uvicorn: /v1/completions, "
        "/v1/chat/completions (streaming, tools, JSON modes), /v1/models, /health, /metrics, "
        "/tokenize, /detokenize, /tokenizer_info, and a chat page at /. Requests are batched "
        "continuously; see docs/serving.md.",
        epilog="example:\n  geode serve out/final --port 8000 --api-key sk-local\n"
        "  curl -H 'Authorization: Bearer sk-local' localhost:8000/v1/models",
        formatter_class=_FMT,
    )
    p.add_argument("model", help="checkpoint directory (HF layout, with tokenizer.model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accepted API key (repeatable; default: no authentication); with keys, every "
        "route but /health and the chat page needs one",
    )
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    p.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting beyond the batch before 429"
    )
    p.add_argument("--max-seq-len", type=int, help="context length (default: the model's)")
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=None,
        help="MiB of keys and values of recent prompts kept for requests sharing a prefix "
        "(default 256; 0 = off)",
    )
    p.add_argument("--served-model-name", help="name in /v1/models (default: directory name)")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="largest request body accepted (default 2 MiB); larger ones are answered 413",
    )
    _add_weight_args(p)
    p.add_argument(
        "--no-pack-weights",
        action="store_true",
        help="CPU: keep one copy of the weights (by default batches of 6+ sequences read a "
        "copy packed for the batched GEMM: faster, the weights' bytes once more in memory)",
    )
    p.add_argument(
        "--image-dir",
        metavar="DIR",
        help="a vision model's image_url parts may name local files under DIR (default: only "
        "data: URLs; http(s) URLs are never fetched)",
    )
    add_thinking_arg(p)  # the default of the requests' thinking_budget field
    add_draft_args(p)
    p.set_defaults(func=run_serve)

    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (streaming)",
        description="An interactive chat through the engine, replies streamed as they are "
        "generated. Commands: /reset clears the conversation, /quit (or Ctrl-D) exits.",
        epilog="example:\n  geode chat out/final --temperature 0.7 --system 'Be brief.'",
        formatter_class=_FMT,
    )
    p.add_argument("model", help="checkpoint directory (HF layout, with tokenizer.model)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="default 0.7 (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per reply (default 512)")
    p.add_argument("--seed", type=int, help="sampling seed")
    add_thinking_arg(p)  # opens a thinking section in each reply
    _add_weight_args(p)
    add_draft_args(p)
    p.set_defaults(func=run_chat)


def run_serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted; exit non-zero if the model fails to load."""
    from pathlib import Path

    import uvicorn

    from geode.checkpoint import parse_dtype
    from geode.cli import CLIError
    from geode.serve.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_PREFIX_CACHE_BYTES, create_app

    if not (Path(args.model).is_dir() or Path(args.model).suffix.lower() == ".gguf"):
        raise CLIError(f"{args.model}: not a checkpoint directory or .gguf file")
    if args.max_batch < 1 or args.max_queue < 0:
        raise CLIError("--max-batch must be >= 1 and --max-queue >= 0")
    prefix_mb = args.prefix_cache_mb
    if prefix_mb is not None and prefix_mb < 0:
        raise CLIError(f"--prefix-cache-mb must be >= 0, got {prefix_mb}")
    max_body = DEFAULT_MAX_BODY_BYTES if args.max_body_bytes is None else args.max_body_bytes
    if max_body < 1:
        raise CLIError(f"--max-body-bytes must be >= 1, got {max_body}")
    if args.dtype is not None:
        try:
            parse_dtype(args.dtype)
        except ValueError as e:
            raise CLIError(f"--dtype: {e}") from None
    budget = thinking_budget(args)
    engine_kwargs = draft_kwargs(args)  # a --draft checkpoint loads with the model
    if args.no_pack_weights:
        engine_kwargs["pack_weights"] = False
    failures: list[str] = []
    server: list[uvicorn.Server] = []

    def load_failed(message: str) -> None:  # on the server's loop: stop serving
        failures.append(message)
        for s in server:
            s.should_exit = True

    app = create_app(
        args.model,
        api_keys=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefix_cache_bytes=DEFAULT_PREFIX_CACHE_BYTES if prefix_mb is None else prefix_mb << 20,
        max_seq_len=args.max_seq_len,
        model_name=args.served_model_name,
        engine_kwargs=engine_kwargs or None,
        max_body_bytes=max_body,
        dtype=args.dtype,
        quant=args.quant,
        on_load_error=load_failed,
        thinking_budget=budget,
        image_dir=args.image_dir,
    )
    print(f"geode serve: http://{args.host}:{args.port}/ (chat page), /v1 (API)", file=sys.stderr)
    server.append(
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    )
    server[0].run()
    if failures:
        raise CLIError(f"{args.model}: the model failed to load: {failures[0]}")
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """Interactive terminal chat through the engine."""
    from pathlib import Path

    import torch

    from geode.chat import ChatFormatError, parse, render
    from geode.cli import CLIError
    from geode.infer import Engine, Request, RequestError
    from geode.infer.load import load_for_inference
    from geode.tokenizer import find_tokenizer

    path = Path(args.model)
    if not (path.is_dir() or path.suffix.lower() == ".gguf") or find_tokenizer(path) is None:
        raise CLIError(
            f"{args.model}: not a checkpoint directory with a tokenizer.model or tokenizer.json"
            " (or a .gguf file)"
        )
    spec = draft_kwargs(args)
    budget = thinking_budget(args)
    think = budget is not None  # each reply opens a thinking section of at most `budget` tokens
    model, tok = load_for_inference(path, args.dtype, quant=args.quant, require_tokenizer=True)
    try:
        engine = Engine(model, tok, max_batch=1, **spec)
    except ValueError as e:  # a draft that cannot draft for this model
        raise CLIError(f"--draft: {e}") from None
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = []
    print("geode chat: /reset clears the conversation, /quit or Ctrl-D exits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages.clear()
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = tok.encode(render(system + messages, think=think))
            room = engine.max_seq_len - len(ids)
            if room < 1:
                raise RequestError("the conversation fills the context; /reset to start over")
            req = Request(
                ids,
                max_new_tokens=min(args.max_tokens, room),
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                thinking_budget=budget,
                skip_special_tokens=not think,  # the thinking markers show where it ends
            )
            reply = []
            print("model> ", end="", flush=True)
            # Inference mode around the whole stream: closing it early aborts the sequence,
            # which edits the cache's inference tensors in place.
            with torch.inference_mode():
                stream = engine.stream(req)
                try:
                    for d in stream:
                        reply.append(d.text)
                        print(d.text, end="", flush=True)
                except KeyboardInterrupt:  # stop this reply, keep the conversation
                    print(" [stopped]", end="")
                finally:
                    stream.close()
            print()
            text = "".join(reply)
            content = parse(text, in_thinking=True).content if think else text
            messages.append({"role": "assistant", "content": content.strip()})
        except (ChatFormatError, RequestError) as e:
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
