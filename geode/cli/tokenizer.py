"""`geode tokenizer train|encode|decode|info`: train a Gemma-style SentencePiece model, inspect one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

_FMT = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `tokenizer` verb and its actions."""
    p = sub.add_parser(
        "tokenizer",
        help="train, inspect and try a SentencePiece tokenizer",
        description="Train a Gemma-style SentencePiece tokenizer, or encode/decode with one.",
        epilog="example: geode tokenizer train --stdlib --vocab-size 4096 --out runs/tok\n"
        "Run `geode tokenizer ACTION --help` for each action.",
        formatter_class=_FMT,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = actions.add_parser(
        "train",
        help="train a tokenizer on text files and/or the local standard library",
        description="Train a SentencePiece model with Gemma's options (BPE, byte fallback, split "
        "digits, whitespace kept, ids pad=0 eos=1 bos=2 unk=3) and Gemma's chat/image tokens plus "
        "geode's thinking and tool tokens as user-defined pieces. Writes OUT (a .model file, or "
        "OUT/tokenizer.model for a directory).",
        epilog="examples:\n"
        "  geode tokenizer train --input shakespeare.txt --stdlib --vocab-size 8192 --out runs/tok\n"
        "  geode tokenizer train --input a.txt b.txt --vocab-size 2000 --out tok.model",
        formatter_class=_FMT,
    )
    t.add_argument("--input", nargs="+", default=[], metavar="FILE", help="UTF-8 text files")
    t.add_argument(
        "--stdlib", action="store_true", help="also train on this Python's standard-library sources"
    )
    t.add_argument(
        "--stdlib-mb", type=float, default=16.0, help="cap on stdlib text read, in MB (default 16)"
    )
    t.add_argument("--vocab-size", type=int, required=True, help="number of pieces")
    t.add_argument("--out", required=True, help="output .model file or directory")
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="default bpe")
    t.add_argument(
        "--character-coverage", type=float, default=0.9995, help="default 0.9995 (rest: bytes)"
    )
    t.add_argument(
        "--symbol",
        action="append",
        default=[],
        metavar="TOKEN",
        help="extra user-defined token (repeatable)",
    )
    t.add_argument("--reserved", type=int, default=0, help="add <unused0..N-1> pieces (default 0)")
    t.add_argument("--max-mb", type=float, default=0.0, help="cap on all input, in MB (0: none)")
    t.add_argument("--threads", type=int, default=0, help="training threads (0: all cores)")
    t.add_argument("--verbose", action="store_true", help="show SentencePiece's training log")
    t.set_defaults(func=run_train)

    e = actions.add_parser(
        "encode",
        help="print the token ids (or pieces) of a text",
        description="Encode TEXT (or stdin) and print ids, or pieces with --pieces.",
        epilog="example: geode tokenizer encode runs/tok '<start_of_turn>user\\nhi' --pieces",
        formatter_class=_FMT,
    )
    e.add_argument("tokenizer", help="tokenizer.model file or checkpoint directory")
    e.add_argument("text", nargs="?", help="text to encode (default: read stdin)")
    e.add_argument("--bos", action="store_true", help="prepend <bos>")
    e.add_argument("--eos", action="store_true", help="append <eos>")
    e.add_argument("--pieces", action="store_true", help="print id:piece pairs")
    e.set_defaults(func=run_encode)

    d = actions.add_parser(
        "decode",
        help="print the text of token ids",
        description="Decode token ids (arguments, or whitespace/comma-separated on stdin).",
        epilog="example: geode tokenizer decode runs/tok 2 6 1234 7",
        formatter_class=_FMT,
    )
    d.add_argument("tokenizer", help="tokenizer.model file or checkpoint directory")
    d.add_argument("ids", nargs="*", help="token ids (default: read stdin)")
    d.add_argument("--skip-special", action="store_true", help="drop special tokens")
    d.set_defaults(func=run_decode)

    i = actions.add_parser(
        "info",
        help="vocabulary size and special-token ids",
        description="Print the vocabulary size and the ids of the special tokens present.",
        epilog="example: geode tokenizer info runs/tok",
        formatter_class=_FMT,
    )
    i.add_argument("tokenizer", help="tokenizer.model file or checkpoint directory")
    i.set_defaults(func=run_info)


def stdlib_texts(max_bytes: int) -> Iterator[str]:
    """This Python's standard-library sources, up to about `max_bytes` of text."""
    try:
        from ..data.sources import SourceConfig, read_source

        docs = (d.text for d in read_source(SourceConfig(name="stdlib", kind="stdlib")))
    except ImportError:
        docs = _walk_stdlib()
    total = 0
    for text in docs:
        if max_bytes and total >= max_bytes:
            return
        total += len(text.encode("utf-8"))
        yield text


def _walk_stdlib() -> Iterator[str]:
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages", "test", "tests"} & set(path.parts):
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def run_train(args: argparse.Namespace) -> int:
    """Train and write the model; print a summary."""
    import time

    from ..tokenizer import train_tokenizer
    from . import CLIError

    if not args.input and not args.stdlib:
        raise CLIError("nothing to train on: give --input FILE... and/or --stdlib")
    start = time.perf_counter()
    texts = stdlib_texts(int(args.stdlib_mb * 1e6)) if args.stdlib else ()
    tok = train_tokenizer(
        args.input,
        texts,
        vocab_size=args.vocab_size,
        out=args.out,
        model_type=args.model_type,
        extra_symbols=args.symbol,
        reserved_tokens=args.reserved,
        character_coverage=args.character_coverage,
        max_input_bytes=int(args.max_mb * 1e6),
        num_threads=args.threads or None,
        verbose=args.verbose,
    )
    print(f"wrote {tok.path}: vocab {tok.vocab_size}, {time.perf_counter() - start:.1f}s")
    return 0


def _text_arg(value: str | None) -> str:
    return sys.stdin.read() if value is None else value


def run_encode(args: argparse.Namespace) -> int:
    """Print ids or id:piece pairs."""
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(_text_arg(args.text), add_bos=args.bos, add_eos=args.eos)
    if args.pieces:
        print(" ".join(f"{i}:{tok.id_to_piece(i)!r}" for i in ids))
    else:
        print(" ".join(map(str, ids)))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    """Print the decoded text."""
    from ..tokenizer import load_tokenizer

    raw = args.ids or sys.stdin.read().replace(",", " ").split()
    try:
        ids = [int(x) for x in raw]
    except ValueError as e:
        raise ValueError(f"token ids must be integers: {e}") from None
    tok = load_tokenizer(args.tokenizer)
    sys.stdout.write(tok.decode(ids, skip_special=args.skip_special) + "\n")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print vocabulary size and special ids."""
    from ..tokenizer import SPECIAL_TOKENS, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    print(f"{tok.path}: vocab_size {tok.vocab_size}, unk {tok.unk_id}")
    special = tok.special_ids
    for name in SPECIAL_TOKENS:
        print(f"  {name:<26} {special.get(name, '-')}")
    return 0
