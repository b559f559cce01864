"""`geode data prepare|tasks|inspect`: build packed training data, show tasks, inspect data."""

from __future__ import annotations

import argparse

_FMT = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `data` verb and its subcommands."""
    p = sub.add_parser(
        "data",
        help="prepare packed training data; print synthetic tasks; inspect prepared data",
        description="Data pipeline: sources -> quality filters -> dedup -> decontamination -> "
        "tokenize -> sharded memory-mapped token files (see docs/data.md).",
        epilog="example: geode data prepare recipes/data/quickstart.toml --out runs/data",
        formatter_class=_FMT,
    )
    verbs = p.add_subparsers(dest="data_verb", metavar="SUBCOMMAND", required=True)

    prep = verbs.add_parser(
        "prepare",
        help="run a data recipe and write a prepared dataset",
        description="Read the sources of a data recipe (TOML), filter, deduplicate, "
        "decontaminate, tokenize and pack them; print a summary table.",
        epilog="example: geode data prepare recipes/data/quickstart.toml "
        "--tokenizer runs/tok/tokenizer.model --out runs/data",
        formatter_class=_FMT,
    )
    prep.add_argument("recipe", help="data recipe, a TOML file")
    prep.add_argument("--out", help="output directory (default: the recipe's `out`)")
    prep.add_argument("--tokenizer", help="tokenizer.model or checkpoint dir (overrides recipe)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    prep.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    prep.set_defaults(func=run_prepare)

    tasks = verbs.add_parser(
        "tasks",
        help="print synthetic arithmetic word problems",
        description="Print problems of the synthetic verifiable task family with their "
        "step-by-step solutions (final line `#### N`).",
        epilog="example: geode data tasks --n 3 --seed 0 --min-steps 2 --max-steps 5",
        formatter_class=_FMT,
    )
    tasks.add_argument("--n", type=int, default=3, help="number of problems (default 3)")
    tasks.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    tasks.add_argument("--split", choices=["train", "heldout"], default="train")
    tasks.add_argument("--min-steps", type=int, default=2)
    tasks.add_argument("--max-steps", type=int, default=4)
    tasks.add_argument("--max-value", type=int, default=100, help="magnitude of the numbers")
    tasks.add_argument("--jsonl", action="store_true", help="one JSON object per line")
    tasks.set_defaults(func=run_tasks)

    insp = verbs.add_parser(
        "inspect",
        help="validate a prepared dataset and print its streams",
        description="Validate a prepared dataset (manifest, shard sizes, offsets; --verify "
        "also checks SHA-256) and print tokens and documents per stream.",
        epilog="example: geode data inspect runs/data --verify --show 1",
        formatter_class=_FMT,
    )
    insp.add_argument("path", help="prepared dataset directory")
    insp.add_argument("--verify", action="store_true", help="check shard checksums")
    insp.add_argument(
        "--show", type=int, default=0, help="decode the first N documents of each stream"
    )
    insp.set_defaults(func=run_inspect)


def run_prepare(args: argparse.Namespace) -> int:
    """Run `geode data prepare`."""
    import json

    from ..data.prepare import format_summary, prepare

    summary = prepare(
        args.recipe, out=args.out, tokenizer=args.tokenizer, progress=not args.no_progress
    )
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    """Run `geode data tasks`."""
    import json

    from ..data.tasks import generate

    problems = generate(
        args.n,
        seed=args.seed,
        split=args.split,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
        max_value=args.max_value,
    )
    for i, p in enumerate(problems):
        if args.jsonl:
            print(json.dumps(p.to_dict()))
        else:
            sep = "\n" if i else ""
            print(f"{sep}--- {p.uid} ({p.split}, {p.steps} steps)\n{p.document()}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Run `geode data inspect`."""
    from ..data.pack import open_dataset

    ds = open_dataset(args.path, verify=args.verify)
    m = ds.manifest
    print(f"{ds.path}: {m['dtype']}, vocab {m['vocab_size']}, {ds.num_tokens} tokens")
    for name, s in ds.streams.items():
        shards = len(m["streams"][name]["shards"])
        print(f"  {name}: {s.num_docs} docs, {s.num_tokens} tokens, {shards} shard(s)")
    if args.show:
        from ..tokenizer import load_tokenizer

        tok_path = m.get("tokenizer", {}).get("path")
        if not tok_path:
            raise ValueError("the manifest names no tokenizer file to decode with")
        tok = load_tokenizer(tok_path)
        for name, s in ds.streams.items():
            for i in range(min(args.show, s.num_docs)):
                print(f"--- {name}[{i}]\n{tok.decode(s.document(i).tolist())}")
    if args.verify:
        print("checksums OK")
    return 0
