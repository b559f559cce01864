"""The shapes image task: seeded generation, answers checked against what the pixels show (an
independent reader of the rendered image), the exact-match scorer, the prompt's image part,
user JSONL rows, and a full `evaluate` run whose backend answers from the image alone."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from geode.chat import render_multimodal
from geode.eval import TaskConfig, evaluate
from geode.eval.backends import Backend, Gen
from geode.eval.tasks import TASKS, TaskError, get_task
from geode.eval.tasks.shapes import COLOURS, cell_name, normalize_answer


def read_scene(image: Any, grid: int) -> list[dict[str, Any]]:
    """The shapes a reader sees in the image, per grid cell: colour (nearest palette colour)
    and kind from the filled fraction of the bounding box and where the widest row is."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    size = pixels.shape[0]
    cell = size // grid
    palette = {name: np.array(rgb) for name, rgb in COLOURS.items()}
    seen = []
    for r in range(grid):
        for c in range(grid):
            block = pixels[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
            mask = (255 - block).sum(-1) > 60
            if mask.sum() == 0:
                continue
            colour = min(palette, key=lambda k: np.abs(block[mask] - palette[k]).sum(-1).mean())
            ys, xs = np.nonzero(mask)
            box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            fill = box.mean()
            widths = box.sum(1)
            widest = int(np.argmax(widths)) / max(1, len(widths) - 1)
            if fill > 0.92:
                shape = "square"
            elif fill > 0.68:
                shape = "circle"
            else:
                shape = "triangle" if widest > 0.8 else "diamond"
            seen.append({"shape": shape, "colour": colour, "cell": [r, c]})
    return seen


def answer_from_image(image: Any, question: str, grid: int) -> str:
    """The answer a perfect reader gives, from the pixels and the question text only."""
    seen = read_scene(image, grid)
    words = question.lower().rstrip("?").split()
    if question.startswith("How many shapes"):
        return str(len(seen))
    if question.startswith("How many"):
        return str(sum(o["colour"] == words[2] for o in seen))
    if question.startswith("What colour"):
        return next(o["colour"] for o in seen if o["shape"] == words[-1])
    colour, shape = words[-2], words[-1]
    o = next(o for o in seen if (o["colour"], o["shape"]) == (colour, shape))
    return cell_name(*o["cell"], grid)


def _image(doc: dict[str, Any]) -> Any:
    return render_multimodal(get_task("shapes").prompt(doc)).images[0]


@pytest.mark.parametrize("options", [{}, {"grid": 3, "max_shapes": 5, "size": 96}])
def test_answers_are_what_the_image_shows(options) -> None:
    docs = get_task("shapes", TaskConfig(limit=80, seed=3, options=options)).load()
    grid = options.get("grid", 2)
    assert [d["type"] for d in docs[:4]] == ["count", "colour_count", "colour", "position"]
    for d in docs:
        image = _image(d)
        assert image.size == (options.get("size", 64),) * 2
        assert answer_from_image(image, d["question"], grid) == d["answer"], d
        drawn = sorted((o["cell"], o["shape"], o["colour"]) for o in d["objects"])
        assert (
            sorted((o["cell"], o["shape"], o["colour"]) for o in read_scene(image, grid)) == drawn
        )
    answers = {d["answer"] for d in docs}
    assert {"1", "2", "3", "top left", "bottom right"} <= answers  # varied, not constant
    if grid == 3:
        assert any(d["answer"] in ("center", "middle left", "top center") for d in docs)


def test_seeded_and_registered() -> None:
    assert "shapes" in TASKS
    a = get_task("shapes", TaskConfig(limit=12, seed=1)).load()
    b = get_task("shapes", TaskConfig(limit=12, seed=1)).load()
    c = get_task("shapes", TaskConfig(limit=12, seed=2)).load()
    assert a == b and [d["url"] for d in a] != [d["url"] for d in c]
    assert len({d["id"] for d in a}) == 12
    for bad, match in [
        ({"grid": 4}, "grid must be 2 or 3"),
        ({"max_shapes": 5}, "max_shapes 5 must be <= grid"),
        ({"size": 0}, "size must be a positive integer"),
    ]:
        with pytest.raises(TaskError, match=match):
            get_task("shapes", TaskConfig(limit=1, options=bad)).load()


def test_exact_match_scorer() -> None:
    task = get_task("shapes")
    doc = {"answer": "3", "type": "count"}
    for out, ok in [
        ("3", True),
        (" Three.\nbecause...", True),
        ("Answer: 3", True),
        ("**3**", True),
        ("There are 3 shapes.", False),
        ("4", False),
        ("", False),
    ]:
        assert task.score(doc, out)["correct"] is ok, out
    pos = {"answer": "top left", "type": "position"}
    assert task.score(pos, "Top-left.")["correct"] and not task.score(pos, "top right")["correct"]
    assert normalize_answer("The answer is Red!") == "red"


def test_prompt_is_an_image_part_and_the_question() -> None:
    task = get_task("shapes", TaskConfig(limit=2))
    doc = task.load()[1]
    prompt = task.prompt(doc)
    assert prompt[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    rendered = render_multimodal(prompt, mm_tokens_per_image=4)
    assert len(rendered.images) == 1
    assert rendered.text.endswith(f"{doc['question']} Answer with a number.<end_of_turn>\n<start_of_turn>model\n")  # fmt: skip


def test_user_jsonl_rows(tmp_path) -> None:
    from PIL import Image

    Image.new("RGB", (20, 20), COLOURS["red"]).save(tmp_path / "red.png")
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (20, 10), COLOURS["blue"]).save(tmp_path / "pics" / "blue.jpg")
    rows = [
        {"image": "red.png", "question": "What colour is it?", "answer": "red"},
        {"image": "pics/blue.jpg", "question": "How many images?", "answer": 1, "id": "b"},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("shapes", TaskConfig(options={"images": str(data)}))
    docs = task.load()
    assert [d["id"] for d in docs] == ["row-1", "b"] and docs[1]["answer"] == "1"
    assert docs[1]["url"].startswith("data:image/jpeg;base64,")
    image = render_multimodal(task.prompt(docs[0])).images[0]
    assert image.size == (20, 20) and image.getpixel((3, 3)) == COLOURS["red"]
    assert get_task("shapes", TaskConfig(data=str(data), limit=1)).load()[0]["id"] == "row-1"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for row, match in [
        ({"image": "missing.png", "question": "q", "answer": "a"}, "row 1: .*no such image file"),
        ({"image": "bad.png", "question": "q", "answer": "a"}, "row 1: .*not an image"),
        ({"question": "q", "answer": "a"}, r"missing field\(s\) \['image'\]"),
    ]:
        data.write_text(json.dumps(row) + "\n")
        with pytest.raises(TaskError, match=match):
            get_task("shapes", TaskConfig(options={"images": str(data)})).load()


class Reader(Backend):
    """A backend that answers from the prompt's image alone (the pixel reader above), or says
    "1" to everything."""

    name = "reader"
    max_context = 4096  # the runner fits prompts: the base estimate counts the text parts

    def __init__(self, perfect: bool):
        self.perfect = perfect

    def generate(self, requests: list[Gen], progress=None) -> list[str]:
        out = []
        for r in requests:
            if not self.perfect:
                out.append("1")
                continue
            image = render_multimodal(r.prompt).images[0]
            question = r.prompt[0]["content"][1]["text"].split("?")[0] + "?"
            out.append(answer_from_image(image, question, 2).title() + ".")
        return out


def test_evaluate_end_to_end(tmp_path) -> None:
    config = TaskConfig(limit=24, seed=5)
    perfect = evaluate(["shapes"], Reader(True), tmp_path / "a", config, progress=False)
    assert perfect["tasks"]["shapes"]["accuracy"] == 1.0
    blind = evaluate(["shapes"], Reader(False), tmp_path / "b", config, progress=False)
    metrics = blind["tasks"]["shapes"]
    assert 0 < metrics["accuracy"] < 0.6 and set(metrics["by_type"]) == set(
        ["count", "colour_count", "colour", "position"]
    )
    assert metrics["by_type"]["colour"] == 0.0
    lines = (tmp_path / "a" / "shapes" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 24 and json.loads(lines[0])["gold"] == json.loads(lines[0])["extracted"]
