"""Metrics: one JSON object per line (train steps, evaluations, events) and the curves PNG.

Records carry a `kind`: "train" (one per logged step), "eval" (held-out evaluation), or
"event" (restart, SDC, checkpoint...). A step can appear twice after a rollback and replay
(the replayed record has "replay": true); `curve` keeps the last record of each step, which
is the one the surviving model state went through.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes, save_figure


class MetricsLog:
    """Append-only JSONL writer (active on the main rank only); the file is created by the
    first record, so a run that fails before its first record leaves none behind."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        self._f = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it (a kill loses at most the line being written)."""
        if not self.enabled:
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()

    def truncate_after(self, step: int) -> None:
        """Drop train/eval records of steps after `step` (a resumed run redoes them)."""
        if not self.enabled or not self.path.exists():
            return
        self.close()
        keep = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            if _keep(line, step)
        ]
        atomic_write_bytes(self.path, "".join(keep).encode("utf-8"))

    def close(self) -> None:
        """Close the file."""
        if self._f is not None:
            self._f.close()
            self._f = None


def _keep(line: str, step: int) -> bool:
    try:
        rec = json.loads(line)
    except ValueError:
        return False  # a line cut by a kill
    return rec.get("kind") == "event" or rec.get("step", 0) <= step


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file (unparseable lines skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def curve(
    records: list[dict[str, Any]], kind: str = "train", key: str = "loss"
) -> dict[int, float]:
    """{step: value} of `key` in records of `kind`, the last record of each step winning."""
    out: dict[int, float] = {}
    for rec in records:
        if rec.get("kind") == kind and key in rec:
            out[int(rec["step"])] = rec[key]
    return dict(sorted(out.items()))


def plot_curves(
    records: list[dict[str, Any]], path: str | Path, title: str = "", others: dict | None = None
) -> Path:
    """Loss (train + held-out) and learning-rate curves to a PNG; `others` adds named runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    runs = {"": records, **(others or {})}
    for name, recs in runs.items():
        label = f"{name} " if name else ""
        train = curve(recs, "train", "loss")
        if train:
            ax_loss.plot(list(train), list(train.values()), label=f"{label}train", alpha=0.7)
        ev = curve(recs, "eval", "eval_loss")
        if ev:
            ax_loss.plot(list(ev), list(ev.values()), "o-", label=f"{label}held-out")
        kl = curve(recs, "eval", "eval_kl")
        if kl:
            ax_loss.plot(
                list(kl), list(kl.values()), "s--", label=f"{label}KL(teacher sample || student)"
            )
        lr = curve(recs, "train", "lr")
        if lr and not name:
            ax_lr.plot(list(lr), list(lr.values()))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def fmt_duration(seconds: float) -> str:
    """'1h02m03s' / '2m03s' / '3.2s'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
