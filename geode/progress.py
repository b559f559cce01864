"""Progress of long loops: a tqdm bar on a terminal, a plain line every N seconds otherwise.

Logs (no TTY: nohup, CI, a pipe) and `--no-progress` get one line such as
`gsm8k: 120/1319 sample (9%) 2.31 sample/s eta 8m39s loss=2.104` every N seconds
(`GEODE_PROGRESS_EVERY`, default 30; 0 turns the lines off) and a last line on close,
instead of nothing for minutes. The returned object has the tqdm subset the callers use:
`update`, `set_postfix`, `close`, and the context-manager protocol.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

EVERY_ENV = "GEODE_PROGRESS_EVERY"
DEFAULT_EVERY = 30.0


def progress_every() -> float:
    """Seconds between plain progress lines, from $GEODE_PROGRESS_EVERY (default 30; 0 = off)."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY
    try:
        every = float(raw)
    except ValueError:
        every = -1.0
    if not every >= 0:  # also rejects nan
        raise ValueError(f"{EVERY_ENV}={raw!r}: expected a number of seconds >= 0 (0 = off)")
    return every


def _duration(seconds: float) -> str:
    """12s, 8m39s, 2h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LineProgress:
    """Counts like a tqdm bar; prints `desc: n/total unit (pct) rate eta postfix` lines."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        every: float = DEFAULT_EVERY,
        file: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.initial, self.every, self.file, self.clock = initial, every, file, clock
        self.postfix: dict[str, Any] = {}
        self.start = self.last = clock()
        self.lines = 0  # lines printed so far
        self.closed = False

    def line(self) -> str:
        """The current progress line."""
        elapsed = self.clock() - self.start
        parts = [
            f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        ]
        if self.total:
            parts.append(f"({100 * self.n / self.total:.0f}%)")
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if done > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return " ".join(parts)

    def _print(self) -> None:
        print(self.line(), file=self.file or sys.stderr, flush=True)
        self.lines += 1
        self.last = self.clock()

    def update(self, n: int = 1) -> None:
        """Count n more items; print a line when `every` seconds have passed since the last."""
        self.n += n
        if self.every > 0 and self.clock() - self.last >= self.every:
            self._print()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:  # fmt: skip
        """Values appended to the line (loss, lr, ...), as tqdm's set_postfix."""
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        """Print the final line if any line was printed (the log then shows the end)."""
        if not self.closed and self.lines:
            self._print()
        self.closed = True

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    total: int | None,
    desc: str,
    unit: str = "it",
    *,
    initial: int = 0,
    enabled: bool = True,
    file: IO[str] | None = None,
) -> Any:
    """A tqdm bar when `enabled` and `file` (stderr) is a terminal; otherwise LineProgress,
    which prints a plain line every $GEODE_PROGRESS_EVERY seconds (--no-progress, logs)."""
    out = file or sys.stderr
    every = progress_every()
    if enabled and getattr(out, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=out,
                    dynamic_ncols=True)  # fmt: skip
    return LineProgress(total, desc, unit, initial=initial, every=every, file=file)
