"""`geode <verb>`: one console script; each verb lives in geode/cli/<verb group>.py.

A verb module defines `register(subparsers)`, which adds its parser(s) with
`set_defaults(func=handler)`; a handler takes the parsed args and returns an exit code.
Verb modules import heavy libraries (torch, ...) inside handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Verb-group modules, in the order their verbs are listed by `geode --help`.
VERB_MODULES: list[str] = [
    "geode.cli.model",
    "geode.cli.convert",
    "geode.cli.generate",
    "geode.cli.quantize",
    "geode.cli.tokenizer",
    "geode.cli.data",
    "geode.cli.serve",
    "geode.cli.train",
    "geode.cli.post",
    "geode.cli.eval",
    "geode.cli.bench",
    "geode.cli.quickstart",
    "geode.cli.agent",
    "geode.cli.agent_rl",
    "geode.cli.reproduce",
]


class CLIError(Exception):
    """A user-facing error: printed as `geode: error: ...` with exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered verb."""
    parser = argparse.ArgumentParser(
        prog="geode",
        description="geode: build, train, post-train, serve and evaluate Gemma-style models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `geode VERB --help` for a verb's options and an example.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `geode` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"geode: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"geode {args.verb}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
