"""Long-context retrieval: needle in a haystack (NIAH) and multi-round coreference (MRCR).

NIAH (Kamradt 2023; the Gemini 1.5 report's text haystack): a "needle" sentence
`The special magic number for <key> is <7 digits>.` is inserted at a relative depth into a
haystack of filler text cut to a target length in tokens; the model is asked for the number.
Grid: context lengths x depths (options `lengths`, `depths`; `--samples` trials per cell with
different needles). Metric: retrieval accuracy (the first number in the output equals the
needle's), per cell and overall; a heat-map PNG of the grid. Filler: the project's own
synthetic problem texts (`geode.data.tasks`), or a UTF-8 text file given with `--data`.
Lengths are counted with the backend's tokenizer (an endpoint without one: 4 chars/token).

MRCR (Gemini 1.5 report, sec. 5.2.1; openai/mrcr): a long synthetic chat in which the user
asks for writing pieces (e.g. "Write a poem about tapirs.") and the model's turns hold them;
one (kind, topic) pair is requested several times. The final turn asks to "Prepend <random
string> to the <ordinal> <kind> about <topic>." Score: 0 unless the output starts with the
random string; otherwise difflib's SequenceMatcher ratio between output and the requested
piece (both with the prefix removed), as in openai/mrcr's grader. Option `turns` sets the
number of writing requests (default 16).
"""

from __future__ import annotations

import difflib
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ...fileio import save_figure
from ..metrics import mean_with_ci
from .base import Task, TaskError

_KEYS = [
    "Lisbon",
    "Nairobi",
    "Osaka",
    "Quito",
    "Tromso",
    "Hobart",
    "Tbilisi",
    "Cusco",
    "Dakar",
    "Bergen",
    "Hanoi",
    "Perth",
    "Tallinn",
    "Recife",
    "Zanzibar",
    "Kyoto",
    "Lima",
    "Oslo",
]
_NUM = re.compile(r"\d+")


def filler_sentences(path: str | None = None, n: int = 4000, seed: int = 0) -> list[str]:
    """Haystack sentences: from a text file, or the project's synthetic problem texts."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise TaskError(f"niah: haystack file not found: {p}")
        text = p.read_text(encoding="utf-8", errors="replace")
        sents = [s.strip() + "." for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
        sents = [s.rstrip(".") if s.endswith("..") else s for s in sents]
        if len(sents) < 10:
            raise TaskError(f"niah: haystack file {p} has fewer than 10 sentences")
        return sents
    from geode.data.tasks import make_problem

    out: list[str] = []
    i = 0
    while len(out) < n:
        q = make_problem(seed + 7919, i).question
        out += [s for s in re.split(r"(?<=[.?])\s+", q) if s and not s.endswith("?")]
        i += 1
    return out


class NeedleInHaystack(Task):
    """Retrieval accuracy over a context-length x depth grid."""

    name = "niah"
    default_max_tokens = 16
    samples_per_doc = 1  # `samples` = trials per grid cell
    primary = "accuracy"

    def _grid(self) -> tuple[list[int], list[float]]:
        o = self.config.options
        lengths = [int(x) for x in o.get("lengths", (256, 512, 1024, 2048))]
        depths = [float(x) for x in o.get("depths", (0.0, 0.25, 0.5, 0.75, 1.0))]
        ctx = getattr(getattr(self, "backend", None), "max_context", None)
        if ctx:
            lengths = [n for n in lengths if n + self.max_tokens + 8 <= ctx] or [
                ctx - self.max_tokens - 8
            ]
        if any(not 0 <= d <= 1 for d in depths):
            raise TaskError(f"niah: depths must lie in [0, 1], got {depths}")
        return lengths, depths

    def _count(self, text: str) -> int:
        b = getattr(self, "backend", None)
        return b.count_tokens(text) if b is not None else max(1, len(text) // 4)

    def load(self) -> list[dict[str, Any]]:
        """One document per (length, depth, trial), deterministic in the seed."""
        lengths, depths = self._grid()
        sents = filler_sentences(self.config.data, seed=self.config.seed)
        costs = [self._count(" " + s) for s in sents]
        docs = []
        for length in lengths:
            for depth in depths:
                for trial in range(max(1, self.config.samples)):
                    rng = random.Random(f"niah:{self.config.seed}:{length}:{depth}:{trial}")
                    key, value = rng.choice(_KEYS), str(rng.randrange(1_000_000, 10_000_000))
                    needle = f"The special magic number for {key} is {value}."
                    question = (
                        f"What is the special magic number for {key} mentioned in the text above?"
                    )
                    budget = length - self._count(needle + question) - 24
                    start = rng.randrange(len(sents))
                    hay, used, j = [], 0, start
                    while used < budget:
                        hay.append(sents[j % len(sents)])
                        used += costs[j % len(sents)]
                        j += 1
                    at = round(depth * len(hay))
                    hay.insert(at, needle)
                    docs.append(
                        {
                            "id": f"L{length}-D{depth:.2f}-T{trial}",
                            "length": length,
                            "depth": depth,
                            "key": key,
                            "gold": value,
                            "haystack": " ".join(hay),
                            "question": question,
                        }
                    )
        return docs

    def prompt(self, doc: dict[str, Any], shots: int | None = None) -> str:
        """Haystack, question, and the start of the answer sentence."""
        if self.config.chat:
            return f"{doc['haystack']}\n\n{doc['question']} Answer with the number only."
        return (
            f"{doc['haystack']}\n\nQuestion: {doc['question']}\n"
            f"Answer: The special magic number for {doc['key']} is"
        )

    def score(self, doc: dict[str, Any], output: str) -> dict[str, Any]:
        """The first number in the output equals the needle's."""
        m = _NUM.search(output)
        got = m.group(0) if m else None
        return {
            "extracted": got,
            "gold": doc["gold"],
            "correct": got == doc["gold"],
            "length": doc["length"],
            "depth": doc["depth"],
        }

    def aggregate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Overall accuracy and the grid {length: {depth: accuracy}}."""
        out = super().aggregate(samples)
        grid: dict[int, dict[float, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for s in samples:
            grid[s["length"]][s["depth"]].append(bool(s["correct"]))
        out["grid"] = {
            str(L): {f"{d:.2f}": sum(v) / len(v) for d, v in sorted(row.items())}
            for L, row in sorted(grid.items())
        }
        return out

    def plots(self, samples: list[dict], metrics: dict, out_dir: Path) -> list[Path]:
        """Heat map: depth (rows) x context length (columns), accuracy in [0, 1]."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        grid = metrics["grid"]
        lengths = list(grid)
        depths = sorted({d for row in grid.values() for d in row}, key=float)
        acc = np.array([[grid[L].get(d, np.nan) for L in lengths] for d in depths])
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title("Needle in a haystack: retrieval accuracy")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(acc[i, j]):
                    ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out_dir / "niah_heatmap.png"
        return [save_figure(fig, path)]


