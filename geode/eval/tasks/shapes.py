"""Shapes: an image task geode generates itself (rendered shapes, exact answers), so a vision-
language model can be trained and scored offline; or the user's own images and questions.

Each generated document is one Pillow image (white, `size` px square, seeded) holding 1 to
`max_shapes` filled shapes (circle, square, triangle, diamond) in six colours, each in its own cell
of a `grid` x `grid` layout, and one question with a one-word or one-number answer, the four
kinds in turn:

- count: "How many shapes are in the image?" -> "3"
- colour count: "How many red shapes are in the image?" -> "0".."max_shapes"
- colour: "What colour is the triangle?" -> "blue" (the shapes of such an image differ in kind)
- position: "Where is the blue triangle?" -> "top left" (rows top/middle/bottom, columns
  left/center/right; the middle cell of a 3 x 3 grid is "center")

The prompt is one user message: the image as an OpenAI `image_url` part (a PNG data: URL, so the
same prompt goes to the engine and to an endpoint) and the question. Scoring is exact match of
the answer's first line, lower-cased, trimmed of punctuation and a leading "answer:", hyphens as
spaces, number words as digits.

Options (`TaskConfig.options`): size (64), grid (2 or 3; 2), max_shapes (3, at most grid^2),
images: a JSONL file of the user's own rows {"image": path (relative to the file), "question",
"answer", "id"?} scored the same way (`--data` is read the same way).
"""

from __future__ import annotations

import base64
import io
import mimetypes
import random
import re
from pathlib import Path
from typing import Any

from .base import Task, TaskError, read_jsonl

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
QUESTION_KINDS = ("count", "colour_count", "colour", "position")
INSTRUCTIONS = {
    "count": "Answer with a number.",
    "colour_count": "Answer with a number.",
    "colour": "Answer with one word.",
    "position": "Answer with the position only, e.g. top left.",
}
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def cell_name(row: int, col: int, grid: int) -> str:
    """A grid cell's position words: "top left", ..., "center" for a 3 x 3 grid's middle."""
    rows = ("top", "bottom") if grid == 2 else ("top", "middle", "bottom")
    cols = ("left", "right") if grid == 2 else ("left", "center", "right")
    return (
        "center" if (rows[row], cols[col]) == ("middle", "center") else f"{rows[row]} {cols[col]}"
    )


def normalize_answer(text: str) -> str:
    """The comparable form of an answer: its first non-empty line, lower case, no leading
    "answer:", hyphens/underscores as spaces, no surrounding punctuation, numbers as digits."""
    line = next((ln for ln in str(text).splitlines() if ln.strip()), "")
    line = line.strip().lower()
    line = re.sub(r"^(the\s+)?answer\s*(is|:)\s*", "", line)
    line = re.sub(r"[-_\s]+", " ", line).strip(" .,!?;:'\"`*()")
    if line in _NUMBER_WORDS:
        return str(_NUMBER_WORDS.index(line))
    return line


def render_scene(objects: list[dict[str, Any]], size: int, grid: int) -> Any:
    """The PIL image of `objects` ({"shape", "colour", "cell": [row, col], "box": [x0, y0, x1,
    y1]}): filled shapes on white, no anti-aliasing."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        fill = COLOURS[o["colour"]]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if o["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return image


def make_scene(rng: random.Random, kind: str, size: int, grid: int, max_shapes: int) -> dict:
    """One document's objects, question and answer for a question kind."""
    cell = size / grid
    n = rng.randint(1, max_shapes)
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], n)
    if kind in ("colour", "position"):  # the asked-about shape is the only one of its kind
        n = min(n, len(SHAPES))
        shapes = rng.sample(SHAPES, n)
    else:
        shapes = [rng.choice(SHAPES) for _ in range(n)]
    objects = []
    for (r, c), shape in zip(cells[:n], shapes, strict=True):
        side = round(cell * rng.uniform(0.5, 0.75))
        x0 = round(c * cell + rng.uniform(0.1 * cell, cell - side - 0.1 * cell))
        y0 = round(r * cell + rng.uniform(0.1 * cell, cell - side - 0.1 * cell))
        box = [x0, y0, x0 + side - 1, y0 + side - 1]
        objects.append(
            {"shape": shape, "colour": rng.choice(list(COLOURS)), "cell": [r, c], "box": box}
        )
    target = rng.choice(objects)
    if kind == "count":
        question, answer = "How many shapes are in the image?", str(n)
    elif kind == "colour_count":
        colour = rng.choice(list(COLOURS)) if rng.random() < 0.3 else target["colour"]
        question = f"How many {colour} shapes are in the image?"
        answer = str(sum(o["colour"] == colour for o in objects))
    elif kind == "colour":
        question, answer = f"What colour is the {target['shape']}?", target["colour"]
    else:
        question = f"Where is the {target['colour']} {target['shape']}?"
        answer = cell_name(*target["cell"], grid)
    return {"objects": objects, "question": question, "answer": answer, "type": kind}


