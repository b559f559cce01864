"""Judges of agent episodes: an LLM on the transcript, a VLM on a rendered frame, each giving
P("yes") that the episode achieved its goal, and their agreement with the environment's reward.

Both ask one yes/no question in the chat format and read the answer position of ONE forward
pass: with l_yes, l_no the logits of the first token of "yes" and of "no" after the model's
generation prompt,

    P(yes) = exp(l_yes) / (exp(l_yes) + exp(l_no))          (the two-way softmax)

The VLM judge follows Baumli et al. 2023 ("Vision-Language Models as a Source of Rewards",
arXiv:2312.09187, sec. 2): the reward of an observation o for a goal g is the VLM's
probability that o shows g achieved, thresholded for success, r(o, g) = 1[P(yes | o, g) >= t]
(t = 0.5 here). The LLM judge asks the same question about the episode's transcript (SIMA 2's
judge of episodes). `judge_agreement` scores a judge against the environment's own success flag
(precision / recall / accuracy of "success"); `train_judge` fine-tunes a judge as a yes/no
classifier (cross-entropy of the two-way softmax) on episodes labelled by the environment's
reward, the honest nano-scale stand-in for "a larger VLM judges better".
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from geode.chat import render, render_multimodal

LLM_PROMPT = (
    "Goal: {goal}\n\nWhat the agent did:\n{transcript}\n\n"
    "Did the agent achieve the goal? Answer yes or no."
)
VLM_PROMPT = "Goal: {goal}\nIs the goal achieved in this image? Answer yes or no."
OMITTED = "(earlier turns omitted)"


@dataclass
class Attempt:
    """One episode to judge: its goal, transcript (chat messages), last rendered frame (H, W, 3)
    uint8 (image envs), and the environment's own outcome (None: unknown)."""

    goal: str
    transcript: list[dict[str, Any]] = field(default_factory=list)
    frame: np.ndarray | None = None
    success: bool | None = None


def answer_ids(tokenizer: Any, answers: tuple[str, str] = ("yes", "no")) -> tuple[int, int]:
    """The first token ids of the yes and no answers; a ValueError when they coincide."""
    ids = [tokenizer.encode(a) for a in answers]
    if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
        raise ValueError(f"judge answers {answers!r} need distinct first tokens, got {ids}")
    return ids[0][0], ids[1][0]


def message_text(message: Mapping[str, Any]) -> str:
    """A chat message as one line of text: "role: content" (image parts as "[image]", tool
    calls as their JSON)."""
    content = message.get("content", "")
    if not isinstance(content, str):
        content = " ".join(
            str(p.get("text", "")) if p.get("type") == "text" else "[image]" for p in content
        )
    calls = message.get("tool_calls") or []
    if calls:
        content += " " + " ".join(json.dumps(c, default=str) for c in calls)
    return f"{message.get('role', '?')}: {content}".strip()


class YesNoJudge:
    """Base of the judges: `inputs(attempt) -> (ids, pixels | None)`; `p_yes` in batches;
    `yes_no_logits` with gradients for training (module doc)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 16,
                 answers: tuple[str, str] = ("yes", "no")):  # fmt: skip
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.yes_id, self.no_id = answer_ids(tokenizer, answers)

    def inputs(self, attempt: Attempt) -> tuple[list[int], torch.Tensor | None]:
        """The judge prompt's token ids (ending with the model's generation prompt) and its
        images (1, 3, S, S) or None."""
        raise NotImplementedError

    def yes_no_logits(self, attempts: Sequence[Attempt]) -> torch.Tensor:
        """(N, 2) float32 logits of (yes, no) at each prompt's answer position (one forward,
        right-padded rows; causal attention keeps padding out of the real tokens)."""
        rows = [self.inputs(a) for a in attempts]
        T = max(len(ids) for ids, _ in rows)
        dev = next(self.model.parameters()).device
        ids = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long)  # (N, T)
        last = torch.zeros(len(rows), T, dtype=torch.bool)  # (N, T): the answer positions
        for i, (r, _) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            last[i, len(r) - 1] = True
        pixels = [p for _, p in rows if p is not None]
        kw = {"pixel_values": torch.cat(pixels).to(dev)} if pixels else {}
        logits = self.model(ids.to(dev), rows=last.to(dev), **kw)  # (N, V)
        return logits[:, [self.yes_id, self.no_id]].float()  # (N, 2)

    @torch.no_grad()
    def p_yes(self, attempts: Sequence[Attempt]) -> list[float]:
        """P(yes) per attempt (the two-way softmax of the answer logits), in eval mode."""
        was = self.model.training
        self.model.eval()
        try:
            out: list[float] = []
            for i in range(0, len(attempts), self.batch_size):
                pair = self.yes_no_logits(attempts[i : i + self.batch_size])  # (n, 2)
                out += pair.softmax(-1)[:, 0].tolist()
            return out
        finally:
            self.model.train(was)

    def __call__(self, attempts: Sequence[Attempt]) -> list[float]:
        return self.p_yes(attempts)


class LLMJudge(YesNoJudge):
    """P(yes) that the transcript achieved the goal. The transcript is cut from its start
    (earlier turns dropped, `OMITTED` noted) so that the prompt fits `max_len` tokens."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_len: int | None = None,
                 **kw: Any):  # fmt: skip
        super().__init__(model, tokenizer, **kw)
        self.max_len = max_len or int(model.config.max_position_embeddings)

    def inputs(self, attempt: Attempt) -> tuple[list[int], None]:
        """The transcript question's ids (earlier turns dropped until it fits)."""
        lines = [message_text(m) for m in attempt.transcript]
        cut = 0
        while True:
            shown = ([OMITTED] if cut else []) + lines[cut:]
            text = LLM_PROMPT.format(goal=attempt.goal, transcript="\n".join(shown))
            ids = self.tokenizer.encode(render([{"role": "user", "content": text}]))
            if len(ids) <= self.max_len:
                return list(ids), None
            if cut >= len(lines):
                raise ValueError(
                    f"LLMJudge: the goal alone takes {len(ids)} tokens, over max_len "
                    f"{self.max_len}: {attempt.goal[:80]!r}"
                )
            cut += 1


