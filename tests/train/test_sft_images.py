"""Image SFT and multimodal distillation (issue #18 item 6): a tiny VLM's image-SFT loss equals
transformers' Gemma3ForConditionalGeneration loss on the same rows, the vision tower is frozen
or trained by the recipe flag, images follow their rows through micro-batches and truncation,
and distillation of a VLM pair on text batches equals the text-only path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import geode
from geode.chat import render
from geode.data import DataError
from geode.data.loader import Batch
from geode.model.vision import get_vision_preset
from geode.train import load_train_recipe
from geode.train import sft as S
from geode.train.loop import Trainer
from tests.train.helpers import synthetic_dataset, tiny_recipe

SHAPES = {"size": 32, "grid": 2, "max_shapes": 2}


def _tiny_shape(vocab: int) -> dict:
    return dict(tiny_recipe(Path("x"))["model"]["overrides"], vocab_size=vocab)


def _vlm(vocab: int, ids: tuple[int, int, int], seed: int) -> torch.nn.Module:
    """A random tiny Gemma 3 text model with the nano SigLIP tower (16 soft tokens > window 16)."""
    image, boi, eoi = ids
    vision = get_vision_preset("nano-vision").replace(
        image_token_index=image, boi_token_index=boi, eoi_token_index=eoi
    )
    cfg = geode.get_preset("nano-1m").replace(**_tiny_shape(vocab))
    return geode.build_model(cfg, seed=seed, vision=vision)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer trained on shapes chat text, a random tiny VLM saved with it, shapes data."""
    from geode.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sft-images")
    convs = S.shapes_conversations(200, "train", seed=3, **SHAPES)
    tok = train_tokenizer(
        texts=[render(c["messages"]) for c in convs], vocab_size=400, out=root / "tokenizer.model"
    )
    sp = tok.special_ids
    ids = (sp["<image_soft_token>"], sp["<start_of_image>"], sp["<end_of_image>"])
    geode.save_model(_vlm(tok.vocab_size, ids, 0), root / "vlm",
                     files={"tokenizer.model": root / "tokenizer.model"})  # fmt: skip
    paths = S.write_task_data(root / "data", 8, 4, task="shapes", **SHAPES)
    return {"root": root, "vlm": root / "vlm", "tok": root / "tokenizer.model", **paths}


def _recipe(env, **sections) -> dict:
    r = tiny_recipe(
        env["train"],
        model={"init": str(env["vlm"]), "overrides": {}},
        data={"path": str(env["train"]), "seq_len": 64},
        objective={"kind": "sft"},
        batch={"global_batch_size": 4, "micro_batch_size": 2},
        optim={"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0},
        train={"max_steps": 1},
    )
    for name, values in sections.items():
        r[name] = {**r.get(name, {}), **values} if isinstance(values, dict) else values
    return r


def _trainer(env, tmp_path, **sections) -> Trainer:
    recipe = load_train_recipe(_recipe(env, **sections))
    return Trainer(recipe, out=tmp_path / "run", data=S.prepare(recipe))


def test_image_sft_loss_equals_transformers(env, tmp_path):
    """The SFT objective's loss on packed rows with images equals Gemma3ForConditionalGeneration
    (loaded from the same directory) with labels on the assistant tokens; the placeholders and
    their pixels come from the shapes conversations, one image per row."""
    from transformers import Gemma3ForConditionalGeneration

    trainer = _trainer(env, tmp_path)
    batch = trainer.loader.next_batch()
    vision = trainer.raw_model.vision
    image = vision.image_token_index
    assert batch.pixel_values is not None and batch.pixel_values.shape == (len(batch), 3, 32, 32)
    assert batch.image_rows.tolist() == list(range(len(batch)))  # one conversation per row
    assert ((batch.tokens == image).sum(1) == vision.mm_tokens_per_image).all()
    assert not (batch.loss_mask & (batch.targets == image)).any()  # soft tokens never trained
    total, n, _ = trainer.objective.loss_sum(trainer.model, batch)
    ref = Gemma3ForConditionalGeneration.from_pretrained(env["vlm"], attn_implementation="eager")
    real = batch.segment_ids == 0  # (B, T+1) the conversation; the rest is padding
    labels = torch.where(torch.cat([real[:, :1], batch.loss_mask], 1), batch.tokens, -100)
    labels[:, 0] = -100
    with torch.no_grad():
        out = ref(input_ids=batch.tokens, attention_mask=real.long(), labels=labels,
                  pixel_values=batch.pixel_values, token_type_ids=(batch.tokens == image).long())  # fmt: skip
    torch.testing.assert_close(total.detach() / n, out.loss, rtol=1e-5, atol=1e-5)
    assert n == batch.loss_mask.sum() > 0


@pytest.mark.parametrize("train_vision", [False, True])
def test_vision_tower_frozen_or_trained(env, tmp_path, train_vision):
    """`train_vision = false` (default) keeps every tower weight after a step (the projector and
    the decoder move); `true` changes the tower too."""
    trainer = _trainer(env, tmp_path, objective={"kind": "sft", "options": {"train_vision": train_vision}})  # fmt: skip
    model = trainer.raw_model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.train_step()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    tower = {k for k in before if k.startswith("vision_tower.")}
    assert any(k.startswith("multi_modal_projector.") for k in moved)
    assert any(k.startswith("layers.") for k in moved)
    assert (tower <= moved) if train_vision else not (tower & moved)
    assert all(p.requires_grad == train_vision for p in model.vision_tower.parameters())


def test_images_follow_their_rows_through_micro_batches_and_truncation(env):
    """Batch.rows keeps each row's images in row-major order; a conversation cut inside an
    image loses that whole image (ids and pixels), never half of it."""
    px = torch.arange(4.0)[:, None, None, None].expand(4, 3, 2, 2)  # image k has value k
    b = Batch(torch.zeros(3, 5, dtype=torch.int64), torch.zeros(3, 5, dtype=torch.int64),
              torch.zeros(3, 5, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
              torch.zeros(3, dtype=torch.int64), pixel_values=px,
              image_rows=torch.tensor([0, 2, 2, 2]))  # fmt: skip
    sub = b.rows(slice(1, 3))
    assert sub.image_rows.tolist() == [1, 1, 1] and sub.pixel_values[:, 0, 0, 0].tolist() == [
        1,
        2,
        3,
    ]
    picked = b.rows(torch.tensor([2, 0]))
    assert picked.image_rows.tolist() == [0, 0, 0, 1]
    assert picked.pixel_values[:, 0, 0, 0].tolist() == [1, 2, 3, 0]
    assert b.rows(slice(1, 2)).pixel_values is None
    assert "pixel_values" in picked.model_inputs()

    tok = geode.load_tokenizer(env["tok"])
    vision = geode.load_model(env["vlm"]).vision
    two = S.shapes_conversations(2, "train", **SHAPES)
    conv = {"messages": [*two[0]["messages"][:1], {"role": "assistant", "content": "ok"},
                         *two[1]["messages"]]}  # fmt: skip
    enc = S.encode_conversation(tok, conv, vision=vision)
    at = np.flatnonzero(np.asarray(enc.ids) == vision.image_token_index)
    assert len(at) == 32 and enc.pixels.shape == (2, 3, 32, 32)
    cut = int(at[20]) + 1  # inside the second image
    arrays, st = S.pack([enc], cut, tok.pad_id)
    assert st.truncated == 1 and arrays["pixel_values"].shape == (1, 3, 32, 32)
    assert (arrays["tokens"] == vision.image_token_index).sum() == 16
    assert (arrays["tokens"][0, int(at[16]) :] == tok.pad_id).all()


def test_image_conversation_errors_are_named(env):
    """Images for a text model, a typed <start_of_image>, a bad data: URL: DataErrors naming
    the conversation."""
    tok = geode.load_tokenizer(env["tok"])
    vision = geode.load_model(env["vlm"]).vision
    conv = {**S.shapes_conversations(1, "train", **SHAPES)[0], "_where": "f.jsonl:3"}
    with pytest.raises(DataError, match=r"f.jsonl:3: image parts need a model with a vision"):
        S.encode_conversation(tok, conv)
    typed = {
        "messages": [*conv["messages"][:-1], {"role": "assistant", "content": "<start_of_image>"}]
    }
    with pytest.raises(DataError, match="typed in a message's text"):
        S.encode_conversation(tok, typed, vision=vision)
    bad = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                        {"role": "assistant", "content": "1"}], "_where": "g.jsonl:1"}  # fmt: skip
    with pytest.raises(DataError, match=r"g.jsonl:1: .*message 0, part 0"):
        S.encode_conversation(tok, bad, vision=vision)


