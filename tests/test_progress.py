"""geode/progress.py: plain progress lines every N seconds without a terminal or a bar."""

from __future__ import annotations

import io

import pytest

from geode.progress import EVERY_ENV, LineProgress, progress, progress_every


class Clock:
    """A manual clock: `t` seconds."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_lines_every_n_seconds_with_rate_eta_and_postfix():
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(100, "gsm8k", "sample", initial=10, every=30, file=out, clock=clock)
    for _ in range(20):  # 20 samples over 20 s: no line yet
        clock.t += 1
        bar.update(1)
    assert out.getvalue() == ""
    bar.set_postfix({"loss": "2.104"}, refresh=False)
    clock.t += 10
    bar.update(10)  # 40/100 after 30 s: 1 sample/s, 60 left
    assert out.getvalue().splitlines() == [
        "gsm8k: 40/100 sample (40%) 1 sample/s eta 1m00s elapsed 30s loss=2.104"
    ]
    clock.t += 5
    bar.update(60)
    with bar:  # close prints the last line because a line was printed before
        pass
    assert (
        out.getvalue().splitlines()[-1]
        == "gsm8k: 100/100 sample (100%) 2.57 sample/s elapsed 35s loss=2.104"
    )
    bar.close()
    assert len(out.getvalue().splitlines()) == 2  # closing twice prints nothing more


def test_short_loop_prints_nothing_and_unknown_total_has_no_eta():
    clock, out = Clock(), io.StringIO()
    with LineProgress(None, "code", "doc", every=5, file=out, clock=clock) as bar:
        bar.update(3)
    assert out.getvalue() == ""
    bar = LineProgress(None, "code", "doc", every=5, file=out, clock=clock)
    clock.t = 5
    bar.update(7)
    assert out.getvalue() == "code: 7 doc 1.4 doc/s elapsed 5s\n"


def test_no_tty_or_disabled_gives_lines_and_env_sets_the_period(monkeypatch):
    monkeypatch.setenv(EVERY_ENV, "0.5")
    assert progress_every() == 0.5
    for enabled in (True, False):  # StringIO is no terminal; --no-progress is never silent
        bar = progress(10, "x", file=io.StringIO(), enabled=enabled)
        assert isinstance(bar, LineProgress) and bar.every == 0.5

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    from tqdm.auto import tqdm

    bar = progress(10, "x", file=Tty())
    assert isinstance(bar, tqdm)
    bar.close()
    assert not isinstance(progress(10, "x", file=Tty(), enabled=False), tqdm)
    monkeypatch.setenv(EVERY_ENV, "0")
    silent = progress(10, "x", file=io.StringIO())
    silent.update(10)
    silent.close()
    assert silent.lines == 0
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(EVERY_ENV, bad)
        with pytest.raises(ValueError, match=EVERY_ENV):
            progress_every()


def test_data_prepare_without_progress_bar_prints_lines(tmp_path, monkeypatch, capsys):
    """A real caller (geode data prepare, progress=False as --no-progress) writes lines."""
    from geode.data.prepare import prepare
    from tests.data.helpers import ByteTokenizer
    from tests.data.test_prepare import small_recipe

    monkeypatch.setenv(EVERY_ENV, "1e-9")  # every update prints
    prepare(small_recipe(tmp_path), out=tmp_path / "d", tokenizer=ByteTokenizer(), progress=False)
    err = capsys.readouterr().err.splitlines()
    assert "tasks: 40/40 doc (100%)" in "\n".join(err)
    assert any(line.startswith("code: ") and " doc " in line for line in err)
