"""The one loader of a model + tokenizer for inference (generate, chat, serve, bench, eval, drafts)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def load_for_inference(
    source: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    *,
    quant: str | None = None,
    group_size: int = 64,
    tokenizer: str | os.PathLike[str] | None = None,
    require_tokenizer: bool = False,
    seed: int = 0,
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer or None) from a checkpoint directory, a .gguf file or a preset name.

    A preset builds random weights (seeded by `seed`; no tokenizer). dtype: as stored when None.
    quant: "int8" / "int4" weight-only quantization after loading (int4 in groups of
    `group_size`). tokenizer: a tokenizer file or directory to use instead of the checkpoint's
    own. require_tokenizer: raise FileNotFoundError naming `source` when none is found.
    """
    from .. import build_model, get_preset, load_model
    from ..checkpoint import parse_dtype
    from ..tokenizer import find_tokenizer, load_tokenizer

    path = Path(source)
    tok = None
    if path.is_dir() or path.suffix.lower() == ".gguf":  # .gguf: geode/gguf.py
        model = load_model(path, dtype=dtype, device=device)
        if tokenizer is None and find_tokenizer(path) is not None:  # .model, else .json
            tok = load_tokenizer(path)
    else:
        try:
            config = get_preset(str(source))
        except KeyError:
            raise FileNotFoundError(
                f"{source!r} is neither a checkpoint directory nor a preset name (nor a .gguf file)"
            ) from None
        model = build_model(config, dtype=parse_dtype(dtype), device=device, seed=seed)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    if tok is None and require_tokenizer:
        raise FileNotFoundError(
            f"{source}: no tokenizer.model or tokenizer.json (a tokenizer is needed here)"
        )
    if quant is not None:
        from .quant import quantize

        quantize(model, quant, group_size)
    return model, tok
