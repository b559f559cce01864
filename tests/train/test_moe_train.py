"""MoE training: the Switch balancing term in the loop, router metrics, FSDP2 = 1 process.

The model is gemma4-nano-moe cut to 2 layers and a 64-token vocabulary (8 experts, top 2).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from geode.model.moe import MoEBlock
from geode.recipe import RecipeError
from geode.train import load_train_recipe, train
from geode.train.loop import Trainer
from geode.train.metrics import curve, read_metrics
from geode.train.objectives.balance import load_balancing_loss
from geode.train.objectives.router import config_aux_coef, resolve_aux_coef
from tests.train.helpers import (
    child_env,
    synthetic_dataset,
    tiny_recipe,
    torchrun,
    write_recipe,
)

MOE = {
    "preset": "gemma4-nano-moe",
    "overrides": {
        "vocab_size": 64,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}


def moe_recipe(root, **sections):
    """A tiny MoE recipe on a synthetic dataset under `root`, written as TOML."""
    data = synthetic_dataset(root / "data")
    return write_recipe(root / "r.toml", tiny_recipe(data, model=MOE, **sections))


def test_aux_term_is_coef_times_switch_loss_and_its_gradient_reaches_the_router(tmp_path):
    path = moe_recipe(tmp_path, objective={"router_aux_loss_coef": 0.05})
    tr = Trainer(load_train_recipe(path), out=tmp_path / "out")
    layers = [layer for layer in tr.raw_model.layers if isinstance(layer.mlp, MoEBlock)]
    assert len(layers) == 2 and tr.router is not None and tr.router.layers == layers
    mb = tr.loader.next_batch().rows(slice(0, tr.micro))
    tr.router.clear()
    total, n, _ = tr.objective.loss_sum(tr.model, mb)
    logits = [layer.routing[0] for layer in layers]  # (N, E) each, N = micro * seq_len
    loads = [layer.routing[1] for layer in layers]
    assert logits[0].shape == (tr.micro * 32, 8)
    with_aux = tr.router.add(total, n)
    want = 0.05 * n * load_balancing_loss(logits, num_experts=8, top_k=2).detach()
    torch.testing.assert_close(with_aux - total, want, rtol=1e-6, atol=1e-6)
    assert 1.5 < float(want) / (0.05 * n) < 4  # near k = 2 for a near-uniform router

    tr.optimizer.zero_grad(set_to_none=True)
    (with_aux - total).backward()  # the balancing term alone (total's paths cancel to 0)
    for layer in layers:
        router = layer.mlp.router
        assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0
        assert router.scale.grad is not None and router.scale.grad.abs().sum() > 0
    # f_i is a count: the term reaches experts only through later routers' inputs (the residual)
    g = layers[-1].mlp.experts.gate_up_proj.grad
    assert g is None or not g.any()

    rep = tr.router.report(n, tr.info)  # one micro-batch: the layers' own expert_load
    torch.testing.assert_close(rep["router_aux_loss"], float(want) / (0.05 * n))
    want_max = [float(x.max()) for x in loads]
    np.testing.assert_allclose(rep["router_layers"]["load_max"], want_max, atol=1e-6)
    np.testing.assert_allclose(
        rep["router_layers"]["load_min"], [float(x.min()) for x in loads], atol=1e-6
    )
    ent = [float(-(x[x > 0] * x[x > 0].log()).sum() / math.log(8)) for x in loads]
    np.testing.assert_allclose(rep["router_layers"]["entropy"], ent, atol=1e-6)
    assert rep["router_load_max"] == pytest.approx(max(want_max), abs=1e-6)


def test_train_step_backpropagates_the_term_and_logs_the_objective_loss(tmp_path):
    """Same seed and batch, coefficient 0.5 vs 0: equal logged loss and aux loss (before the
    update), different gradients."""
    path = moe_recipe(tmp_path)
    recs = []
    for coef in (0.5, 0.0):
        recipe = load_train_recipe(path, [f"objective.router_aux_loss_coef={coef}"])
        recs.append(Trainer(recipe, out=tmp_path / f"c{coef}").train_step())
    on, off = recs
    assert on["loss"] == off["loss"] and on["router_aux_loss"] == off["router_aux_loss"]
    assert abs(on["grad_norm"] - off["grad_norm"]) > 1e-6 * off["grad_norm"]


def test_aux_coef_from_recipe_checkpoint_or_switch_default(tmp_path):
    path = moe_recipe(tmp_path)
    recipe = load_train_recipe(path)
    assert recipe.objective.router_aux_loss_coef is None
    assert resolve_aux_coef(recipe) == 0.01  # Switch's alpha
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"text_config": {"router_aux_loss_coef": 0.001}}))
    assert config_aux_coef(str(ckpt)) == 0.001
    recipe.model.init = str(ckpt)
    assert resolve_aux_coef(recipe) == 0.001
    recipe.objective.router_aux_loss_coef = 0.0  # the recipe wins, 0 turns the term off
    assert resolve_aux_coef(recipe) == 0.0
    (ckpt / "config.json").write_text(json.dumps({"router_aux_loss_coef": "high"}))
    with pytest.raises(ValueError, match="router_aux_loss_coef = 'high'"):
        config_aux_coef(str(ckpt))
    with pytest.raises(RecipeError, match=r"objective.router_aux_loss_coef = -0.1: must be >= 0"):
        load_train_recipe(path, ["objective.router_aux_loss_coef=-0.1"])


@pytest.mark.slow
def test_fsdp2_geode_train_on_two_processes_matches_one_process(tmp_path):
    """The MoE preset in 1 process, then `geode train` under torchrun with FSDP2 on 2 gloo
    processes: global batch 8 = 1 process x 2 micro-batches of 4 = 2 x 1 of 4, so every
    forward pass (and its per-micro-batch balancing loss) sees the same rows."""
    path = moe_recipe(tmp_path, train={"max_steps": 4, "deterministic": True})
    one, two = tmp_path / "one", tmp_path / "fsdp"
    train(load_train_recipe(path), out=one)
    args = ["train", str(path), "--out", str(two), "--set", "train.parallel=fsdp"]
    proc = torchrun(2, args, child_env())
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert json.loads((two / "summary.json").read_text())["parallel"] == "fsdp"
    ref, got = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    # eval at 1e-4: after 4 AdamW steps the float-order noise of FSDP's reduce-scatter can
    # flip a near-tie in some held-out token's top-2 experts, a discrete jump the dense
    # model does not have
    for kind, key, rtol in (
        ("train", "loss", 1e-5),
        ("train", "router_aux_loss", 1e-5),
        ("eval", "eval_loss", 1e-4),
    ):
        a, b = curve(got, kind, key), curve(ref, kind, key)
        assert list(a) == list(b) == ([1, 2, 3, 4] if kind == "train" else [4]), key
        np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=rtol, err_msg=key)
    for a, b in zip(
        (r for r in got if r["kind"] == "train"), (r for r in ref if r["kind"] == "train")
    ):
        np.testing.assert_allclose(a["router_layers"]["load_max"], b["router_layers"]["load_max"])
        np.testing.assert_allclose(a["router_layers"]["entropy"], b["router_layers"]["entropy"])
        assert 0 < b["router_load_min"] <= 1 / 8 <= b["router_load_max"] < 1
        assert 0 < b["router_load_entropy"] <= 1
