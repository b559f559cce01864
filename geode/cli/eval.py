"""`geode eval TASK[,TASK...]`: evaluate a checkpoint or an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import json
import sys

RETRYABLE_EXIT = 75  # EX_TEMPFAIL (sysexits.h): a rerun of the same command may succeed

_EPILOG = """examples:
  geode eval gsm8k --model runs/sft --data data/gsm8k/test.jsonl --limit 100 --out eval_out
  geode eval tasks,niah,mrcr --model runs/sft --out eval_out
  geode eval humaneval --endpoint http://localhost:8000/v1 --samples 10 --out eval_out
  geode eval gsm8k --endpoint http://localhost:8000 --chat --self-correct --data test.jsonl

  geode eval gsm8k --model runs/sft --dtype bfloat16 --quant int8 --data test.jsonl
  geode eval shapes --model runs/vlm --images photos/questions.jsonl
  geode eval agent-minigrid,agent-math --endpoint http://localhost:8000 --limit 20

tasks: gsm8k, math500, humaneval, mc, niah, mrcr, tasks (the synthetic held-out split),
shapes (image questions: generated shapes, or your own rows with --images), agent-minigrid,
agent-textworld, agent-math, agent-code (whole agent episodes: success rate, steps, tool calls,
tokens; --max-tokens per turn; docs/eval.md).
Outputs: OUT/<task>/samples.jsonl, OUT/results.json, OUT/results.md, OUT/*.png.
A prompt longer than the model's context gets fewer shots, else its sample is skipped
(recorded in the sample, counted in the results). A rerun with the same options resumes from
the samples already written; an interruption a rerun can fix (endpoint down, timeout) exits
with 75, an error it cannot fix with 2.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `eval` verb."""
    p = sub.add_parser(
        "eval",
        help="evaluate a model or an OpenAI-compatible endpoint on benchmarks",
        description="Run evaluation tasks against an in-process geode model (--model) or any "
        "OpenAI-compatible server (--endpoint: vLLM, llama.cpp, geode serve) and write "
        "per-sample outputs, a results JSON, a markdown table and plots.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("tasks", metavar="TASK[,TASK...]", help="comma-separated task names")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="PATH", help="geode/HF checkpoint directory or .gguf")
    src.add_argument("--endpoint", metavar="URL", help="OpenAI-compatible server URL")
    p.add_argument("--api-key", help="bearer token for --endpoint")
    p.add_argument("--served-model", help="model name sent to --endpoint (default: its first)")
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="the served model's geode tokenizer: exact token counts and token-id scoring for "
        "--endpoint",
    )
    p.add_argument("--chat", action="store_true", help="send prompts as chat messages")
    p.add_argument("--concurrency", type=int, default=8, help="endpoint requests in flight")
    p.add_argument("--retries", type=int, default=3, help="retries on 5xx/429/timeouts")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--batch-size", type=int, default=32, help="engine batch size (--model)")
    p.add_argument("--dtype", help="--model weights as float32 / bfloat16 (default: as stored)")
    p.add_argument(
        "--quant", choices=["int8", "int4"], help="--model: weight-only quantization after loading"
    )
    p.add_argument("--limit", type=int, help="first N documents of each task")
    p.add_argument("--shots", type=int, help="few-shot examples (task default otherwise)")
    p.add_argument("--samples", type=int, default=1, help="generations per problem (pass@k)")
    p.add_argument("--max-tokens", type=int, help="generation budget (task default otherwise)")
    p.add_argument("--temperature", type=float, help="default 0 (0.8 with --samples > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", metavar="PATH", help="task data file/directory")
    p.add_argument(
        "--images",
        metavar="PATH",
        help='image-question JSONL for an image task (shapes): rows {"image": path relative to '
        'the file, "question": ..., "answer": ...}; sets the task option images=PATH',
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="task option, e.g. lengths=[512,1024] or turns=8 (repeatable)",
    )
    p.add_argument("--self-correct", action="store_true", help="two attempts (SCoRe metrics)")
    p.add_argument("--out", default="eval_out", help="output directory (default eval_out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _options(items: list[str]) -> dict:
    from geode.cli import CLIError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _image_option(args: argparse.Namespace, options: dict) -> dict:
    """The task options with `--images PATH` as `images` (both ways at once is an error)."""
    from geode.cli import CLIError

    if args.images is None:
        return options
    if "images" in options and options["images"] != args.images:
        raise CLIError(f"--images {args.images} and --option images={options['images']} differ")
    return {**options, "images": args.images}


def _tokenizer(path: str | None):
    if path is None:
        return None
    import geode

    return geode.load_tokenizer(path)


def run(args: argparse.Namespace) -> int:
    """Build the backend and task config, run, print the markdown table."""
    from pathlib import Path

    from geode.checkpoint import parse_dtype
    from geode.cli import CLIError
    from geode.eval import EndpointBackend, EngineBackend, TaskConfig, evaluate
    from geode.eval.backends import BackendError
    from geode.eval.runner import EvalError
    from geode.eval.tasks import TaskError

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    config = TaskConfig(
        limit=args.limit,
        shots=args.shots,
        samples=args.samples,
        data=args.data,
        seed=args.seed,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        chat=args.chat,
        options=_image_option(args, _options(args.option)),
    )
    if args.endpoint and (args.dtype or args.quant):
        raise CLIError("--dtype and --quant apply to --model (an endpoint's server sets its own)")
    if args.dtype is not None:
        try:
            parse_dtype(args.dtype)
        except ValueError as e:
            raise CLIError(f"--dtype: {e}") from None
    try:
        if args.endpoint:
            backend = EndpointBackend(
                args.endpoint,
                api_key=args.api_key,
                model=args.served_model,
                chat=args.chat,
                concurrency=args.concurrency,
                retries=args.retries,
                timeout=args.request_timeout,
                tokenizer=_tokenizer(args.tokenizer),
            )
        else:
            if not (Path(args.model).is_dir() or Path(args.model).suffix.lower() == ".gguf"):
                raise CLIError(f"--model {args.model}: not a checkpoint directory or .gguf file")
            backend = EngineBackend.from_path(
                args.model,
                dtype=args.dtype,
                quant=args.quant,
                chat=args.chat,
                batch_size=args.batch_size,
            )
        evaluate(
            names,
            backend,
            args.out,
            config,
            self_correct=args.self_correct,
            progress=not args.no_progress,
        )
    except EvalError as e:
        if not e.retryable:
            raise CLIError(str(e)) from None
        print(f"geode: error: {e}", file=sys.stderr)
        return RETRYABLE_EXIT
    except (TaskError, BackendError) as e:
        raise CLIError(str(e)) from None
    print(Path(args.out, "results.md").read_text(), end="")
    return 0
