"""`geode data prepare` end to end with a real SentencePiece tokenizer; failures and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from geode.cli import main
from geode.data import DataError
from geode.data.filters import FilterConfig
from geode.data.loader import DataLoader
from geode.data.pack import MANIFEST, open_dataset
from geode.data.prepare import DataRecipe, PackConfig, load_data_recipe, prepare
from geode.data.sources import SourceConfig
from geode.data.tasks import generate, verify
from geode.recipe import RecipeError, dump_recipe, load_recipe
from tests.data.helpers import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]


def load_data_recipe_from_manifest(manifest: dict) -> DataRecipe:
    return load_recipe(DataRecipe, manifest["recipe"])


def small_recipe(tmp_path: Path, **kw) -> DataRecipe:
    notes = tmp_path / "notes.txt"
    notes.write_text("First note about packing.\n\nSecond note.\n\nFirst note about packing.\n")
    return DataRecipe(
        sources=[
            SourceConfig(name="tasks", kind="tasks", n=40, seed=0),
            SourceConfig(name="code", kind="stdlib", max_docs=8),
            SourceConfig(name="notes", kind="text", paths=[str(notes)], split_by="paragraph"),
        ],
        pack=PackConfig(shard_tokens=4000),
        **kw,
    )


def test_prepare_end_to_end(spm_tokenizer: Path, tmp_path: Path) -> None:
    from geode.tokenizer import load_tokenizer

    recipe = small_recipe(tmp_path, tokenizer=str(spm_tokenizer))
    recipe.filters.min_chars = 15  # drops "Second note." from notes; code/tasks unaffected
    recipe.sources[0].filters = FilterConfig()  # tasks: no filters
    summary = prepare(recipe, out=tmp_path / "data", progress=False)
    s = summary["sources"]
    assert s["tasks"]["documents"] == 40
    assert s["code"]["documents"] == 7 and s["code"]["dropped"] == {"exact_dup": 1}  # __phello__
    assert s["notes"]["documents_in"] == 3 and s["notes"]["documents"] == 1
    assert s["notes"]["dropped"] == {"exact_dup": 1, "filter:min_chars": 1}
    total = summary["total"]
    assert total["documents"] == 48 and total["dedup_rate"] == pytest.approx(2 / 50)
    assert total["tokens"] == sum(x["tokens"] for x in s.values()) > 0
    assert summary["tokenize_pack_mb_per_s"] > 0

    ds = open_dataset(tmp_path / "data", verify=True)
    assert ds.manifest["dtype"] == "uint16" and ds.vocab_size == 600
    assert ds.manifest["tokenizer"]["path"] == str(spm_tokenizer)
    assert load_data_recipe_from_manifest(ds.manifest) == recipe
    tok = load_tokenizer(spm_tokenizer)
    problems = generate(40, seed=0)
    for i in (0, 39):  # documents decode back exactly, wrapped in <bos> ... <eos>
        ids = ds.streams["tasks"].document(i).tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        text = tok.decode(ids[1:-1])
        assert text == problems[i].document() and verify(problems[i], text)
    assert len(ds.manifest["streams"]["code"]["shards"]) > 1
    loader = DataLoader(ds, batch_size=2, seq_len=64, seed=0)
    assert loader.next_batch().tokens.max() < 600


def test_cli_prepare_inspect_and_tasks(spm_tokenizer: Path, tmp_path: Path, capsys) -> None:
    recipe = small_recipe(tmp_path)
    path = dump_recipe(recipe, tmp_path / "recipe.toml")
    out = tmp_path / "cli-data"
    argv = ["data", "prepare", str(path), "--out", str(out), "--tokenizer", str(spm_tokenizer)]
    assert main([*argv, "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "TOTAL" in table and "dedup rate" in table and "exact_dup=1" in table
    assert main([*argv, "--no-progress", "--json"]) == 0  # replaces the earlier dataset
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"]["documents"] == 49 and summary["out"] == str(out)
    assert main(["data", "inspect", str(out), "--verify", "--show", "1"]) == 0
    shown = capsys.readouterr().out
    assert "checksums OK" in shown and "--- tasks[0]" in shown and "#### " in shown
    assert main(["data", "tasks", "--n", "2", "--jsonl"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["solution"].endswith(f"#### {rows[0]['answer']}")
    path.write_text(path.read_text().replace("[pack]", "[pack]\nshard_size = 3"))
    assert main(["data", "prepare", str(path), "--out", str(out)]) == 1
    assert "unknown key 'shard_size' in section [pack]" in capsys.readouterr().err


class Exploding(ByteTokenizer):
    """Fails on its third batch, as an interrupted or crashing run would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def encode_batch(self, texts, add_bos=False, add_eos=False):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("simulated crash mid-way")
        return super().encode_batch(texts, add_bos, add_eos)


