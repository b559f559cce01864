"""Supervised fine-tuning: chat JSONL -> packed rows trained on the assistant's tokens only.

Each JSONL line is one conversation in geode.chat's shape: `{"messages": [...], "tools":
[...]}` (system / user / assistant / tool messages; assistant `thinking` and `tool_calls`
included). `geode.chat.render_parts` cuts the one chat format into labelled spans; each span
is tokenized on its own (the prompt/response boundary is then the one the engine sees at
inference: the prompt ends with `<start_of_turn>model\\n`, the model writes the rest) and
a token is trained when it belongs to an assistant span (and, with `tool_calls = true`, to
one of the assistant's tool calls):

    loss = sum_t [trained(y_t) and same document(t, t+1)] * -log p(y_t)   / trained targets

Whole conversations are packed into rows of T+1 tokens by best-fit decreasing (a
conversation is never cut across rows; longer ones are truncated and counted); each gets its
own segment id, so attention stays inside it (the model's segment masking), and positions
restart at 0. The rest of a row is padding with a segment of its own and no loss.

Image parts (a VLM from `model.init`): each becomes Gemma 3's image sequence
(`geode.image.image_parts`: `<start_of_image>`, mm_tokens_per_image soft-token placeholders,
`<end_of_image>`), never trained; the images' pixel values travel with their row
(`Batch.pixel_values`, `Batch.image_rows`). Files are read relative to the JSONL's folder.
The vision tower is frozen unless `[objective.options] train_vision = true` (the Gemma 3
Technical Report, section 2.1, keeps it frozen); the projector is always trained.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import DataError
from ..data.loader import Batch
from ..recipe import RecipeError

SPLITS = ("train", "heldout")


@dataclass
class SFTOptions:
    """`[objective.options]` of kind "sft"."""

    tool_calls: bool = False  # also train on the assistant's tool calls (always on its text)
    train_vision: bool = False  # also train a VLM's SigLIP tower (the projector always trains)


@dataclass
class Encoded:
    """One tokenized conversation: ids and which of them are trained (both length L)."""

    ids: list[int]
    trained: list[bool]
    pixels: np.ndarray | None = None  # (N, 3, S, S) float32 images of the placeholders, in order
    image_token: int = -1  # the placeholder id (a VLM's image_token_index)


@dataclass
class PackStats:
    """What packing did: conversations, rows, truncations, padding share."""

    conversations: int = 0
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train on after truncation
    trained_tokens: int = 0
    padding: float = 0.0
    notes: list[str] = field(default_factory=list)


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Conversations of a chat JSONL file; a bad line is a DataError naming file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the SFT data ({e.strerror or e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
            raise DataError(f"{path}:{n}: expected an object with a 'messages' list")
        out.append({**obj, "_where": f"{path}:{n}"})
    if not out:
        raise DataError(f"{path}: no conversations")
    return out


def has_images(conv: dict[str, Any]) -> bool:
    """True when a message of `conv` has an image part."""
    from ..chat import IMAGE_PART_TYPES

    return any(
        isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES
        for m in conv["messages"]
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
    )


def encode_conversation(tokenizer: Any, conv: dict[str, Any], tool_calls: bool = False,
                        vision: Any = None, image_dir: str | Path | None = None) -> Encoded:  # fmt: skip
    """Token ids of the rendered conversation and the trained flag of each token.

    With image parts, `vision` (the model's VisionConfig) sets the soft-token count, id and
    image size; images are read by `geode.chat.render_multimodal` (files inside `image_dir`).
    """
    from ..chat import ChatFormatError, render_parts

    where = conv.get("_where", "conversation")
    try:
        parts = render_parts(conv["messages"], tools=conv.get("tools"))
    except ChatFormatError as e:
        raise DataError(f"{where}: {e}") from None
    if has_images(conv):
        return _encode_with_images(tokenizer, conv, parts, tool_calls, vision, image_dir, where)
    kinds = ("assistant", "tool_call") if tool_calls else ("assistant",)
    if not any(kind == "assistant" or kind == "tool_call" for kind, _ in parts):
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to train on)")
    ids: list[int] = []
    trained: list[bool] = []
    for kind, text in parts:
        piece = tokenizer.encode(text)
        ids += piece
        trained += [kind in kinds] * len(piece)
    if not any(trained):
        raise DataError(f"{where}: no trained tokens (assistant turns are empty or only tool "
                        "calls; set [objective.options] tool_calls = true to train on those)")  # fmt: skip
    return Encoded(ids, trained)


def _encode_with_images(tokenizer: Any, conv: dict[str, Any], spans: list[tuple[str, str]],
                        tool_calls: bool, vision: Any, image_dir: str | Path | None,
                        where: str) -> Encoded:  # fmt: skip
    """`encode_conversation` of a conversation with images: each span's `<start_of_image>`
    markers expanded as `render_multimodal` expands them (checked equal to its text)."""
    from ..chat import ChatFormatError, render_multimodal
    from ..image import BOI_TOKEN, ImageError, image_parts, merge_parts, parts_text

    if vision is None:
        raise DataError(f"{where}: image parts need a model with a vision tower (model.init "
                        "of a multimodal checkpoint)")  # fmt: skip
    mm = vision.mm_tokens_per_image
    try:
        prompt = render_multimodal(conv["messages"], add_generation_prompt=False,
                                   tools=conv.get("tools"), mm_tokens_per_image=mm,
                                   image_dir=image_dir)  # fmt: skip
        pixels = prompt.process(vision.image_size).pixel_values  # (N, 3, S, S)
    except (ChatFormatError, ImageError) as e:
        raise DataError(f"{where}: {e}") from None
    kinds = ("assistant", "tool_call") if tool_calls else ("assistant",)
    ids: list[int] = []
    trained: list[bool] = []
    text = ""
    for kind, span in spans:
        pieces = span.split(BOI_TOKEN)
        seq: list[str | int] = [pieces[0]]
        for rest in pieces[1:]:
            seq += [*image_parts(mm), rest]
        seq = merge_parts(seq)
        text += parts_text(seq)
        piece = tokenizer.encode_with_images(seq, image_token_index=vision.image_token_index)
        ids += piece
        trained += [kind in kinds and t != vision.image_token_index for t in piece]
    if text != prompt.text:  # a <start_of_image> typed in a message's text
        raise DataError(f"{where}: '{BOI_TOKEN}' typed in a message's text cannot be told from an "
                        "image part; remove it")  # fmt: skip
    if not any(trained):
        raise DataError(f"{where}: no trained tokens (assistant turns are empty)")
    return Encoded(ids, trained, np.asarray(pixels, np.float32), vision.image_token_index)


def _truncate(d: Encoded, row_len: int) -> tuple[list[int], list[bool], np.ndarray | None]:
    """ids, trained and pixels of `d` cut to `row_len` tokens, never inside an image."""
    ids, tr, px = d.ids[:row_len], d.trained[:row_len], d.pixels
    if px is None:
        return ids, tr, None
    at = np.flatnonzero(np.asarray(d.ids) == d.image_token)  # (N * mm,) placeholder positions
    mm = len(at) // len(px)
    whole = int(np.sum(at[mm - 1 :: mm] < row_len))  # images entirely inside the row
    if whole < len(px) and at[whole * mm] < row_len:  # an image cut in two: drop all of it
        cut = int(at[whole * mm])
        ids, tr = ids[:cut], tr[:cut]
    return ids, tr, px[:whole]


def pack(docs: list[Encoded], row_len: int, pad_id: int) -> tuple[dict[str, np.ndarray], PackStats]:
    """Best-fit-decreasing packing of whole conversations into rows of `row_len` tokens.

    Returns tokens, positions, segment_ids (R, row_len) int64 and trained (R, row_len) bool;
    with images also pixel_values (N, 3, S, S) float32 and image_rows (N,) int64, row-major.
    """
    st = PackStats(conversations=len(docs))
    items = []
    images: list[np.ndarray | None] = []
    for d in docs:
        ids, tr, px = d.ids, d.trained, d.pixels
        if len(ids) > row_len:
            st.truncated += 1
            ids, tr, px = _truncate(d, row_len)
        if not any(tr[1:]):  # token 0 of a row is never a target
            st.dropped += 1
            continue
        items.append((ids, tr))
        images.append(px)
    if not items:
        raise DataError("no conversation has a trained token within the row length "
                        f"data.seq_len + 1 = {row_len}")  # fmt: skip
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][0]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row) sorted: best fit = first with room >= L
    for i in order:
        n = len(items[i][0])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = row_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    R = len(rows)
    tokens = np.full((R, row_len), pad_id, np.int64)
    positions = np.zeros((R, row_len), np.int64)
    segments = np.zeros((R, row_len), np.int64)
    trained = np.zeros((R, row_len), bool)
    pixels: list[np.ndarray] = []
    image_rows: list[int] = []
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            ids, tr = items[i]
            n = len(ids)
            tokens[r, at : at + n] = ids
            positions[r, at : at + n] = np.arange(n)
            segments[r, at : at + n] = s
            trained[r, at : at + n] = tr
            at += n
            if images[i] is not None and len(images[i]):
                pixels.append(images[i])
                image_rows += [r] * len(images[i])
        segments[r, at:] = len(members)  # padding: a segment of its own
        positions[r, at:] = np.arange(row_len - at)
    st.rows = R
    st.padding = float((tokens.size - sum(len(x[0]) for x in items)) / tokens.size)
    st.trained_tokens = int(loss_mask_of(segments, trained).sum())
    arrays = {"tokens": tokens, "positions": positions, "segment_ids": segments, "trained": trained}
    if pixels:
        arrays["pixel_values"] = np.concatenate(pixels)  # (N, 3, S, S)
        arrays["image_rows"] = np.asarray(image_rows, np.int64)  # (N,) ascending
    return arrays, st


def loss_mask_of(segments: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """(R, T) bool: target t (token t+1) is trained and in the same conversation as token t."""
    return trained[:, 1:] & (segments[:, 1:] == segments[:, :-1])


def rows_to_batch(arrays: dict[str, np.ndarray], index: np.ndarray) -> Batch:
    """The rows `index` of packed arrays as a Batch with its explicit loss_mask (and the rows'
    images, row-major)."""
    t = {k: torch.from_numpy(arrays[k][index]) for k in ("tokens", "positions", "segment_ids")}
    batch = Batch(
        t["tokens"], t["positions"], t["segment_ids"], torch.zeros(len(index), dtype=torch.int64),
        torch.from_numpy(np.asarray(index, np.int64)),
        loss_mask=torch.from_numpy(loss_mask_of(arrays["segment_ids"][index],
                                                arrays["trained"][index])),
    )  # fmt: skip
    if "pixel_values" in arrays:
        rows = arrays["image_rows"]
        spans = [np.arange(*np.searchsorted(rows, [r, r + 1])) for r in index]  # images per row
        which = np.concatenate(spans)
        if len(which):
            batch.pixel_values = torch.from_numpy(arrays["pixel_values"][which])
            batch.image_rows = torch.from_numpy(
                np.repeat(np.arange(len(index)), [len(s) for s in spans])
            )
    return batch


class PackedRows:
    """A BatchSource over packed rows: a fresh seeded permutation per epoch, rank-sharded.

    The k-th row served (over all epochs, all ranks) is perm_e[k mod R], e = k // R; global
    batch `step` is rows [step*G, (step+1)*G) of that sequence and rank r keeps its slice,
    so the state is one integer and a resume on any world size replays the same rows.
    """

    def __init__(self, arrays: dict[str, np.ndarray], rows_per_rank: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):  # fmt: skip
        self.arrays, self.B, self.seed = arrays, rows_per_rank, seed
        self.rank, self.world = rank, world_size
        self.R = len(arrays["tokens"])
        self.step = 0
        self._perm: dict[int, np.ndarray] = {}

    def _row(self, k: int) -> int:
        epoch, i = divmod(k, self.R)
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.R)}
        return int(self._perm[epoch][i])

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch."""
        G = self.B * self.world
        first = self.step * G + self.rank * self.B
        self.step += 1
        return rows_to_batch(self.arrays, np.array([self._row(first + j) for j in range(self.B)]))

    def state_dict(self) -> dict[str, Any]:
        """The position (a step count) and what it refers to."""
        return {"step": self.step, "rows": self.R, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; the packed rows and seed must be the same as when the state was saved."""
        if (state.get("rows"), state.get("seed")) != (self.R, self.seed):
            raise DataError(
                f"SFT loader state was saved for {state.get('rows')} rows / seed "
                f"{state.get('seed')}, this data packs into {self.R} rows / seed {self.seed}"
            )
        self.step = int(state["step"])


def eval_batches(arrays: dict[str, np.ndarray], rows: int, batches: int, rank: int = 0,
                 world_size: int = 1) -> list[Batch]:  # fmt: skip
    """The first `batches` * `rows` held-out rows in order (this rank's share of each batch)."""
    R, per = len(arrays["tokens"]), rows // world_size
    out = []
    for b in range(batches):
        idx = np.arange(b * rows + rank * per, b * rows + (rank + 1) * per) % R
        out.append(rows_to_batch(arrays, idx))
        if (b + 1) * rows >= R:
            break
    return out


def tokenizer_path(recipe: Any) -> Path:
    """data.tokenizer, else model.init's tokenizer file (tokenizer.model, else tokenizer.json);
    a RecipeError naming what is missing."""
    from ..tokenizer import find_tokenizer

    if recipe.data.tokenizer:
        path = Path(recipe.data.tokenizer)
    elif recipe.model.init:
        path = find_tokenizer(recipe.model.init)
        if path is None:
            raise RecipeError(
                f"model.init {recipe.model.init} holds no tokenizer.model or tokenizer.json "
                "(set data.tokenizer)"
            )
    else:
        raise RecipeError(
            "a tokenizer is needed: set data.tokenizer (a tokenizer.model / tokenizer.json) "
            "or model.init to a checkpoint directory holding one"
        )
    if not path.is_file():
        raise RecipeError(f"tokenizer {path} not found (set data.tokenizer)")
    return path


def prepare(recipe: Any, rank: int = 0, world_size: int = 1, micro: int = 0, accum: int = 1):
    """TrainData for an SFT recipe: packed training rows and held-out batches."""
    from ..checkpoint import read_vision_config
    from ..fileio import sha256_file
    from ..tokenizer import load_tokenizer
    from .batches import TrainData
    from .objectives.base import objective_class, parse_options

    tok_file = tokenizer_path(recipe)
    tok = load_tokenizer(tok_file)
    opts = parse_options(objective_class("sft"), recipe.objective.options)
    row_len = recipe.data.seq_len + 1
    vision = read_vision_config(recipe.model.init) if recipe.model.init else None

    def packed(path: str) -> dict[str, np.ndarray]:
        docs = [
            encode_conversation(tok, c, opts.tool_calls, vision, Path(path).parent)
            for c in read_conversations(path)
        ]
        arrays, st = pack(docs, row_len, tok.pad_id)
        if rank == 0:
            print(
                f"geode sft: {path}: {st.conversations} conversations -> {st.rows} rows of "
                f"{row_len} tokens ({st.padding:.0%} padding, {st.trained_tokens:,} trained "
                f"targets, {st.truncated} truncated, {st.dropped} dropped)",
                flush=True,
            )
        return arrays

    train = packed(recipe.data.path)
    rows_per_rank = recipe.batch.global_batch_size // world_size
    evals = None
    if recipe.data.eval_path:
        held = packed(recipe.data.eval_path)
        rows = recipe.eval.batch_size or recipe.batch.global_batch_size
        evals = eval_batches(held, rows, recipe.eval.batches, rank, world_size)
    return TrainData(
        batches=PackedRows(train, rows_per_rank, recipe.data.seed, rank, world_size),
        eval_batches=(lambda: evals) if evals else None,
        vocab_size=tok.vocab_size,
        tokenizer=str(tok_file),
        tokenizer_sha256=sha256_file(tok_file),
        describe=str(recipe.data.path),
    )


def sft(recipe: Any, out: str | Path | None = None, resume: bool = False,
        progress: bool | None = None) -> dict[str, Any]:  # fmt: skip
    """Fine-tune on chat JSONL (`data.path`, held-out `data.eval_path`); returns the summary.

    Full fine-tuning, or LoRA adapters when the recipe has [lora] (OUT/adapter in peft's
    layout, the merged model in OUT/model).
    """
    import dataclasses

    from .distributed import init_distributed
    from .loop import Trainer

    if recipe.objective.kind not in ("", "sft"):
        raise RecipeError(f"geode sft needs objective.kind = 'sft', got {recipe.objective.kind!r}")
    recipe = dataclasses.replace(
        recipe, objective=dataclasses.replace(recipe.objective, kind="sft")
    )
    info = init_distributed(recipe.train.device)
    data = prepare(recipe, info.rank, info.world_size)
    return Trainer(recipe, out, resume, progress, data=data).fit()


# ------------------------------------------------------------------ generated data
def task_conversations(n: int, split: str, seed: int = 0) -> list[dict[str, Any]]:
    """Chat-formatted problems of the synthetic task family (geode.data.tasks): the question
    as the user turn, the worked solution ending in `#### N` as the assistant turn."""
    from ..data.tasks import generate

    return [
        {
            "messages": [
                {"role": "user", "content": p.question},
                {"role": "assistant", "content": p.solution},
            ],
            "answer": p.answer,
            "uid": p.uid,
        }
        for p in generate(n, seed=seed, split=split)
    ]


SHAPES_SEED = 1000  # training scenes' seed offset: `geode eval shapes` (seed 0) never sees them


def shapes_conversations(n: int, split: str, seed: int = 0, **options: int) -> list[dict[str, Any]]:
    """Image SFT conversations of the `shapes` eval task (geode.eval.tasks.shapes): its prompt
    (the PNG as an image_url part, the question) and the exact answer as the assistant turn.
    Scenes come from seeds SHAPES_SEED + 2 * seed (+1 for "heldout"), apart from the eval's."""
    from ..eval.tasks.base import TaskConfig
    from ..eval.tasks.shapes import Shapes

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    task_seed = SHAPES_SEED + 2 * seed + SPLITS.index(split)
    task = Shapes(TaskConfig(limit=n, seed=task_seed, options=dict(options)))
    return [
        {
            "messages": [*task.prompt(d), {"role": "assistant", "content": d["answer"]}],
            "answer": d["answer"],
            "uid": d["id"],
        }
        for d in task.load()
    ]


def write_task_data(out_dir: str | Path, n_train: int = 2000, n_heldout: int = 200,
                    seed: int = 0, task: str = "tasks", **options: int) -> dict[str, Path]:  # fmt: skip
    """OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl of `task_conversations` (task "tasks") or
    `shapes_conversations` (task "shapes", its `options`: size, grid, max_shapes), atomic."""
    from ..fileio import atomic_write_bytes

    make = {"tasks": task_conversations, "shapes": shapes_conversations}
    if task not in make:
        raise ValueError(f"task must be one of {sorted(make)}, got {task!r}")
    out = Path(out_dir)
    paths = {}
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        convs = make[task](n, split, seed, **options)
        lines = [json.dumps(c, ensure_ascii=False) for c in convs]
        paths[split] = out / f"{split}.jsonl"
        atomic_write_bytes(paths[split], ("\n".join(lines) + "\n").encode())
    return paths