def test_distilling_a_vlm_pair_matches_the_text_path(tmp_path):
    """An online VLM teacher/student pair on packed text batches gives the same distillation
    loss, metrics and updated decoder as the same weights loaded text-only (`vision=False`);
    a batch carrying images goes through both towers (other pixels, other loss)."""
    data = synthetic_dataset(tmp_path / "data")  # vocab 64
    ids = (61, 62, 63)  # image, boi, eoi inside the vocabulary
    for name, seed in (("teacher", 1), ("student", 2)):
        geode.save_model(_vlm(64, ids, seed), tmp_path / name)
        text = geode.load_model(tmp_path / name, vision=False)
        assert getattr(text, "vision_tower", None) is None
        geode.save_model(text, tmp_path / f"{name}-text")

    def trainer(suffix: str) -> Trainer:
        recipe = tiny_recipe(
            data,
            model={"init": str(tmp_path / f"student{suffix}"), "overrides": {}},
            distill={"teacher": str(tmp_path / f"teacher{suffix}"), "top_k": 8},
            train={"max_steps": 1},
            optim={"lr": 1e-2, "warmup_steps": 0},
        )
        return Trainer(load_train_recipe(recipe), out=tmp_path / f"run{suffix}")

    vlm, txt = trainer(""), trainer("-text")
    assert vlm.objective.teacher.model.vision is not None
    batch = vlm.loader.next_batch()
    assert torch.equal(batch.tokens, txt.loader.next_batch().tokens)
    a, na, ma = vlm.objective.loss_sum(vlm.model, batch)
    b, nb, mb = txt.objective.loss_sum(txt.model, batch)
    assert torch.equal(a, b) and na == nb and ma["distill"] == mb["distill"]
    vlm.loader, txt.loader = vlm._train_loader(), txt._train_loader()
    ra, rb = vlm.train_step(), txt.train_step()
    assert ra["distill_loss"] == rb["distill_loss"] and ra["loss"] == rb["loss"]
    for k, v in txt.raw_model.state_dict().items():
        torch.testing.assert_close(vlm.raw_model.state_dict()[k], v, rtol=0, atol=0)

    row = torch.tensor([[2, 62, *[61] * 16, 63, *range(5, 30)]])  # (1, T+1): one image
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(2):
        pixels = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
        img = Batch(row, torch.arange(row.shape[1])[None], torch.zeros_like(row),
                    torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                    pixel_values=pixels, image_rows=torch.zeros(1, dtype=torch.int64))  # fmt: skip
        total, n, _ = vlm.objective.loss_sum(vlm.model, img)
        assert torch.isfinite(total) and n == row.shape[1] - 1
        losses.append(float(total.detach()))
    assert losses[0] != losses[1]