def test_failed_prepare_leaves_nothing_readable(tmp_path: Path) -> None:
    recipe = small_recipe(tmp_path)
    recipe.pack = PackConfig(shard_tokens=500, batch_docs=8)  # several shards before the crash
    out = tmp_path / "data"
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(recipe, out=out, tokenizer=Exploding(), progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".data.")]  # no staging left
    with pytest.raises(DataError, match="no manifest.json"):
        open_dataset(out)

    good = prepare(recipe, out=out, tokenizer=ByteTokenizer(), progress=False)
    before = {p.name: p.stat().st_size for p in (out / "tasks").iterdir()}
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(recipe, out=out, tokenizer=Exploding(), progress=False)
    ds = open_dataset(out, verify=True)  # the earlier dataset is untouched and valid
    assert ds.streams["tasks"].num_tokens == good["sources"]["tasks"]["tokens"]
    assert {p.name: p.stat().st_size for p in (out / "tasks").iterdir()} == before

    # a run killed outright (no cleanup) leaves only a staging dir: never read, later removed
    dead = tmp_path / ".data.staging-999999999"
    (dead / "tasks").mkdir(parents=True)
    (dead / "tasks" / "00000.bin").write_bytes(b"\x01\x02")
    with pytest.raises(DataError, match="no manifest.json"):
        open_dataset(dead)
    prepare(recipe, out=out, tokenizer=ByteTokenizer(), progress=False)
    assert not dead.exists()


def test_bad_inputs_fail_before_writing(tmp_path: Path) -> None:
    recipe = small_recipe(tmp_path)
    recipe.pack = PackConfig(dtype="uint16")
    with pytest.raises(DataError, match="70000 tokens does not fit in uint16"):
        prepare(recipe, out=tmp_path / "a", tokenizer=ByteTokenizer(70_000), progress=False)
    assert not (tmp_path / "a").exists()
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(DataError, match="refusing to replace"):
        prepare(small_recipe(tmp_path), out=tmp_path / "precious", tokenizer=ByteTokenizer())
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = DataRecipe(sources=[SourceConfig(name="e", kind="text", paths=[str(empty)])])
    with pytest.raises(DataError, match="empty.txt is empty"):
        prepare(bad, out=tmp_path / "b", tokenizer=ByteTokenizer(), progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(DataError, match="no tokenizer"):
        prepare(small_recipe(tmp_path), out=tmp_path / "c")
    with pytest.raises(ValueError, match="repeated: x"):
        DataRecipe(sources=[SourceConfig(name="x", kind="stdlib")] * 2)
    with pytest.raises(ValueError, match="unknown source"):
        load_data_recipe_from_manifest(
            {
                "recipe": {
                    "sources": [{"name": "a", "kind": "stdlib"}],
                    "mixture": {"stages": [{"weights": {"b": 1.0}}]},
                }
            }
        )


def test_quickstart_recipe_is_valid() -> None:
    recipe = load_data_recipe(REPO / "recipes" / "data" / "quickstart.toml")
    assert {s.kind for s in recipe.sources} == {"tasks", "stdlib"}
    assert recipe.mixture is not None and len(recipe.mixture.stages) == 2
    text = (REPO / "recipes" / "data" / "quickstart.toml").read_text()
    assert "shared" not in text.replace("# ", "")
    with pytest.raises(RecipeError):
        load_data_recipe(REPO / "recipes" / "data" / "missing.toml")


def test_no_staging_or_temp_names_in_output(tmp_path: Path) -> None:
    out = tmp_path / "data"
    prepare(small_recipe(tmp_path), out=out, tokenizer=ByteTokenizer(), progress=False)
    names = [p.name for p in out.rglob("*")]
    assert MANIFEST in names and not [n for n in names if "tmp" in n or n.startswith(".")]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".data.")]