_KINDS = ["poem", "short story", "riddle", "essay", "limerick", "letter"]
_TOPICS = [
    "tapirs",
    "lighthouses",
    "glaciers",
    "bicycles",
    "owls",
    "volcanoes",
    "libraries",
    "teapots",
    "comets",
    "rivers",
    "bees",
    "trains",
    "lanterns",
    "deserts",
    "violins",
]
_WORDS = (
    "amber quiet silver morning river stone gentle distant hollow bright winter song "
    "meadow ember velvet tide lantern whisper copper orchard feather harbor shadow bloom "
    "crimson willow echo drift mossy golden thunder petal salt cedar hum wander"
).split()
_ORDINALS = ["1st", "2nd", "3rd", "4th", "5th"]


def _piece(rng: random.Random, kind: str, topic: str) -> str:
    lines = []
    for _ in range(rng.randint(3, 5)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 9))]
        lines.append(" ".join(words).capitalize() + f", {topic}.")
    return f"Here is a {kind} about {topic}:\n" + "\n".join(lines)


def mrcr_score(output: str, target: str, prefix: str) -> float:
    """openai/mrcr's grade: 0 without the prefix, else SequenceMatcher ratio sans prefix."""
    if not output.startswith(prefix):
        return 0.0
    return difflib.SequenceMatcher(
        None, output.removeprefix(prefix), target.removeprefix(prefix)
    ).ratio()


class MRCR(Task):
    """Multi-round coreference resolution in a long synthetic conversation."""

    name = "mrcr"
    verifiable = False
    samples_per_doc = 1
    generates_limit = True
    primary = "score"

    @property
    def max_tokens(self) -> int:
        """Long enough for one piece."""
        return self.config.max_tokens or 160

    def load(self) -> list[dict[str, Any]]:
        """`limit` (default 20) conversations, deterministic in the seed."""
        turns = int(self.config.options.get("turns", 16))
        if turns < 4:
            raise TaskError(f"mrcr: turns must be >= 4, got {turns}")
        docs = []
        for i in range(self.config.limit or 20):
            rng = random.Random(f"mrcr:{self.config.seed}:{i}")
            kind, topic = rng.choice(_KINDS), rng.choice(_TOPICS)
            repeats = rng.randint(2, min(4, turns // 2))
            asks = [(kind, topic)] * repeats
            while len(asks) < turns:
                other = (rng.choice(_KINDS), rng.choice(_TOPICS))
                if other != (kind, topic):
                    asks.append(other)
            rng.shuffle(asks)
            messages, targets = [], []
            for k, t in asks:
                messages.append({"role": "user", "content": f"Write a {k} about {t}."})
                text = _piece(rng, k, t)
                messages.append({"role": "assistant", "content": text})
                if (k, t) == (kind, topic):
                    targets.append(text)
            which = rng.randrange(repeats)
            prefix = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(10))
            messages.append(
                {
                    "role": "user",
                    "content": f"Prepend {prefix} to the {_ORDINALS[which]} (1 indexed) {kind} about "
                    f"{topic}. Do not include any other text in your response.",
                }
            )
            docs.append(
                {
                    "id": str(i),
                    "messages": messages,
                    "prefix": prefix,
                    "gold": prefix + targets[which],
                    "needles": repeats,
                    "turns": turns,
                }
            )
        return docs

    def prompt(self, doc: dict[str, Any], shots: int | None = None) -> list[dict[str, Any]]:
        """The conversation (always chat messages)."""
        return doc["messages"]

    def score(self, doc: dict[str, Any], output: str) -> dict[str, Any]:
        """openai/mrcr's SequenceMatcher grade."""
        s = mrcr_score(output.strip(), doc["gold"], doc["prefix"])
        return {
            "extracted": None,
            "gold": doc["gold"],
            "score": s,
            "correct": s >= 0.99,
            "needles": doc["needles"],
        }

    def aggregate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Mean score (bootstrap interval) and exact-retrieval rate."""
        ci = mean_with_ci([s["score"] for s in samples])
        return {
            "score": ci["mean"],
            "score_ci": [ci["ci_low"], ci["ci_high"]],
            "exact": sum(s["correct"] for s in samples) / max(1, len(samples)),
            "n": ci["n"],
        }
