"""CFG distillation as an objective (Cideron et al. 2024, "Diversity-Rewarded CFG
Distillation", arXiv:2410.06084): the student learns the teacher's guided distribution, and an
optional policy-gradient term rewards diversity among its samples.

The teacher's classifier-free guided distribution at completion position t (Ho & Salimans 2022,
eq. 6; Sanchez et al. 2023, eq. 7, for language models), mixed in log-probability space:

    log p_cfg(. | y<t) = log_softmax( l_u + γ (l_c - l_u) ),
    l_c = log p_T(. | x, y<t),   l_u = log p_T(. | x̄, y<t)

with x the prompt (the condition) and x̄ the unconditional prompt; both are teacher forward
passes over the same completion tokens. (log_softmax(a) differs from a by a constant per
position, so this equals the engine's mix of raw logits, infer/engine.py.) Per micro-batch of
rollouts (rows = prompt + completion, `loss_mask` on completion targets):

    L = sum_t m_t KL(p_cfg,t || p_θ,t)  +  β sum_t m_t l^PG_t          normalizer = sum_t m_t

the distillation term of the paper's quality objective Q(θ) (sec. 3.1: the exact per-token KL
to the CFG-augmented teacher over the vocabulary, on the student's own samples) and β times the
REINFORCE term of its diversity objective D(θ) (sec. 3.2), l^PG_t = -A_i log p_θ(y_t) through
geode.post.policy.policy_terms (one update per batch of rollouts: ratio 1), with `advantages`
(B,) from the diversity reward of each sample's group (geode.post.cfgdistill).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...data.loader import Batch
from ...recipe import RecipeError
from ..reference import Reference
from .base import Metrics, Objective, register


def guided_logprobs(
    cond_logits: torch.Tensor, uncond_logits: torch.Tensor, gamma: float
) -> torch.Tensor:
    """CFG in log-prob space: log_softmax(l_u + γ (l_c − l_u)); inputs (..., V) -> (..., V) f32."""
    lc = torch.log_softmax(cond_logits.float(), dim=-1)  # (..., V)
    lu = torch.log_softmax(uncond_logits.float(), dim=-1)  # (..., V)
    return torch.log_softmax(lu + gamma * (lc - lu), dim=-1)


def completions(batch: Batch) -> list[list[int]]:
    """Each row's completion tokens: the targets under its (contiguous) loss mask."""
    out = []
    for b in range(len(batch)):
        idx = batch.loss_mask[b].nonzero().flatten().tolist()
        if idx and idx[-1] - idx[0] + 1 != len(idx):
            raise ValueError(f"cfg_distill: row {b}'s loss mask is not one contiguous completion")
        out.append(batch.targets[b, idx].tolist() if idx else [])
    return out


def unconditional_batch(batch: Batch, uncond_ids: list[int], pad_id: int) -> Batch:
    """The rows' completions after the unconditional prompt: `uncond_ids + completion`, with
    the loss mask on the completion's targets (the same count per row as in `batch`)."""
    from ...post.pairs import sequences_batch

    return sequences_batch([(uncond_ids, c) for c in completions(batch)], pad_id)


@torch.no_grad()
def teacher_guided_logprobs(
    teacher: Reference, batch: Batch, uncond_ids: list[int], gamma: float, pad_id: int
) -> torch.Tensor:
    """(N, V) guided log-probs at the N trained targets of `batch` (row-major order)."""
    cond = teacher.logits(batch)[batch.loss_mask.to(teacher.device)]  # (N, V)
    ub = unconditional_batch(batch.to("cpu"), uncond_ids, pad_id)
    uncond = teacher.logits(ub)[ub.loss_mask.to(teacher.device)]  # (N, V)
    return guided_logprobs(cond, uncond, gamma)


def distill_kl(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p_cfg || p_θ) = sum_v p_cfg (log p_cfg - log p_θ): (N, V), (N, V) -> (N,)."""
    ls = torch.log_softmax(student_logits.float(), dim=-1)  # (N, V)
    return (teacher_logp.exp() * (teacher_logp - ls)).sum(-1)


@register("cfg_distill")
class CfgDistill(Objective):
    """KL to the CFG-guided teacher (+ β REINFORCE on diversity); the recipe's [cfg] section."""

    def __init__(self, trainer: Any, options: Any = None):
        super().__init__(trainer, options)
        cfg = getattr(trainer.recipe, "cfg", None)
        if cfg is None:
            raise RecipeError("objective.kind = 'cfg_distill' needs a [cfg] section")
        from ...post.cfgdistill import unconditional_ids
        from ...tokenizer import load_tokenizer
        from ..sft import tokenizer_path

        self.cfg = cfg
        path = cfg.teacher or trainer.recipe.model.init
        if not path:
            raise RecipeError("[cfg] needs a teacher: set model.init or cfg.teacher")
        where = "cfg.teacher" if cfg.teacher else "model.init"
        self.teacher = Reference.for_trainer(trainer, path, where, tokenizer=False)
        tok = load_tokenizer(tokenizer_path(trainer.recipe))
        self.pad_id = tok.pad_id
        self.uncond_ids = unconditional_ids(tok, cfg.unconditional)
        self.source: Any = None  # the rollout source (its statistics join the step's record)

    @classmethod
    def preflight(cls, trainer: Any) -> int:
        """The teacher's parameter count (it is loaded beside the student)."""
        from ...checkpoint import read_config
        from ..loop import _count_params

        cfg = getattr(trainer.recipe, "cfg", None)
        path = (cfg.teacher if cfg is not None else "") or trainer.recipe.model.init
        return _count_params(read_config(path)) if path else 0

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, float, Metrics]:
        """Sum of per-token KL to the guided teacher (+ β PG terms); normalizer: tokens."""
        from ...post.policy import policy_terms

        mask = batch.loss_mask  # (B, T)
        target = teacher_guided_logprobs(
            self.teacher, batch, self.uncond_ids, self.cfg.guidance_scale, self.pad_id
        )  # (N, V)
        with self.autocast():
            logits = model(**batch.model_inputs())  # (B, T, V)
        sel = logits[mask]  # (N, V)
        kl = distill_kl(target, sel)  # (N,)
        total = kl.sum()
        metrics: Metrics = {"kl": kl.detach().sum(), "tokens": float(mask.sum())}
        beta = self.cfg.diversity_weight
        if beta and batch.advantages is not None:
            logps = torch.zeros(mask.shape, dtype=torch.float32, device=sel.device)  # (B, T)
            lp = torch.log_softmax(sel.float(), -1).gather(-1, batch.targets[mask][:, None])
            logps = logps.masked_scatter(mask, lp.squeeze(-1))  # (B, T), zero off the mask
            terms, _ = policy_terms(
                logps, logps.detach(), batch.advantages, mask, loss_type="dapo"
            )  # (B, T): -A_i log p(y_t) in value 1 * A, gradient -A grad log p
            total = total + beta * terms.sum()
            metrics["pg"] = terms.detach().sum()
        return total, float(mask.sum()), metrics

    def report(self, sums: dict[str, float], normalizer: float, training: bool) -> dict[str, float]:
        """loss = mean per-token KL to the guided teacher (+ the rollouts' statistics)."""
        n = max(normalizer, 1.0)
        prefix = "" if training else "eval_"
        out = {f"{prefix}loss": sums["kl"] / n}
        if "pg" in sums:
            out[f"{prefix}pg"] = sums["pg"] / n
        if training and self.source is not None:
            out.update(self.source.last)
        return out
