"""geode.recipe: strict TOML <-> dataclass loading, and writing back."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from geode.recipe import RecipeError, dump_recipe, load_recipe, recipe_to_toml


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.95)
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclass
class Source:
    name: str
    weight: float = 1.0
    paths: list[str] = field(default_factory=list)
    extra: Optim | None = None


@dataclass
class Recipe:
    name: str
    steps: int = 10
    verbose: bool = False
    out: Path = Path("runs/x")
    optim: Optim = field(default_factory=Optim)
    sources: list[Source] = field(default_factory=list)
    by_n: dict[int, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    seed: int | None = None


TOML = """
name = "demo"
steps = 20
out = "runs/demo"
by_n = { 2 = 0.2, 3 = 0.18 }

[optim]
lr = 3       # an int is a valid float
schedule = "linear"

[[sources]]
name = "a"
paths = ["x.txt", "y/*.txt"]

[[sources]]
name = "b"
weight = 0.5
[sources.extra]
lr = 0.1
"""


def test_load_nested(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(TOML)
    r = load_recipe(Recipe, path)
    assert r.name == "demo" and r.steps == 20 and r.out == Path("runs/demo")
    assert r.optim == Optim(lr=3.0, schedule="linear")
    assert isinstance(r.optim.lr, float)
    assert [s.name for s in r.sources] == ["a", "b"]
    assert r.sources[0].paths == ["x.txt", "y/*.txt"] and r.sources[0].extra is None
    assert r.sources[1].extra == Optim(lr=0.1)
    assert r.by_n == {2: 0.2, 3: 0.18}
    assert r.seed is None


def test_round_trip(tmp_path: Path) -> None:
    r = load_recipe(Recipe, tomllib.loads(TOML))
    r.tags = {"needs quoting": 'a "b"\nc', "plain": "ü"}
    r.seed = 3
    text = recipe_to_toml(r)
    assert load_recipe(Recipe, tomllib.loads(text)) == r
    assert load_recipe(Recipe, dump_recipe(r, tmp_path / "out.toml")) == r


@pytest.mark.parametrize(
    "text, words",
    [
        ('name = "x"\nstep = 3\n', ["'step'", "top level"]),
        ('name = "x"\n[optim]\nlr = 1.0\nbeta = 2\n', ["'beta'", "[optim]"]),
        ('name = "x"\n[[sources]]\nname = "a"\nwieght = 2\n', ["'wieght'", "[sources[0]]"]),
        ('name = "x"\n[[sources]]\nname = "a"\n[sources.extra]\nlrr = 1\n', ["'lrr'", "extra"]),
    ],
)
def test_unknown_key_names_key_and_section(text: str, words: list[str]) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(Recipe, tomllib.loads(text))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize(
    "text, field_name",
    [
        ('name = "x"\nsteps = "ten"\n', "'steps'"),
        ('name = "x"\nsteps = 1.5\n', "'steps'"),
        ('name = "x"\nsteps = true\n', "'steps'"),
        ('name = "x"\nverbose = 1\n', "'verbose'"),
        ('name = "x"\n[optim]\nschedule = "step"\n', "'optim.schedule'"),
        ('name = "x"\n[optim]\nbetas = ["a"]\n', "'optim.betas[0]'"),
        ('name = "x"\nby_n = { two = 0.2 }\n', "'by_n'"),
        ('name = "x"\n[[sources]]\nname = "a"\npaths = "x.txt"\n', "'sources[0].paths'"),
        ('name = "x"\noptim = 3\n', "'optim'"),
    ],
)
def test_wrong_type_names_field(text: str, field_name: str) -> None:
    with pytest.raises(RecipeError, match=field_name.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(Recipe, tomllib.loads(text))


def test_missing_required_and_bad_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="missing required key 'name'"):
        load_recipe(Recipe, {})
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(Recipe, tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(RecipeError, match="bad.toml: invalid TOML"):
        load_recipe(Recipe, bad)