def image_data_url(data: bytes, mime: str = "image/png") -> str:
    """A base64 data: URL of image bytes."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Shapes(Task):
    """Count, colour and position questions about generated shape images (or user images)."""

    name = "shapes"
    default_max_tokens = 16
    generates_limit = True

    def _option(self, key: str, default: int) -> int:
        value = self.config.options.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TaskError(f"shapes: option {key} must be a positive integer, got {value!r}")
        return value

    @property
    def user_file(self) -> str | None:
        """The user's JSONL of image questions (`images` option or `--data`), if any."""
        return self.config.options.get("images") or self.config.data

    def load(self) -> list[dict[str, Any]]:
        """`limit` (default 200) generated documents of the seed, or the user's rows."""
        if self.user_file:
            return self._load_user(Path(self.user_file))
        size, grid = self._option("size", 64), self._option("grid", 2)
        max_shapes = self._option("max_shapes", 3)
        if grid not in (2, 3):
            raise TaskError(f"shapes: option grid must be 2 or 3, got {grid}")
        if max_shapes > grid * grid or size < 8 * grid:
            raise TaskError(
                f"shapes: max_shapes {max_shapes} must be <= grid^2 = {grid * grid} and size "
                f"{size} >= 8 x grid"
            )
        docs = []
        for i in range(self.config.limit or 200):
            rng = random.Random(self.config.seed * 1_000_003 + i)
            scene = make_scene(rng, QUESTION_KINDS[i % 4], size, grid, max_shapes)
            png = _png(render_scene(scene["objects"], size, grid))
            docs.append(
                {"id": f"shapes-{self.config.seed}-{i}", **scene, "url": image_data_url(png)}
            )
        return docs

    def _load_user(self, path: Path) -> list[dict[str, Any]]:
        from geode.image import ImageError, load_image

        rows = read_jsonl(path, ("image", "question", "answer"), "shapes", {"image": str, "question": str, "answer": (str, int)})  # fmt: skip
        docs = []
        for k, row in enumerate(rows[: self.config.limit or None]):
            file = path.parent / row["image"]
            try:
                load_image(file)  # a clear error now, not at generation time
            except ImageError as e:
                raise TaskError(f"shapes: {path}: row {k + 1}: {e}") from None
            mime = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
            docs.append(
                {
                    "id": str(row.get("id", f"row-{k + 1}")),
                    "question": row["question"],
                    "answer": str(row["answer"]),
                    "type": str(row.get("type", "user")),
                    "url": image_data_url(file.read_bytes(), mime),
                }
            )
        return docs

    def prompt(self, doc: dict[str, Any], shots: int | None = None) -> list[dict[str, Any]]:
        """One user message: the image, then the question and the answer format."""
        hint = INSTRUCTIONS.get(doc["type"], "Answer briefly.")
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": doc["url"]}},
                    {"type": "text", "text": f"{doc['question']} {hint}"},
                ],
            }
        ]

    def score(self, doc: dict[str, Any], output: str) -> dict[str, Any]:
        """Exact match of the normalised answer."""
        got = normalize_answer(output)
        gold = normalize_answer(doc["answer"])
        return {"extracted": got, "gold": gold, "type": doc["type"], "correct": got == gold}

    def aggregate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Accuracy overall and per question kind."""
        out = super().aggregate(samples)
        kinds = sorted({s["type"] for s in samples})
        out["by_type"] = {
            k: super(Shapes, self).aggregate([s for s in samples if s["type"] == k])["accuracy"]
            for k in kinds
        }
        return out

    def describe(self) -> dict[str, Any]:
        """The base description plus the generator's options."""
        return {**super().describe(), "options": dict(sorted(self.config.options.items()))}
