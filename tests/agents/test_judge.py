"""Judges (issue #21 item 4): P(yes) is the two-way softmax of the model's own logits at the
answer position, the transcript is cut to fit, agreement metrics on known labels, the VLM judge
on a real rendered MiniGrid frame with a tiny vision model, and a judge trained as a yes/no
classifier agrees with the labels it was not trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geode
from geode.agents.judge import (
    LLM_PROMPT,
    OMITTED,
    VLM_PROMPT,
    Attempt,
    LLMJudge,
    VLMJudge,
    agreement,
    judge_agreement,
    message_text,
    train_judge,
)
from geode.chat import render

TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
    "query_pre_attn_scalar": 32, "sliding_window": 64,
    "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 512,
}  # fmt: skip
COLOURS = ("red", "green", "blue", "purple", "yellow", "grey")
KINDS = ("ball", "box", "key")
ACTIONS = ("left", "right", "forward", "pickup", "done")


def goal(i: int) -> str:
    return f"go to the {COLOURS[i % 6]} {KINDS[i // 6 % 3]}"


def corpus() -> list[str]:
    """Chat text the tiny tokenizer is trained on: judge prompts about missions and actions."""
    texts = []
    for i in range(60):
        steps = "\n".join(f"assistant: {ACTIONS[(i + k) % 5]}" for k in range(3))
        q = LLM_PROMPT.format(goal=goal(i), transcript=f"user: {goal(i)}\n{steps}")
        texts.append(render([{"role": "user", "content": q},
                             {"role": "assistant", "content": ("yes", "no")[i % 2]}]))  # fmt: skip
        texts.append(VLM_PROMPT.format(goal=goal(i)))
    return texts


def tiny_model(vocab: int, seed: int = 0, vision_ids: tuple[int, int, int] | None = None):
    """A random tiny Gemma 3 (2 layers, width 64); with vision_ids (image, boi, eoi) the
    nano-vision SigLIP tower (32 px, 16 soft tokens)."""
    from geode.model.vision import get_vision_preset

    cfg = geode.get_preset("nano-1m").replace(**TINY, vocab_size=vocab)
    vision = None
    if vision_ids is not None:
        image, boi, eoi = vision_ids
        vision = get_vision_preset("nano-vision").replace(
            image_token_index=image, boi_token_index=boi, eoi_token_index=eoi
        )
    return geode.build_model(cfg, seed=seed, vision=vision).eval()


def vision_ids(tok) -> tuple[int, int, int]:
    sp = tok.special_ids
    return sp["<image_soft_token>"], sp["<start_of_image>"], sp["<end_of_image>"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores the tiny forwards are several times faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from geode.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("judge-tok") / "tokenizer.model"
    return train_tokenizer(texts=corpus(), vocab_size=400, out=out, num_threads=1)


def minigrid_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """Real rendered frames of BabyAI-GoToObj (MiniGridEnv's recording), one per seed."""
    from geode.agents.envs.minigrid import MiniGridEnv

    frames = []
    for s in range(seed, seed + n):
        env = MiniGridEnv("BabyAI-GoToObj-v0", s, record=True)
        env.reset()
        frames += env.frames()
    return frames


def _manual_p_yes(model, ids: list[int], yes: int, no: int, **kw) -> float:
    """P(yes) by hand: the full forward's logits at the last position, softmax over (yes, no)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), **kw)[0, -1]  # (V,)
    full = logits.float().softmax(-1)
    assert abs(float(full[yes] / (full[yes] + full[no]))
               - float(logits[[yes, no]].float().softmax(-1)[0])) < 1e-6  # fmt: skip
    return float(logits[[yes, no]].float().softmax(-1)[0])


def test_llm_judge_p_yes_is_the_softmax_of_the_answer_logits(tok):
    model = tiny_model(tok.vocab_size, seed=1)
    judge = LLMJudge(model, tok, batch_size=3)
    assert judge.yes_id == tok.encode("yes")[0] and judge.no_id == tok.encode("no")[0]
    attempts = [
        Attempt(
            goal(i),
            [{"role": "user", "content": goal(i)}]
            + [{"role": "assistant", "content": ACTIONS[k % 5]} for k in range(i % 4)],
        )
        for i in range(5)
    ]  # fmt: skip; lengths differ: batched rows are right-padded
    got = judge.p_yes(attempts)
    want = [_manual_p_yes(model, judge.inputs(a)[0], judge.yes_id, judge.no_id) for a in attempts]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert len(set(np.round(got, 6))) > 1 and all(0 < p < 1 for p in got)
    ids = judge.inputs(attempts[2])[0]
    text = tok.decode(ids)
    assert goal(2) in text and text.endswith("<start_of_turn>model\n")
    assert judge(attempts) == got


def test_llm_judge_cuts_the_transcript_from_its_start_to_fit(tok):
    model = tiny_model(tok.vocab_size)
    long = [{"role": "assistant", "content": f"forward {k}"} for k in range(200)]
    judge = LLMJudge(model, tok, max_len=120)
    ids = judge.inputs(Attempt(goal(0), long))[0]
    text = tok.decode(ids)
    assert len(ids) <= 120 and OMITTED in text and "forward 199" in text
    assert "forward 0\n" not in text
    with pytest.raises(ValueError, match="the goal alone takes"):
        LLMJudge(model, tok, max_len=20).inputs(Attempt(goal(0) * 20, []))
    call = {"type": "function", "function": {"name": "calc", "arguments": {"x": 1}}}
    assert message_text({"role": "assistant", "content": "ok", "tool_calls": [call]}) == (
        'assistant: ok {"type": "function", "function": {"name": "calc", "arguments": {"x": 1}}}'
    )
    parts = [{"type": "image", "image": None}, {"type": "text", "text": "left"}]
    assert message_text({"role": "user", "content": parts}) == "user: [image] left"
    with pytest.raises(ValueError, match="distinct first tokens"):
        LLMJudge(model, tok, answers=("yes", "yes"))


def test_agreement_metrics_on_known_labels():
    scores = [0.9, 0.8, 0.6, 0.4, 0.3, 0.2, 0.55, 0.1]
    labels = [True, True, False, True, False, False, True, False]
    m = agreement(scores, labels)  # predicted: 1 1 1 0 0 0 1 0
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 3)
    assert m["precision"] == 0.75 and m["recall"] == 0.75 and m["accuracy"] == 0.75
    assert m["f1"] == 0.75 and m["positive_rate"] == 0.5 and m["n"] == 8
    strict = agreement(scores, labels, threshold=0.85)
    assert (strict["precision"], strict["recall"], strict["accuracy"]) == (1.0, 0.25, 0.625)
    none = agreement([0.1, 0.2], [True, False])
    assert none["precision"] == 0.0 and none["recall"] == 0.0 and none["accuracy"] == 0.5
    with pytest.raises(ValueError, match="2 scores for 3 labels"):
        agreement([0.1, 0.2], [True, False, True])
    fixed = lambda eps: [0.9 if e.goal.startswith("a") else 0.1 for e in eps]  # noqa: E731
    eps = [Attempt("a", success=True), Attempt("b", success=True), Attempt("a", success=False)]
    m = judge_agreement(fixed, eps)
    assert (m["tp"], m["fn"], m["fp"]) == (1, 1, 1)
    with pytest.raises(ValueError, match="no true success flag"):
        judge_agreement(fixed, [Attempt("a")])


def test_vlm_judge_on_a_real_minigrid_frame(tok):
    model = tiny_model(tok.vocab_size, seed=2, vision_ids=vision_ids(tok))
    frames = minigrid_frames(3)
    assert frames[0].shape == (128, 128, 3) and frames[0].dtype == np.uint8
    judge = VLMJudge(model, tok)
    attempts = [Attempt(goal(i), frame=f) for i, f in enumerate(frames)]
    got = judge.p_yes(attempts)
    for a, p in zip(attempts, got, strict=True):
        ids, pixels = judge.inputs(a)
        assert pixels.shape == (1, 3, 32, 32)
        assert ids.count(model.vision.image_token_index) == model.vision.mm_tokens_per_image
        want = _manual_p_yes(model, ids, judge.yes_id, judge.no_id, pixel_values=pixels)
        assert abs(p - want) < 1e-5 and 0 < p < 1
    # the frame matters: the same goal with another frame scores differently
    other = judge.p_yes([Attempt(goal(0), frame=frames[1])])[0]
    assert abs(other - got[0]) > 1e-7
    with pytest.raises(ValueError, match=r"needs an RGB frame \(H, W, 3\)"):
        judge.p_yes([Attempt(goal(0))])
    with pytest.raises(ValueError, match="no vision tower"):
        VLMJudge(tiny_model(tok.vocab_size), tok)


def test_trained_judge_agrees_with_held_out_labels(tok):
    """A yes/no classifier fine-tune on labelled transcripts: held-out accuracy goes from
    chance-level to 1 (success iff the transcript ends with "done" - a rule to learn)."""

    def episodes(n: int, seed: int) -> list[Attempt]:
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            acts = [ACTIONS[k] for k in rng.integers(0, 4, size=int(rng.integers(1, 4)))]
            ok = bool(rng.integers(0, 2))
            acts.append("done" if ok else ACTIONS[int(rng.integers(0, 4))])
            msgs = [{"role": "user", "content": goal(i)}]
            msgs += [{"role": "assistant", "content": a} for a in acts]
            out.append(Attempt(goal(i), msgs, success=ok))
        return out

    torch.manual_seed(0)
    judge = LLMJudge(tiny_model(tok.vocab_size, seed=3), tok)
    train, held = episodes(64, 0), episodes(32, 1)
    before = judge_agreement(judge, held)
    losses = train_judge(judge, train, steps=40, lr=3e-3, batch_size=16)
    after = judge_agreement(judge, held)
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.2 < np.mean(losses[:5])
    assert after["accuracy"] == 1.0 > before["accuracy"]
    assert not judge.model.training  # train_judge restores the mode
