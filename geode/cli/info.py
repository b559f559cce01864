"""`geode info`: parameters, layer pattern and KV-cache memory of a checkpoint or preset."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `info` verb."""
    p = sub.add_parser(
        "info",
        help="parameters, layer pattern and KV-cache memory of a model",
        description="Print parameter counts, the local/global layer pattern and KV-cache bytes "
        "per token and at 8K/32K/128K context, with and without a ring buffer for local layers.",
        epilog="example: geode info gemma3-4b --dtype bfloat16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="checkpoint directory (HF layout) or preset name")
    p.add_argument("--dtype", default="bfloat16", help="KV-cache dtype (default bfloat16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the summary."""
    import json

    from ..info import format_summary, model_summary, resolve_config

    summary = model_summary(resolve_config(args.model), args.dtype)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0
