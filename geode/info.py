"""Model facts without weights: parameter counts, layer pattern, KV-cache memory (docs/architecture.md).

The KV-cache formula has one definition, `geode.infer.cache.kv_cache_bytes`, which the engine's
cache is tested against; `geode info` prints it for Gemma 3, and the family's decode-state size
(`geode.family.state_bytes`: per-kind K/V, constant recurrent states) for the other members.
Parameter counts (total and active per token) come from `geode.family.parameter_counts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import parse_dtype, read_config
from .config import FULL, PRESETS, RECURRENT, SLIDING, ModelConfig, get_preset
from .family import parameter_counts, state_bytes
from .infer.cache import kv_cache_bytes

__all__ = ["format_summary", "layer_pattern", "model_summary", "parameter_counts"]

CONTEXTS = {"8K": 8 * 1024, "32K": 32 * 1024, "128K": 128 * 1024}


def resolve_config(model: str) -> ModelConfig:
    """A preset name or a checkpoint directory -> its ModelConfig (no weights read)."""
    if model in PRESETS:
        return get_preset(model)
    if Path(model).exists():
        return read_config(model)
    raise FileNotFoundError(
        f"{model!r} is neither a checkpoint directory nor a preset "
        f"(presets: {', '.join(sorted(PRESETS))})"
    )


def tokenizer_file(model: str) -> Path | None:
    """The tokenizer file a checkpoint's loaders use (tokenizer.model, else tokenizer.json)."""
    from .tokenizer import find_tokenizer

    return None if model in PRESETS else find_tokenizer(model)


def layer_pattern(config: ModelConfig) -> str:
    """Compact pattern, e.g. 'LLLLLG x 5 + LLLL' (L local, G global, R recurrent)."""
    s = "".join({FULL: "G", RECURRENT: "R"}.get(t, "L") for t in config.layer_types)
    for period in range(1, len(s) + 1):
        unit = s[:period]
        reps = len(s) // period
        if (
            reps > 1
            and unit * reps == s[: period * reps]
            and s[period * reps :] == unit[: len(s) % period]
        ):
            tail = s[period * reps :]
            return f"{unit} x {reps}" + (f" + {tail}" if tail else "")
    return s


def model_summary(
    config: ModelConfig, dtype: torch.dtype | str = "bfloat16", tokenizer: Path | None = None
) -> dict[str, Any]:
    """Everything `geode info` prints, as a JSON-able dict (`tokenizer`: the file used)."""
    dtype = parse_dtype(dtype)
    dtype_name = str(dtype).removeprefix("torch.")

    def kv(n: int, ring: bool, kinds: tuple[str, ...] = (SLIDING, FULL, RECURRENT)) -> int:
        if config.family == "gemma3" and len(kinds) == 3:  # the engine's tested formula
            return kv_cache_bytes(config, n, dtype, ring_buffer=ring)
        return state_bytes(config, n, dtype, ring_buffer=ring, kinds=kinds)

    constant = kv(0, False)  # recurrent layers' state, whatever the length
    one = kv(1, False) - constant
    return {
        "name": config.name,
        "family": config.family,
        "tokenizer": str(tokenizer) if tokenizer else None,
        "parameters": parameter_counts(config),
        "layers": config.num_hidden_layers,
        "global_layers": config.num_global_layers,
        "local_layers": config.num_local_layers,
        "layer_pattern": layer_pattern(config),
        "sliding_window": config.sliding_window,
        "max_position_embeddings": config.max_position_embeddings,
        "kv_dtype": dtype_name,
        "recurrent_layers": config.num_recurrent_layers,
        "kv_bytes_per_token": one,
        "kv_bytes_per_token_global_only": kv(1, False, (FULL,)),
        "state_bytes_constant": constant,
        "kv_cache": {
            label: {
                "tokens": n,
                "full": kv(n, False),
                "ring": kv(n, True),
                "beyond_max_position": n > config.max_position_embeddings,
            }
            for label, n in CONTEXTS.items()
        },
        "config": {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "query_pre_attn_scalar",
                "rope_theta",
                "rope_local_base_freq",
                "rope_scaling_factor",
                "final_logit_softcapping",
            )
        },
    }


def _human(n: float, unit: str = "B") -> str:
    """1536 -> '1.50 KiB' (binary prefixes for bytes, decimal for counts)."""
    base, prefixes = (
        (1024, ["", "Ki", "Mi", "Gi", "Ti"]) if unit == "B" else (1000, ["", "K", "M", "B", "T"])
    )
    i = 0
    while abs(n) >= base and i < len(prefixes) - 1:
        n /= base
        i += 1
    return f"{n:.2f} {prefixes[i]}{unit}".rstrip() if i else f"{int(n)} {unit}".rstrip()


def format_summary(s: dict[str, Any]) -> str:
    """Human-readable text of `model_summary`."""
    p = s["parameters"]
    c = s["config"]
    lines = [
        f"model            {s['name'] or '(unnamed)'}  [{s['family']}]",
        f"parameters       {_human(p['total'], '')} total = {_human(p['embedding'], '')} embedding "
        f"+ {_human(p['non_embedding'], '')} non-embedding ({p['total']:,})",
        *(
            [f"active/token     {_human(p['active'], '')} ({p['active']:,}; MoE: top-k experts)"]
            if p["active"] != p["total"]
            else []
        ),
        f"shape            hidden {c['hidden_size']}, mlp {c['intermediate_size']}, "
        f"heads {c['num_attention_heads']}/{c['num_key_value_heads']} kv x {c['head_dim']}, "
        f"vocab {c['vocab_size']:,}",
        f"tokenizer        {s.get('tokenizer') or '(none)'}",
        f"layers           {s['layers']} = {s['local_layers']} local (window "
        f"{s['sliding_window']}) + {s['global_layers']} global"
        + (f" + {s['recurrent_layers']} recurrent" if s["recurrent_layers"] else "")
        + f"; pattern {s['layer_pattern']}",
        f"rope             local base {c['rope_local_base_freq']:g}, global base "
        f"{c['rope_theta']:g} x linear {c['rope_scaling_factor']:g}; "
        f"max positions {s['max_position_embeddings']:,}",
        f"kv cache ({s['kv_dtype']})  {s['kv_bytes_per_token']:,} B/token all layers, "
        f"{s['kv_bytes_per_token_global_only']:,} B/token global layers only",
        *(
            [
                f"recurrent state  {s['state_bytes_constant']:,} B per sequence, constant "
                "(conv window + RG-LRU h per recurrent layer), included below"
            ]
            if s["recurrent_layers"]
            else []
        ),
        "  context   full cache (every layer keeps n)   ring buffer (local keep W)   saving",
    ]
    for label, row in s["kv_cache"].items():
        note = "  (beyond max positions)" if row["beyond_max_position"] else ""
        saving = row["full"] / row["ring"]
        lines.append(
            f"  {label:<8}  {_human(row['full']):>12} ({row['full']:>15,})   "
            f"{_human(row['ring']):>12} ({row['ring']:>14,})   {saving:5.2f}x{note}"
        )
    if s["family"] == "gemma3":
        lines.append(
            "  formula: bytes(n) = 2 * H_kv * D * b * (L_global * n + L_local * min(n, W)); "
            "full: min(n, W) -> n"
        )
    else:
        lines.append(
            "  formula: per layer 2 * H_kv * D * b * (n, or min(n, W) local), each kind its own "
            "H_kv and D; kv-shared layers 0; recurrent (k-1) * W * b + 4 W (geode.family)"
        )
    return "\n".join(lines)
