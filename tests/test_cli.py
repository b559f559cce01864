"""The `geode` console script: every verb has --help with an example; init writes a checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest

import geode
from geode.cli import build_parser, main


def _verbs() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    return sorted(sub.choices)


@pytest.mark.parametrize("verb", _verbs())
def test_every_verb_has_help_with_example(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "geode", "info", "nano-1m"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "nano-1m" in out.stdout


def test_init_writes_loadable_checkpoint(tmp_path, capsys):
    assert main(["init", "nano-1m", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert "wrote nano-1m" in capsys.readouterr().out
    model = geode.load_model(tmp_path / "m")
    ref = geode.build_model(geode.get_preset("nano-1m"), seed=3)
    assert all(
        (a == b).all() for a, b in zip(model.state_dict().values(), ref.state_dict().values())
    )
