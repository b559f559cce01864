"""Preflight: estimate the memory a training step needs and refuse settings that cannot fit.

A rough upper estimate, per rank, in bytes:

    weights + gradients      P * (w + w) / shards          (w: bytes per parameter)
    AdamW moments            P * 8 / shards                (two float32 tensors)
    activations              L * B * T * (c_layer * h + 3 * I) * a      (a: activation bytes)
                             + L * B * H * T * T * a       (attention scores with a mask)
                             (with activation checkpointing: L * B * T * h * a + one layer)
    logits                   B * T * V * (a + 4 + 4 + 4)   (logits, float32 copy, softmax, grad)

with P parameters, L layers, B the micro batch, T the sequence length, h hidden, I the MLP
width, H query heads, V the vocabulary. It is deliberately generous: its job is to turn a
batch setting that would be killed by the OOM killer after minutes into an error at once.
"""

from __future__ import annotations

import os

import torch

from ..config import ModelConfig


class BatchMemoryError(RuntimeError):
    """The batch settings cannot fit in this machine's memory."""


def estimate_bytes(
    config: ModelConfig,
    num_params: int,
    micro_batch: int,
    seq_len: int,
    param_bytes: int = 4,
    act_bytes: int = 4,
    shards: int = 1,
    checkpointing: bool = False,
    teacher_params: int = 0,
) -> dict[str, int]:
    """Per-rank byte estimate of one training step, by component."""
    B, T = micro_batch, seq_len
    h, inter, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    H, V = config.num_attention_heads, config.vocab_size
    q_kv = (H + 2 * config.num_key_value_heads) * config.head_dim
    per_layer = B * T * (8 * h + 2 * q_kv + 3 * inter) * act_bytes + B * H * T * T * act_bytes
    acts = L * B * T * h * act_bytes + per_layer if checkpointing else L * per_layer
    return {
        "weights+grads": num_params * 2 * param_bytes // shards,
        "adam": num_params * 8 // shards,
        "activations": acts,
        "logits": B * T * V * (act_bytes + 12),
        "teacher": teacher_params * param_bytes + B * T * V * 8,
    }


def available_bytes(device: torch.device, local_world: int = 1) -> int | None:
    """Free memory for one rank: CUDA free memory, or MemAvailable / ranks on this host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, local_world)
    except OSError:
        return None
    return None


def check_fits(
    estimate: dict[str, int],
    device: torch.device,
    fraction: float,
    what: str,
    local_world: int | None = None,
) -> None:
    """Raise BatchMemoryError naming the settings if the estimate exceeds `fraction` of the memory."""
    if local_world is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    avail = available_bytes(device, local_world)
    if avail is None:
        return
    total = sum(estimate.values())
    if total > fraction * avail:
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate.items() if v)
        raise BatchMemoryError(
            f"{what} needs about {total / 2**30:.2f} GiB per rank ({parts} GiB) but "
            f"{avail / 2**30:.2f} GiB is available on {device} (limit "
            f"train.memory_fraction = {fraction}); lower batch.micro_batch_size or "
            "data.seq_len, or set train.activation_checkpointing = true"
        )
