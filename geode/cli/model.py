"""`geode info` and `geode init`: facts about a model, and random checkpoints of presets."""

from __future__ import annotations

import argparse

_FMT = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `info` and `init` verbs."""
    p = sub.add_parser(
        "info",
        help="parameters, layer pattern and KV-cache memory of a model",
        description="Print parameter counts, the local/global layer pattern and KV-cache bytes "
        "per token and at 8K/32K/128K context, with and without a ring buffer for local layers. "
        "Reads config.json only, so it works on any checkpoint size.",
        epilog="example:\n  geode info gemma3-4b\n  geode info ./my-checkpoint --dtype float32 --json",
        formatter_class=_FMT,
    )
    p.add_argument("model", help="checkpoint directory (HF layout) or preset name")
    p.add_argument("--dtype", default="bfloat16", help="KV-cache dtype (default bfloat16)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_info)

    p = sub.add_parser(
        "init",
        help="write a randomly initialised checkpoint of a preset (HF layout)",
        description="Build a preset with random weights and save it in the Hugging Face layout, "
        "for experiments, tests and benchmarks (transformers, vLLM and geode all load it).",
        epilog="example:\n  geode init nano-5m out/nano-5m --seed 0 --tokenizer out/tok/tokenizer.model",
        formatter_class=_FMT,
    )
    p.add_argument("preset", help="preset name (see `geode info`)")
    p.add_argument("out", help="output directory (replaced atomically if it exists)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument(
        "--tokenizer",
        metavar="MODEL",
        help="tokenizer.model to ship in the checkpoint directory; the embedding gets one row "
        "per piece (a tokenizer larger than the preset's vocabulary is refused)",
    )
    p.set_defaults(func=run_init)


def run_info(args: argparse.Namespace) -> int:
    """Print the summary."""
    import json

    from ..info import format_summary, model_summary, resolve_config, tokenizer_file

    tok = tokenizer_file(args.model)
    summary = model_summary(resolve_config(args.model), args.dtype, tokenizer=tok)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def run_init(args: argparse.Namespace) -> int:
    """Build and save the random checkpoint."""
    from .. import build_model, get_preset, save_model
    from ..checkpoint import parse_dtype

    config = get_preset(args.preset)
    files = {}
    vocab = ""
    if args.tokenizer:
        import dataclasses

        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        if tok.vocab_size > config.vocab_size:
            raise ValueError(
                f"{args.tokenizer}: {tok.vocab_size} pieces do not fit {args.preset}'s "
                f"{config.vocab_size}-row embedding; train the tokenizer with --vocab-size "
                f"{config.vocab_size} or less, or pick a preset with a larger vocabulary"
            )
        # One embedding row per piece: rows without a piece could be sampled but not decoded.
        config = dataclasses.replace(config, vocab_size=tok.vocab_size)
        files["tokenizer.model"] = args.tokenizer
        vocab = f", {tok.vocab_size}-row embedding sized from the tokenizer"
    model = build_model(config, dtype=parse_dtype(args.dtype), seed=args.seed)
    path = save_model(model, args.out, files=files)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.preset} ({n:,} parameters, {args.dtype}, seed {args.seed}{vocab}) to {path}"
    )
    return 0
