"""The objective seam: a custom objective fed by a generator, global normalisation, references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import geode
from geode.data.loader import Batch
from geode.recipe import RecipeError
from geode.train import load_train_recipe
from geode.train.batches import TrainData
from geode.train.loop import Trainer
from geode.train.metrics import curve, read_metrics
from geode.train.objectives import Objective, register, sequence_logprobs, token_logprobs
from geode.train.reference import IncompatibleReference, Reference
from tests.train.helpers import synthetic_dataset, tiny_recipe


@register("test-seq-nll")
class SequenceNLL(Objective):
    """Mean over sequences of the per-sequence mean NLL (normalizer: rows, not tokens)."""

    def loss_sum(self, model, batch):
        with self.autocast():
            logits = model(**batch.model_inputs())  # (M, T, V)
        lp = token_logprobs(logits, batch.targets)  # (M, T)
        m = batch.loss_mask.float()
        per_row = -(lp * m).sum(-1) / m.sum(-1).clamp_min(1)  # (M,)
        w = batch.weights if batch.weights is not None else torch.ones_like(per_row)
        return (per_row * w).sum(), float(len(batch)), {"nll": per_row.detach().sum()}

    def report(self, sums, normalizer, training):
        key = "loss" if training else "eval_loss"
        return {key: sums["nll"] / normalizer, "rows": normalizer}


def _rows(seed: int, n: int, T: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 64, (n, T + 1), generator=g)
    lengths = torch.randint(4, T + 1, (n,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (n, T) ragged trained targets
    zeros = torch.zeros(n, T + 1, dtype=torch.long)
    return Batch(
        tokens, torch.arange(T + 1).expand(n, -1), zeros, torch.zeros(n, dtype=torch.long),
        torch.arange(n), loss_mask=mask, weights=torch.rand(n, generator=g) + 0.5,
    )  # fmt: skip


def _run(tmp_path, name: str, micro: int, data_dir) -> list[float]:
    recipe = load_train_recipe(
        tiny_recipe(
            data_dir,
            name=name,
            data={"eval_source": ""},
            batch={"global_batch_size": 8, "micro_batch_size": micro},
            train={"max_steps": 3},
            objective={"kind": "test-seq-nll"},
        )
    )
    steps = iter(range(100))
    data = TrainData(
        batches=lambda: (_rows(next(steps), 8) for _ in range(3)),
        eval_batches=lambda: [_rows(999, 8)],
        vocab_size=64,
    )
    summary = Trainer(recipe, out=tmp_path / name, data=data).fit()
    assert summary["eval_loss"] > 0
    recs = read_metrics(tmp_path / name / "metrics.jsonl")
    assert all(r["rows"] == 8 for r in recs if r["kind"] == "train")
    return list(curve(recs, "train", "loss").values())


def test_custom_objective_on_generated_batches_is_accumulation_invariant(tmp_path):
    """A per-sequence objective selected by `[objective] kind`, fed by a generator: the curve
    with 4 micro-batches of 2 equals one micro-batch of 8 (normalizer summed over micro)."""
    d = synthetic_dataset(tmp_path / "data", docs=40)
    one = _run(tmp_path, "one", 8, d)
    four = _run(tmp_path, "four", 2, d)
    assert len(one) == 3 and one[-1] < one[0]
    np.testing.assert_allclose(four, one, rtol=1e-5)


def test_objective_kind_and_options_are_checked(tmp_path):
    with pytest.raises(RecipeError, match="objective.kind = 'nope' is unknown"):
        load_train_recipe(tiny_recipe(tmp_path, objective={"kind": "nope"}))
    with pytest.raises(RecipeError, match="takes no options"):
        load_train_recipe(tiny_recipe(tmp_path, objective={"kind": "ntp", "options": {"a": 1}}))


def test_reference_logprobs_cache_and_identity(tmp_path, monkeypatch):
    """Sequence log-probs equal a direct gather; the on-disk cache answers a second reference
    without a forward pass; a cache of another model is refused."""
    cfg = geode.get_preset("nano-1m").replace(vocab_size=64, num_hidden_layers=1)
    model = geode.build_model(cfg, seed=0)
    batch = _rows(0, 4)
    ref = Reference(model, cache_dir=tmp_path / "c")
    assert not any(p.requires_grad for p in ref.model.parameters()) and not ref.model.training
    got = ref.sequence_logprobs(batch)
    logp = torch.log_softmax(model(**batch.model_inputs()).float(), -1)
    want = (logp.gather(-1, batch.targets[..., None])[..., 0] * batch.loss_mask).sum(-1)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sequence_logprobs(logp, batch), want)
    ref.flush()
    stored = json.loads((tmp_path / "c" / "reference_logprobs.json").read_text())
    assert len(stored["logprobs"]) == 4
    again = Reference(geode.build_model(cfg, seed=0), cache_dir=tmp_path / "c")
    monkeypatch.setattr(again, "logits", lambda b: (_ for _ in ()).throw(AssertionError("fwd")))
    torch.testing.assert_close(again.sequence_logprobs(batch.rows(slice(1, 3))), got[1:3])
    with pytest.raises(IncompatibleReference, match="cached for another reference"):
        Reference(geode.build_model(cfg, seed=1), cache_dir=tmp_path / "c")


def test_reference_load_refuses_another_vocabulary(tmp_path):
    cfg = geode.get_preset("nano-1m").replace(vocab_size=64, num_hidden_layers=1)
    geode.save_model(geode.build_model(cfg.replace(vocab_size=96), seed=0), tmp_path / "r")
    with pytest.raises(
        IncompatibleReference, match="reference vocab_size 96 != policy vocab_size 64"
    ):
        Reference.load(tmp_path / "r", policy_config=cfg)


def test_reference_load_refuses_another_tokenizer(tmp_path):
    """A reference shipping a tokenizer.model other than the data's is refused, naming both."""
    cfg = geode.get_preset("nano-1m").replace(vocab_size=64, num_hidden_layers=1)
    (tmp_path / "tok.model").write_bytes(b"one tokenizer")
    geode.save_model(geode.build_model(cfg, seed=0), tmp_path / "r",
                     files={"tokenizer.model": tmp_path / "tok.model"})  # fmt: skip
    with pytest.raises(IncompatibleReference, match="policy and reference need one tokenizer"):
        Reference.load(tmp_path / "r", policy_config=cfg, tokenizer_sha256="0" * 64)
    from geode.fileio import sha256_file

    ref = Reference.load(tmp_path / "r", policy_config=cfg,
                         tokenizer_sha256=sha256_file(tmp_path / "tok.model"))  # fmt: skip
    assert not ref.model.training
