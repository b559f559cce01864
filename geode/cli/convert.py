"""`geode convert`: GGUF (llama.cpp, Ollama, LM Studio) to the HF layout and back."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `convert` verb."""
    p = sub.add_parser(
        "convert",
        help="convert a .gguf file to a HF checkpoint directory, or a directory to .gguf",
        description="The direction comes from IN: a .gguf file becomes a HF-layout directory "
        "(config from the GGUF metadata, tensors dequantized, Gemma's norm convention undone, "
        "tokenizer.model rebuilt from the GGUF's tokenizer); a HF checkpoint directory (with "
        "its tokenizer.model) becomes one .gguf file that llama.cpp runs. The output is "
        "written atomically: on any error nothing is left at OUT.",
        epilog="example:\n  geode convert gemma-3-270m-q4_k_m.gguf gemma-3-270m/\n"
        "  geode convert my-finetune/ my-finetune-q8_0.gguf --type q8_0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help=".gguf file or HF checkpoint directory")
    p.add_argument("output", metavar="OUT", help="HF directory (from .gguf) or .gguf file")
    p.add_argument(
        "--type",
        choices=("f32", "bf16", "q8_0"),
        help="to GGUF: the matrices' type (default bf16; norms and vectors stay f32); "
        "to HF: f32 or bf16 (default bf16 when the GGUF's matrices are BF16, else f32)",
    )
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Convert IN to OUT and print where it went."""
    from ..gguf import convert

    out = convert(args.input, args.output, args.type)
    print(f"wrote {out}")
    return 0
