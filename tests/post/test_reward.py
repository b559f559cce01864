"""Reward models: geode's saved RM loads in transformers' Gemma3TextForSequenceClassification
with equal scores, and geode loads it back."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Gemma3TextForSequenceClassification

import geode
from geode.checkpoint import CheckpointError
from geode.post.reward import RewardModel, load_reward_model, save_reward_model


def _tiny_rm(seed: int = 0) -> RewardModel:
    cfg = dataclasses.replace(
        geode.get_preset("nano-1m"), num_hidden_layers=2, layer_types=None, vocab_size=97
    )
    return RewardModel(
        geode.build_model(cfg, seed=seed), generator=torch.Generator().manual_seed(seed)
    )


def test_saved_rm_loads_in_transformers_with_equal_scores(tmp_path):
    rm = _tiny_rm()
    save_reward_model(rm, tmp_path / "rm")
    hf = Gemma3TextForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.num_labels == 1
    ids = torch.randint(3, 97, (4, 11), generator=torch.Generator().manual_seed(0))
    ids[0, 7:] = 0  # right padding (pad id 0): the score is read at the last real token
    ids[2, 3:] = 0
    with torch.no_grad():
        ours = rm(ids)
        theirs = hf(input_ids=ids, attention_mask=(ids != 0).long()).logits.squeeze(-1)
        again = load_reward_model(tmp_path / "rm")(ids)
    assert ours.shape == (4,) and ours.std() > 0
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ours, atol=0, rtol=0)


def test_rm_checkpoint_errors(tmp_path):
    save_reward_model(_tiny_rm(), tmp_path / "rm")
    with pytest.raises(CheckpointError, match="score.weight"):
        geode.load_model(tmp_path / "rm")  # a causal LM loader refuses the extra head
    geode.save_model(_tiny_rm().model, tmp_path / "lm")
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")
