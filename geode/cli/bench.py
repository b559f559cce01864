"""`geode bench`: benchmarks of geode components (`geode bench decode ...`).

Each benchmark prints one JSON line per measurement (--json) or a table. Comparisons with
reference implementations (transformers, llama.cpp) live in bench/*.py, which run both sides
in the same process.
"""

from __future__ import annotations

import argparse

_FMT = argparse.RawDescriptionHelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bench` verb and its `decode` benchmark."""
    p = sub.add_parser(
        "bench",
        help="benchmarks (decode speed, ...)",
        description="Benchmarks of geode components; `geode bench decode --help` for decode.",
        epilog="example:\n  geode bench decode nano-60m --batch 1,8,32 --prompt-len 64 "
        "--new-tokens 64 --json",
        formatter_class=_FMT,
    )
    which = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    d = which.add_parser(
        "decode",
        help="tokens/s of batched greedy decoding and the fraction of the bandwidth roofline",
        description="Decode speed of the inference engine on a checkpoint or a preset (random "
        "weights): prefill time, decode tokens/s per batch size, and, from this machine's "
        "measured copy bandwidth, the fraction of the memory roofline achieved (bytes of weights "
        "+ KV cache read per step / bandwidth). Compare with transformers in bench/decode.py.",
        epilog="examples:\n"
        "  geode bench decode nano-60m --batch 1,8,32 --prompt-len 64 --new-tokens 64 --json\n"
        "  geode bench decode out/model --batch 1 --dtype bfloat16\n"
        "  geode bench decode nano-60m --batch 1 --quant int4 --group-size 64",
        formatter_class=_FMT,
    )
    d.add_argument("model", help="checkpoint directory (HF layout) or preset name")
    d.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes (1,8,32)")
    d.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (64)")
    d.add_argument("--new-tokens", type=int, default=64, help="generated tokens (64)")
    d.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: as stored)")
    d.add_argument("--quant", choices=["int8", "int4"], help="weight-only quantization")
    d.add_argument("--group-size", type=int, default=64, help="int4 group size (32/64/128)")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    d.add_argument("--reps", type=int, default=3, help="timed repetitions; the median is kept")
    d.add_argument("--no-kernels", action="store_true", help="plain torch ops (no C kernels)")
    d.add_argument("--json", action="store_true", help="one JSON line per measurement")
    d.set_defaults(func=run_decode)


def run_decode(args: argparse.Namespace) -> int:
    """Run the decode benchmark and print JSON lines or a table."""
    import json

    import torch

    from ..infer import Engine
    from ..infer.benchmark import (
        cache_bytes_read,
        copy_bandwidth,
        measure_decode,
        weight_bytes_per_token,
    )
    from ..infer.load import load_for_inference
    from . import CLIError

    try:
        batches = [int(b) for b in args.batch.split(",") if b]
    except ValueError:
        raise CLIError(f"--batch must be comma-separated integers, got {args.batch!r}") from None
    if args.no_kernels:
        import os

        os.environ["GEODE_NO_KERNELS"] = "1"  # read when the kernels first load
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_for_inference(
        args.model, args.dtype, None, quant=args.quant, group_size=args.group_size
    )
    engine = Engine(model, max_batch=max(batches), optimize=not args.no_kernels)
    bw = copy_bandwidth()
    rows = []
    for b in batches:
        r = measure_decode(engine, b, args.prompt_len, args.new_tokens, reps=args.reps)
        ctx = args.prompt_len + args.new_tokens // 2  # mean context during decode
        step_bytes = weight_bytes_per_token(model) + cache_bytes_read(model, ctx, model.dtype, b)
        r.update(
            model=args.model,
            dtype=str(model.dtype).removeprefix("torch."),
            quant=args.quant,
            threads=torch.get_num_threads(),
            copy_bandwidth_gbs=bw / 1e9,
            bytes_per_step=step_bytes,
            roofline_tokens_per_s=b * bw / step_bytes,
            roofline_fraction=r["tokens_per_s"] / (b * bw / step_bytes),
        )
        rows.append(r)
        if args.json:
            print(json.dumps({"bench": "decode", **r}), flush=True)
    if not args.json:
        print(f"{args.model}  dtype {rows[0]['dtype']}  quant {args.quant}  "
              f"threads {rows[0]['threads']}  copy bandwidth {bw / 1e9:.1f} GB/s")  # fmt: skip
        print(f"{'batch':>5} {'prefill s':>10} {'ms/step':>8} {'tok/s':>8} {'roofline':>9}")
        for r in rows:
            print(f"{r['batch']:>5} {r['prefill_s']:>10.3f} {r['step_ms']:>8.2f} "
                  f"{r['tokens_per_s']:>8.1f} {r['roofline_fraction']:>8.0%}")  # fmt: skip
    return 0
