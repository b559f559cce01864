"""Recipes: strict loading, overrides, and bad input refused before any training step."""

from __future__ import annotations

from pathlib import Path

import pytest

from geode.data import DataError
from geode.recipe import RecipeError
from geode.train.distill import DistillError
from geode.train.loop import Trainer
from geode.train.memory import BatchMemoryError
from geode.train.recipe import (
    TrainRecipe,
    apply_overrides,
    check_recipe,
    load_train_recipe,
    micro_batch_and_accumulation,
)
from tests.train.helpers import ROOT, synthetic_dataset, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("data"))


def test_unknown_key_is_an_error_naming_key_and_section(tmp_path, data):
    recipe = tiny_recipe(data)
    recipe["optim"]["learning_rate"] = 1e-3
    path = write_recipe(tmp_path / "r.toml", recipe)
    with pytest.raises(RecipeError, match=r"unknown key 'learning_rate' in section \[optim\]"):
        load_train_recipe(path)
    with pytest.raises(RecipeError, match="unknown key 'bogus' in the top level"):
        load_train_recipe({**tiny_recipe(data), "bogus": 1})


def test_ill_typed_value_is_an_error_naming_the_field(data):
    recipe = tiny_recipe(data, train={"max_steps": "ten"})
    with pytest.raises(RecipeError, match=r"'train.max_steps' must be an integer, got 'ten'"):
        load_train_recipe(recipe)
    with pytest.raises(RecipeError, match=r"'train.precision' must be one of"):
        load_train_recipe(tiny_recipe(data, train={"precision": "fp8"}))


def test_values_checked_before_training(data):
    with pytest.raises(RecipeError, match="data.path is required"):
        load_train_recipe({"train": {"max_steps": 3}})
    with pytest.raises(RecipeError, match=r"optim.warmup_steps = 9: must be <= train.max_steps"):
        load_train_recipe(tiny_recipe(data, optim={"warmup_steps": 9}))
    with pytest.raises(RecipeError, match=r"optim.lr = -1.0: must be > 0"):
        load_train_recipe(tiny_recipe(data, optim={"lr": -1.0}))
    recipe = load_train_recipe(tiny_recipe(data, batch={"global_batch_size": 6}))
    with pytest.raises(RecipeError, match="global_batch_size = 6 is not divisible by the world"):
        micro_batch_and_accumulation(recipe, 4)
    with pytest.raises(RecipeError, match="micro_batch_size = 4 must divide"):
        micro_batch_and_accumulation(recipe, 1)


def test_batch_arithmetic_is_independent_of_world_size(data):
    recipe = load_train_recipe(tiny_recipe(data, batch={"global_batch_size": 16}))
    assert micro_batch_and_accumulation(recipe, 1) == (4, 4)
    assert micro_batch_and_accumulation(recipe, 2) == (4, 2)
    assert micro_batch_and_accumulation(recipe, 4) == (4, 1)


def test_overrides_are_typed_toml_values(data):
    d = apply_overrides(tiny_recipe(data), ["optim.lr=1e-4", "train.precision=bfloat16"])
    assert d["optim"]["lr"] == 1e-4 and d["train"]["precision"] == "bfloat16"
    r = load_train_recipe(tiny_recipe(data), ["optim.betas=[0.8, 0.9]", "fault.sdc_every=5"])
    assert r.optim.betas == (0.8, 0.9) and r.fault.sdc_every == 5
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        apply_overrides({}, ["optim.lr"])


def test_committed_recipes_load():
    for path in sorted((ROOT / "recipes" / "train").glob("*.toml")):
        recipe = load_train_recipe(path)
        assert isinstance(recipe, TrainRecipe)
        assert "/work/shared" not in path.read_text() and "../shared" not in path.read_text()


def test_missing_data_path_is_a_clear_error(tmp_path):
    recipe = load_train_recipe(tiny_recipe(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no manifest.json"):
        Trainer(recipe, out=tmp_path / "out")


def test_unknown_model_override_and_small_vocab(tmp_path, data):
    recipe = tiny_recipe(data)
    recipe["model"]["overrides"]["hidden_sise"] = 3
    with pytest.raises(RecipeError, match="unknown ModelConfig field.*hidden_sise"):
        Trainer(load_train_recipe(recipe), out=tmp_path / "a")
    recipe = tiny_recipe(data)
    recipe["model"]["overrides"]["vocab_size"] = 32
    with pytest.raises(RecipeError, match="tokenized with 64 ids but the model has vocab_size 32"):
        Trainer(load_train_recipe(recipe), out=tmp_path / "b")


def test_out_of_memory_batch_refused_before_any_step(tmp_path, data):
    recipe = load_train_recipe(
        tiny_recipe(
            data, data={"seq_len": 8192}, batch={"global_batch_size": 4096, "micro_batch_size": 0}
        )
    )
    with pytest.raises(BatchMemoryError, match=r"micro_batch_size=4096 x seq_len=8192 .* GiB"):
        Trainer(recipe, out=tmp_path / "oom")
    assert not (tmp_path / "oom" / "metrics.jsonl").exists()


def test_teacher_student_vocab_mismatch(tmp_path, data):
    import geode

    teacher = geode.get_preset("nano-1m").replace(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, head_dim=32,
    )  # fmt: skip
    geode.save_model(geode.build_model(teacher, seed=0), tmp_path / "teacher")
    recipe = load_train_recipe(tiny_recipe(data, distill={"teacher": str(tmp_path / "teacher")}))
    with pytest.raises(DistillError, match="teacher vocab_size 128 != student vocab_size 64"):
        Trainer(recipe, out=tmp_path / "d")


def test_distill_section_checked(data):
    with pytest.raises(RecipeError, match="distill.teacher"):
        load_train_recipe(tiny_recipe(data, distill={"top_k": 8}))
    with pytest.raises(RecipeError, match="distill.top_k = 0: must be >= 1"):
        load_train_recipe(tiny_recipe(data, distill={"teacher": "t", "top_k": 0}))
    check_recipe(load_train_recipe(tiny_recipe(data)))


def test_parameter_count_used_by_the_preflight_is_exact():
    import geode
    from geode.train.loop import _count_params

    for name in ("nano-1m", "nano-20m"):
        cfg = geode.get_preset(name)
        model = geode.build_model(cfg)
        assert _count_params(cfg) == sum(p.numel() for p in model.parameters())
    cfg = geode.get_preset("nano-1m").replace(tie_word_embeddings=False, attention_bias=True)
    assert _count_params(cfg) == sum(p.numel() for p in geode.build_model(cfg).parameters())
