"""`geode quantize`: write an int8 / int4 weight-only checkpoint that loads back quantized."""

from __future__ import annotations

import argparse

_FMT = argparse.RawDescriptionHelpFormatter
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `quantize` verb."""
    p = sub.add_parser(
        "quantize",
        help="write an int8 / int4 weight-only quantized checkpoint",
        description="Quantize the decoder's linear layers (round to nearest; int8 per output "
        "channel, int4 in groups with a zero point) and the LM head, and save the result in "
        "compressed-tensors' layout (docs/inference.md). geode load_model / generate / serve / "
        "eval load it quantized, without quantizing again; transformers loads it with the "
        "compressed-tensors package installed (int4: CompressedTensorsConfig(dequantize=True)).",
        epilog="examples:\n"
        "  geode quantize out/model out/model-int4 --int4 --group-size 64\n"
        "  geode quantize out/model out/model-int8 --int8\n"
        "  geode generate out/model-int4 --prompt 'def main(' --temperature 0",
        formatter_class=_FMT,
    )
    p.add_argument("model", help="checkpoint directory (HF layout) or preset name")
    p.add_argument("out", help="output directory (written atomically; replaced if it exists)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--int8", dest="mode", action="store_const", const="int8",
                      help="8 bits per weight, one float32 scale per output channel")  # fmt: skip
    mode.add_argument("--int4", dest="mode", action="store_const", const="int4",
                      help="4 bits per weight, a float16 scale and zero point per group")  # fmt: skip
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None,
                   help="int4 group size (default 64)")  # fmt: skip
    p.add_argument("--no-head", action="store_true",
                   help="keep the LM head in float (then other tools compute what geode does)")  # fmt: skip
    p.add_argument("--dtype", default=None,
                   help="float32 / bfloat16 for the float tensors: embedding, norms (default: as "
                   "stored)")  # fmt: skip
    p.set_defaults(func=run)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def run(args: argparse.Namespace) -> int:
    """Load, quantize, save; print what was written and the next command."""
    from pathlib import Path

    from .. import save_model
    from ..infer.load import load_for_inference
    from ..infer.quant import quantize
    from . import CLIError

    src, out = Path(args.model), Path(args.out)
    if src.exists() and out.exists() and out.resolve() == src.resolve():
        raise CLIError(f"OUT {out} is MODEL itself; write the quantized copy elsewhere")
    if args.mode == "int8" and args.group_size is not None:
        raise CLIError("--group-size applies to --int4 only (int8 has one scale per channel)")
    group = args.group_size or 64
    model, _ = load_for_inference(args.model, args.dtype, None)
    if getattr(model, "quantization", None) is not None:
        raise CLIError(f"{args.model} is already quantized ({model.quantization['mode']})")
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quantize(model, args.mode, group, head=not args.no_head)
    files = {n: src / n for n in TOKENIZER_FILES if src.is_dir() and (src / n).is_file()}
    path = save_model(model, out, files=files)
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    what = f"int4, group {group}" if args.mode == "int4" else "int8"
    head = "float" if args.no_head else args.mode
    print(
        f"wrote {path} ({what}; LM head {head}): {_size(stored)} of weights, "
        f"{float_bytes / stored:.1f}x smaller than the {_size(float_bytes)} of "
        f"{str(model.dtype).removeprefix('torch.')} weights"
        + ("" if files else "; no tokenizer file was found next to MODEL")
    )
    prompt = "--prompt 'Hello'" if files else "--ids 2,100,200"
    print(f"next: geode generate {path} {prompt} --temperature 0")
    return 0
