"""Reward models: a decoder with a scalar head on the last token, saved as transformers'
`Gemma3TextForSequenceClassification` (decoder keys `model.*` plus `score.weight` (1, hidden),
config with `architectures` and one label), and loaded back by geode.

The score of a sequence is w . h_last, h_last the final-norm hidden state of its last non-pad
token (transformers' rule: the rightmost token that is not `pad_token_id`). Trained with the
Bradley-Terry loss of `geode.post.losses.reward_loss`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from geode.checkpoint import CheckpointError, load_heads, load_model, save_model
from geode.data.loader import Batch
from geode.model.transformer import Transformer

ARCHITECTURE = "Gemma3TextForSequenceClassification"
SCORE_KEY = "score.weight"
HF_CONFIG = {
    "architectures": [ARCHITECTURE],
    "id2label": {"0": "LABEL_0"},
    "label2id": {"LABEL_0": 0},
}


class RewardModel(nn.Module):
    """`model` (a geode decoder) plus `score`, a bias-free linear map hidden -> 1."""

    def __init__(
        self,
        model: Transformer,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.model = model
        h = model.config.hidden_size
        self.score = nn.Linear(h, 1, bias=False, device=model.device, dtype=model.dtype)
        with torch.no_grad():  # transformers' _init_weights for Linear
            w = torch.empty(1, h).normal_(0.0, model.config.initializer_range, generator=generator)
            self.score.weight.copy_(w)
        self.dropout = nn.Dropout(dropout)  # on h_last only: the decoder has no dropout

    @property
    def config(self):
        """The decoder's ModelConfig."""
        return self.model.config

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T), right- or left-padded with pad_token_id -> scores (B,) float32."""
        hidden = self.model.hidden(input_ids, positions, None, segment_ids)  # (B, T, H)
        last = last_token_index(input_ids, self.config.pad_token_id)  # (B,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.score(self.dropout(pooled)).squeeze(-1).float()  # (B,)


def last_token_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Index of the rightmost non-pad token of each row: (B, T) -> (B,) (0 for all-pad rows)."""
    idx = torch.arange(input_ids.shape[-1], device=input_ids.device)  # (T,)
    return (idx * (input_ids != pad_id)).argmax(-1)


def save_reward_model(
    rm: RewardModel, path: str | os.PathLike, files: Mapping[str, str | os.PathLike] | None = None
) -> Path:
    """Write `rm` in the layout transformers' Gemma3TextForSequenceClassification loads."""
    return save_model(
        rm.model, path, files=files, heads={SCORE_KEY: rm.score.weight}, hf_config=HF_CONFIG
    )


def load_reward_model(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None
) -> RewardModel:
    """A reward model saved by `save_reward_model` (or by transformers), in eval mode."""
    root = Path(path)
    try:
        raw = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{root}/config.json: cannot read ({e})") from None
    if ARCHITECTURE not in (raw.get("architectures") or []):
        raise CheckpointError(
            f"{root}: not a reward model (config.json architectures = "
            f"{raw.get('architectures')}, expected {ARCHITECTURE!r})"
        )
    labels = len(raw.get("id2label") or {}) or raw.get("num_labels", 2)
    if labels != 1:
        raise CheckpointError(
            f"{root}: reward model must have one label, config.json says {labels}"
        )
    model = load_model(root, dtype=dtype, heads=(SCORE_KEY,))
    weight = load_heads(root, (SCORE_KEY,), dtype=model.dtype)[SCORE_KEY]
    if tuple(weight.shape) != (1, model.config.hidden_size):
        raise CheckpointError(
            f"{root}: tensor {SCORE_KEY!r} has shape {list(weight.shape)}, expected "
            f"[1, {model.config.hidden_size}]"
        )
    rm = RewardModel(model)
    with torch.no_grad():
        rm.score.weight.copy_(weight)
    return rm.eval()


@torch.no_grad()
def pair_accuracy(models: Sequence[nn.Module], batches: Iterable[Batch]) -> float:
    """Share of pairs whose chosen row scores above its rejected row; several models are a
    prediction ensemble (mean score)."""
    right = total = 0
    for b in batches:
        ids = b.tokens.to(next(models[0].parameters()).device)  # (2P, T+1)
        scores = torch.stack([m.eval()(ids) for m in models]).mean(0)  # (2P,)
        right += int((scores[0::2] > scores[1::2]).sum())
        total += len(b) // 2
    if not total:
        raise ValueError("pair_accuracy: no pairs")
    return right / total


@torch.no_grad()
def average_models(models: Sequence[RewardModel]) -> RewardModel:
    """The uniform weight average phi = 1/M sum_i phi_i (WARM, Rame et al. 2024,
    arXiv:2401.12187, eq. 2) of reward models fine-tuned from one initialisation."""
    if not models:
        raise ValueError("average_models: no models")
    states = [m.state_dict() for m in models]
    for i, s in enumerate(states[1:], 1):
        if s.keys() != states[0].keys() or any(s[k].shape != v.shape for k, v in states[0].items()):
            raise ValueError(f"average_models: member {i} has other parameters than member 0")
    avg = copy.deepcopy(models[0])
    avg.load_state_dict(
        {
            k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
            for k, v in states[0].items()
        }
    )
    return avg.eval()
