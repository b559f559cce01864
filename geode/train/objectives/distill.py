"""Gemma 3 distillation as an objective: cross-entropy to K sampled teacher probabilities.

The math (sampling, renormalisation, the offline target cache, on-policy rollouts) lives in
geode.train.distill; this module wires it to the trainer. Per micro-batch:

    L = sum_t mask_t * CE(q_t, p_student,t)  +  hard_weight * sum_t real_t * CE(y_t)  +  z
    normalizer = sum_t mask_t                        (targets inside a document)

where `real` drops the targets an on-policy rollout replaced with student samples (GKD,
arXiv:2306.13649). The teacher is a `Reference` (online) or absent (offline cache).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...data.loader import Batch, DataLoader, Windows
from .. import distill as D
from ..distributed import barrier
from ..loss import loss_terms
from ..metrics import fmt_duration
from ..reference import Reference, check_compatible, check_tokenizer
from .base import Metrics, Objective, register


@register("distill")
class Distill(Objective):
    """Distillation loss of loop.py's trainer; the recipe's [distill] section configures it."""

    def __init__(self, trainer: Any, options: Any = None):
        super().__init__(trainer, options)
        d = trainer.recipe.distill
        if d is None:
            from ...recipe import RecipeError

            raise RecipeError("objective.kind = 'distill' needs a [distill] section")
        self.d = d
        self.teacher: Reference | None = None
        self.cache: D.TargetCache | None = None
        self._engine = None  # on-policy: the student's sampler (built on first use)
        if d.teacher and d.mode == "online":
            self.teacher = Reference.for_trainer(
                trainer, d.teacher, "distill.teacher", tokenizer=False
            )
        if d.mode == "offline":
            self._ensure_cache()

    @classmethod
    def preflight(cls, trainer: Any) -> int:
        """Check the teacher fits the student before any model is built; its parameter count."""
        d = trainer.recipe.distill
        if trainer.data is None:
            from ...recipe import RecipeError

            raise RecipeError("distillation reads teacher targets per packed window: it needs "
                              "the recipe's prepared dataset (data.path), not batches from code")  # fmt: skip
        if d is None or not d.teacher:
            return 0
        from ...checkpoint import read_config
        from ..loop import _count_params

        tcfg = read_config(d.teacher)
        where = f"distill.teacher = {d.teacher!r}"
        check_compatible(tcfg, trainer.config, where, names=("teacher", "student"),
                         error=D.DistillError)  # fmt: skip
        want = (trainer.data.manifest.get("tokenizer") or {}).get("sha256")
        check_tokenizer(d.teacher, want, where, error=D.DistillError)
        return _count_params(tcfg) if d.mode == "online" else 0

    # ------------------------------------------------------------------ the loss
    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, float, Metrics]:
        """Distillation CE (+ hard CE on real data, + z); normalizer: in-document targets."""
        tr = self.trainer
        if model.training:
            names = [tr.sources[s] for s in batch.sources.tolist()]
        else:
            names = [f"eval.{tr.eval_source}"] * len(batch)
        real = None
        if model.training and self.d.on_policy_tokens:
            batch, real = self._student_rollout(batch, names)
        mask = batch.loss_mask
        hard_mask = mask if real is None else mask & real.to(mask.device)
        with self.autocast():
            logits = model(**batch.model_inputs())  # (M, T, V)
        terms = tr._loss_terms or loss_terms
        ce, z = terms(logits, batch.targets, hard_mask, tr.recipe.train.z_loss)
        ids, q = self._targets(batch, names)
        dl = D.distill_loss_sum(logits, ids, q, mask)
        total = dl + self.d.hard_weight * ce + z
        metrics = {
            "ce": ce.detach(),
            "z": z.detach(),
            "tokens": float(hard_mask.sum()),
            "distill": dl.detach(),
            "entropy": D.target_entropy_sum(q, mask),
        }
        return total, float(mask.sum()), metrics

    def report(self, sums: dict[str, float], normalizer: float, training: bool) -> dict[str, float]:
        """Train: loss (CE on real data), z_loss, distill_loss, distill_kl; eval: eval_*."""
        n, t = max(normalizer, 1.0), max(sums["tokens"], 1.0)
        kl = (sums["distill"] - sums["entropy"]) / n
        if not training:
            return {"eval_loss": sums["ce"] / t, "eval_distill": sums["distill"] / n, "eval_kl": kl}
        out = {"loss": sums["ce"] / t}
        if self.trainer.recipe.train.z_loss:
            out["z_loss"] = sums["z"] / t
        out.update(distill_loss=sums["distill"] / n, distill_kl=kl)
        return out

    # ------------------------------------------------------------------ targets
    def _targets(self, b: Batch, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher targets (ids, q), each (B, T, K), for the rows of `b`."""
        d, tr = self.d, self.trainer
        windows = b.windows.tolist()
        if self.cache is not None:
            ids, q = self.cache.get(names, windows)
            return ids.to(tr.info.device), q.to(tr.info.device)
        assert self.teacher is not None
        logits = self.teacher.logits(b)  # (B, T, V)
        return D.targets_for_batch(
            logits, names, windows, d.top_k, d.sampling, d.temperature, tr.recipe.data.seed
        )

    def _student_rollout(self, mb: Batch, names: list[str]) -> tuple[Batch, torch.Tensor]:
        """On-policy distillation: the student samples the tail of each row (D.student_rollout)."""
        from ...infer import Engine

        d, tr = self.d, self.trainer
        if self._engine is None:  # plain module classes: the model keeps training afterwards
            self._engine = Engine(tr.raw_model, max_batch=tr.micro, optimize=False,
                                  max_seq_len=tr.recipe.data.seq_len + 1)  # fmt: skip
        seeds = [
            D.window_seed(tr.recipe.data.seed + 1, name, int(w))
            for name, w in zip(names, mb.windows.tolist())
        ]
        try:
            with self.autocast():
                return D.student_rollout(
                    self._engine, mb, d.on_policy_tokens, d.on_policy_temperature, seeds
                )
        finally:
            tr.raw_model.train()

    # ------------------------------------------------------------------ offline cache
    def _cache_expect(self) -> dict[str, Any]:
        d, tr = self.d, self.trainer
        streams = {n: tr.loader.windows[i].num_windows for i, n in enumerate(tr.sources)}
        if tr.eval_data is not None:
            w = Windows(tr.eval_data.streams[tr.eval_source], tr.recipe.data.seq_len, 0)
            streams[f"eval.{tr.eval_source}"] = w.num_windows
        return {
            "format": D.CACHE_FORMAT,
            "seq_len": tr.recipe.data.seq_len,
            "top_k": min(d.top_k, tr.config.vocab_size),
            "sampling": d.sampling,
            "temperature": d.temperature,
            "seed": tr.recipe.data.seed,
            "vocab_size": tr.config.vocab_size,
            "id_dtype": "uint16" if tr.config.vocab_size <= 2**16 else "uint32",
            "data": str(tr.data.manifest.get("created", "")),
            "streams": streams,
        }

    def _windows_needed(self) -> dict[str, np.ndarray]:
        """(stream -> window ids) this run will train and evaluate on, from a dry loader."""
        tr = self.trainer
        needed: dict[str, set[int]] = {n: set() for n in tr.sources}
        dry = DataLoader(
            tr.data,
            batch_size=tr.micro * tr.accum * tr.info.world_size,
            seq_len=tr.recipe.data.seq_len,
            seed=tr.recipe.data.seed,
            mixture=tr.recipe.data.mixture,
            sources=tr.sources,
        )
        for _ in range(tr.recipe.train.max_steps):
            b = dry.next_batch()
            for s, w in zip(b.sources.tolist(), b.windows.tolist()):
                needed[tr.sources[s]].add(w)
        if tr.eval_data is not None:
            ev = tr._eval_loader(world=1, rank=0)
            name = f"eval.{tr.eval_source}"
            needed[name] = set()
            for _ in range(tr.recipe.eval.batches):
                needed[name].update(ev.next_batch().windows.tolist())
        return {k: np.array(sorted(v), np.int64) for k, v in needed.items()}

    def _ensure_cache(self) -> None:
        """Offline distillation: make sure every target this run needs is in the cache."""
        d, tr = self.d, self.trainer
        root = Path(d.cache)
        expect = self._cache_expect()
        if tr.info.is_main and not (root / D.CACHE_FILE).exists():
            D.TargetCache.create(root, expect)
        barrier(tr.info)
        cache = D.TargetCache.open(root, expect, writable=True)
        needed = self._windows_needed()
        todo = {s: cache.missing(s, w) for s, w in needed.items()}
        n_todo = sum(len(v) for v in todo.values())
        if n_todo:
            if not d.teacher:
                raise D.DistillError(
                    f"{root}: {n_todo} windows this run needs are not in the cache and "
                    "distill.teacher is not set to compute them"
                )
            teacher = Reference.for_trainer(tr, d.teacher, "distill.teacher", tokenizer=False)
            self._fill_cache(cache, teacher, todo)
            del teacher
        barrier(tr.info)
        self.cache = D.TargetCache.open(root, expect)

    @torch.no_grad()
    def _fill_cache(
        self, cache: D.TargetCache, teacher: Reference, todo: dict[str, np.ndarray]
    ) -> None:
        """Run the teacher over missing windows (rank r takes every W-th) and store targets."""
        d, tr = self.d, self.trainer
        T = tr.recipe.data.seq_len
        t0 = time.time()
        done = 0
        for stream, windows in todo.items():
            mine = windows[tr.info.rank :: tr.info.world_size]
            data = tr.eval_data if stream.startswith("eval.") else tr.data
            win = Windows(data.streams[stream.removeprefix("eval.")], T, 0)
            for i in range(0, len(mine), tr.micro):
                chunk = [int(w) for w in mine[i : i + tr.micro]]
                parts = [win.window(w) for w in chunk]
                tok, pos, seg = (torch.from_numpy(np.stack(x)) for x in zip(*parts))
                b = Batch(tok, pos, seg, torch.zeros(len(chunk)), torch.tensor(chunk))
                ids, q = D.targets_for_batch(
                    teacher.logits(b), [stream] * len(chunk), chunk, d.top_k, d.sampling,
                    d.temperature, tr.recipe.data.seed,
                )  # fmt: skip
                for j, w in enumerate(chunk):
                    cache.put(stream, w, ids[j], q[j])
                done += len(chunk)
        cache.flush()
        if tr.info.is_main:
            print(
                f"geode distill: cached teacher targets for {done} windows on rank 0 in "
                f"{fmt_duration(time.time() - t0)}",
                flush=True,
            )