class VLMJudge(YesNoJudge):
    """P(yes) that the frame shows the goal achieved (Baumli et al. 2023): the attempt's frame
    as an image part before the question, on a model with a vision tower."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, **kw: Any):
        if getattr(model, "vision", None) is None:
            raise ValueError("VLMJudge: the model has no vision tower (a text-only checkpoint)")
        super().__init__(model, tokenizer, **kw)

    def inputs(self, attempt: Attempt) -> tuple[list[int], torch.Tensor]:
        """The frame + question: ids with the image placeholders, pixels (1, 3, S, S)."""
        from PIL import Image

        frame = attempt.frame
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[-1] != 3:
            got = getattr(frame, "shape", type(frame).__name__)
            raise ValueError(f"VLMJudge: attempt {attempt.goal!r} needs an RGB frame (H, W, 3), "
                             f"got {got}")  # fmt: skip
        vision = self.model.vision
        image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8))
        content = [{"type": "image", "image": image},
                   {"type": "text", "text": VLM_PROMPT.format(goal=attempt.goal)}]  # fmt: skip
        prompt = render_multimodal([{"role": "user", "content": content}],
                                   mm_tokens_per_image=vision.mm_tokens_per_image)  # fmt: skip
        ids = prompt.token_ids(self.tokenizer, image_token_index=vision.image_token_index)
        return ids, prompt.process(vision.image_size).pixel_values  # (1, 3, S, S)


def agreement(scores: Sequence[float], labels: Sequence[bool], threshold: float = 0.5
              ) -> dict[str, float]:  # fmt: skip
    """Precision / recall / accuracy / F1 of predicted success (score >= threshold) against
    the true labels, with the confusion counts. Precision with no predicted success and recall
    with no true success are 0.0 (the counts show which)."""
    if len(scores) != len(labels):
        raise ValueError(f"agreement: {len(scores)} scores for {len(labels)} labels")
    pred = [s >= threshold for s in scores]
    tp = sum(p and y for p, y in zip(pred, labels, strict=True))
    fp = sum(p and not y for p, y in zip(pred, labels, strict=True))
    fn = sum(y and not p for p, y in zip(pred, labels, strict=True))
    tn = len(pred) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision, "recall": recall, "f1": f1,
        "accuracy": (tp + tn) / len(pred) if pred else 0.0,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": len(pred),
        "positive_rate": (tp + fn) / len(pred) if pred else 0.0,
        "mean_p_yes": float(np.mean(scores)) if len(scores) else 0.0,
        "threshold": threshold,
    }  # fmt: skip


def judge_agreement(judge: Any, episodes: Sequence[Attempt], threshold: float = 0.5
                    ) -> dict[str, float]:  # fmt: skip
    """The judge's agreement with the environment's success flag over `episodes` (each with
    `success` set): precision / recall / accuracy of "success" (`agreement`)."""
    unknown = [i for i, e in enumerate(episodes) if e.success is None]
    if unknown:
        raise ValueError(f"judge_agreement: episodes {unknown[:5]} have no true success flag")
    return agreement(judge(episodes), [bool(e.success) for e in episodes], threshold)


def train_judge(
    judge: YesNoJudge,
    episodes: Sequence[Attempt],
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    train_vision: bool = True,
) -> list[float]:
    """Fine-tune the judge's model as a yes/no classifier on episodes labelled by the
    environment (success -> "yes"): cross-entropy of the two-way softmax, AdamW, batches
    balanced between the two labels when both occur; `train_vision=False` leaves a VLM's
    tower as it is. Returns the loss per step."""
    labelled = [e for e in episodes if e.success is not None]
    if not labelled:
        raise ValueError("train_judge: no labelled episodes")
    pos = [e for e in labelled if e.success]
    neg = [e for e in labelled if not e.success]
    model = judge.model
    frozen = getattr(model, "vision_tower", None) if not train_vision else None
    skip = set() if frozen is None else {id(p) for p in frozen.parameters()}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    was = model.training
    model.train()
    losses = []
    try:
        for _ in range(steps):
            if pos and neg:
                half = batch_size // 2
                batch = [rng.choice(pos) for _ in range(half)]
                batch += [rng.choice(neg) for _ in range(batch_size - half)]
            else:
                batch = [rng.choice(labelled) for _ in range(batch_size)]
            target = torch.tensor([0 if e.success else 1 for e in batch])  # 0: yes, 1: no
            logits = judge.yes_no_logits(batch)  # (B, 2)
            loss = F.cross_entropy(logits, target.to(logits.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was)
    return losses
