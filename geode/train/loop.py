"""The training loop: one optimizer step at a time, resumable, on 1 or N processes.

One step (global batch G sequences, W ranks, A micro-batches of M sequences per rank,
G = M * A * W):

    batch   <- loader.next_batch()                    this rank's G/W rows (B, T+1)
    for each micro-batch (gradient sync on the last only):
        sum, n, metrics = objective.loss_sum(model, micro-batch)   (objectives/, autocast inside)
        sum += coef * aux * n                          MoE models only (objectives/router.py)
        sum.backward()
    N <- all-reduce(sum of n)                          e.g. trained targets in the global batch
    grads *= W / N                                     DDP/FSDP averaged over W -> global mean
    clip the global gradient norm; lr <- schedule(step); AdamW step

so the update is the same whatever W and A (up to float summation order). Checkpoints,
replicas and SDC checks happen between steps (see state.py and fault.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_model
from ..config import ConfigError, ModelConfig, get_preset
from ..data import DataError
from ..data.loader import DataLoader
from ..data.pack import open_dataset
from ..model import build_model
from ..recipe import RecipeError, recipe_to_toml
from .batches import TrainData
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    grad_sync,
    init_distributed,
    resolve_parallel,
    unwrap,
    wrap_model,
)
from .fault import (
    FaultInjector,
    Goodput,
    ReplicaStore,
    SDCError,
    SDCWarning,
    compare_replicas,
    disagreeing,
    grad_checksum,
    name_faulty,
    param_checksum,
    private_replica_dir,
)
from .loss import loss_terms
from .memory import check_fits, estimate_bytes
from .metrics import MetricsLog, plot_curves, read_metrics
from .objectives import build_objective, objective_class, objective_kind
from .objectives.router import RouterTerm, resolve_aux_coef
from .optim import build_optimizer, lr_at, set_lr
from .recipe import TrainRecipe, check_recipe, micro_batch_and_accumulation, recipe_dict
from .state import (
    CheckpointManager,
    Found,
    ResumeError,
    local_snapshot,
    restore_snapshot,
    rng_state,
    set_rng_state,
)

EVAL_SEED_OFFSET = 1_000_003  # the held-out loader's seed differs from the training one
_RESUME_KEYS = ("model", "data.seq_len", "data.seed", "data.path", "batch.global_batch_size")


def resolve_model_config(recipe: TrainRecipe) -> ModelConfig:
    """The student's ModelConfig: the init checkpoint's, or the preset with overrides."""
    m = recipe.model
    if m.init:
        from ..checkpoint import read_config

        return read_config(m.init)
    try:
        config = get_preset(m.preset)
    except KeyError as e:
        raise RecipeError(f"model.preset: {e.args[0]}") from None
    if m.overrides:
        unknown = sorted(set(m.overrides) - set(ModelConfig.__dataclass_fields__))
        if unknown:
            raise RecipeError(f"model.overrides: unknown ModelConfig field(s) {', '.join(unknown)}")
        try:
            config = config.replace(**m.overrides)
        except (ConfigError, TypeError) as e:
            raise RecipeError(f"model.overrides: {e}") from None
    return config


class Trainer:
    """A training run from a recipe: build, (resume,) `fit()`, export."""

    def __init__(
        self,
        recipe: TrainRecipe,
        out: str | Path | None = None,
        resume: bool = False,
        progress: bool | None = None,
        *,
        data: TrainData | None = None,
        allow_fresh: bool = False,
    ):
        """`data`: batches given in code (SFT, pairs, rollouts) instead of the packed dataset;
        `allow_fresh`: a resume that finds no valid state starts again instead of failing."""
        self.t_init = time.time()
        self.recipe = recipe
        self.out = Path(out if out is not None else recipe.out)
        self.info: DistInfo = init_distributed(recipe.train.device)
        info = self.info
        check_recipe(recipe)
        self.micro, self.accum = micro_batch_and_accumulation(recipe, info.world_size)
        self.progress = recipe.train.progress if progress is None else progress
        self.restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        self.resume = resume or self.restart_count > 0
        self.allow_fresh = allow_fresh
        t = recipe.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self._was_deterministic = torch.are_deterministic_algorithms_enabled()
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)

        # ---- data
        self.train_data = data
        self.data = self.eval_data = None
        self.eval_source = recipe.data.eval_source
        if data is None:
            self._open_packed_data()
        else:
            self.sources = [data.describe]

        # ---- model
        self.config = resolve_model_config(recipe)
        data_vocab = self.data.vocab_size if data is None else data.vocab_size
        if data_vocab > self.config.vocab_size:
            raise RecipeError(
                f"the data at {recipe.data.path} was tokenized with {data_vocab} ids "
                f"but the model has vocab_size {self.config.vocab_size}; set "
                f"model.overrides.vocab_size >= {data_vocab} or use a matching preset"
            )
        dtype = torch.bfloat16 if recipe.model.dtype == "bfloat16" else torch.float32
        self.autocast_dtype = torch.bfloat16 if t.precision == "bfloat16" else None
        # frozen models the objective holds (a distillation teacher, a reference)
        frozen_params = objective_class(objective_kind(recipe)).preflight(self)
        self.parallel = resolve_parallel(t.parallel, info)
        n_params = _count_params(self.config)
        est = estimate_bytes(
            self.config,
            n_params,
            self.micro,
            recipe.data.seq_len,
            param_bytes=2 if dtype == torch.bfloat16 else 4,
            act_bytes=2 if self.autocast_dtype is not None else 4,
            shards=info.world_size if self.parallel == "fsdp" else 1,
            checkpointing=t.activation_checkpointing,
            teacher_params=frozen_params,
        )
        check_fits(
            est,
            info.device,
            t.memory_fraction,
            f"micro_batch_size={self.micro} x seq_len={recipe.data.seq_len} with "
            f"{n_params / 1e6:.1f}M parameters",
        )
        if recipe.model.init:
            model = load_model(recipe.model.init, dtype=dtype, device=info.device)
        else:
            model = build_model(
                self.config, dtype=dtype, device=info.device, seed=recipe.model.seed
            )
        if recipe.lora is not None:
            from .sft_lora import add_lora

            model = add_lora(model, recipe.lora, recipe.model.init)
        model.train()
        model.gradient_checkpointing = t.activation_checkpointing
        # torch.compile per decoder layer (fuses norms, RoPE, GeGLU and residuals around the
        # matmuls) and of the loss (fuses log-softmax, the target gather and the z-loss).
        self._loss_terms = None
        if t.compile:
            for layer in model.layers:
                layer.compile()
            self._loss_terms = torch.compile(loss_terms)
        model = objective_class(objective_kind(recipe)).prepare_model(self, model)
        self.raw_model = model
        self.model = wrap_model(model, info, self.parallel)
        # MoE: the load-balancing term every objective gets, and the router metrics
        self.router = RouterTerm.for_model(model, self.config, resolve_aux_coef(recipe))
        self.optimizer = build_optimizer(self.model, recipe.optim)

        # ---- loop state
        self.loader = self._train_loader() if data is None else data.source()
        self.step = 0
        self.tokens = 0  # training tokens (targets) consumed, all ranks
        self.goodput = Goodput(first_start=self.t_init)
        self.ckpt = CheckpointManager(
            self.out / "checkpoints", info, recipe.checkpoint.keep, recipe.checkpoint.verify
        )
        self.faults = FaultInjector(info)
        self.ckpt.before_manifest = lambda s: self.faults.maybe_kill(s, at="checkpoint")
        self.sdc_every = recipe.fault.sdc_every
        if self.sdc_every and self.parallel == "fsdp":
            raise RecipeError(
                "fault.sdc_every needs data-parallel replicas (train.parallel = 'ddp'); FSDP "
                "shards are not replicas of each other"
            )
        if self.sdc_every and not info.distributed:
            self.sdc_every = 0  # one process: no replicas to compare
        self._sdc_snap: dict[str, Any] | None = None
        self._sdc_records: dict[int, int] = {}
        self._step_times: dict[int, float] = {}
        self.sdc_events: list[dict[str, Any]] = []
        self.replicas = None
        if recipe.fault.replica_every:
            root = private_replica_dir(self.out, recipe.fault.replica_dir, info)
            self.replicas = ReplicaStore(root, info, run_id=str(self.out.resolve()))
            self.faults.replicas = self.replicas
        self.last_eval: dict[str, float] = {}
        self._saved_step = -1  # step of the newest checkpoint on disk
        self._prepare_out()
        self._resume()
        self.objective = build_objective(self)  # after the model; may load frozen models

    # ------------------------------------------------------------------ setup
    def _prepare_out(self) -> None:
        """Create OUT, refuse to overwrite an earlier run's checkpoints unless resuming; the
        metrics of an earlier run without checkpoints are set aside, never appended to."""
        problem = None
        if self.info.is_main:
            if not self.resume:  # a resume creates nothing until it has found what to resume
                self.out.mkdir(parents=True, exist_ok=True)
            old = self.ckpt._listing()
            if not self.resume and old:
                problem = (
                    f"{self.ckpt.root} holds checkpoints of an earlier run (newest "
                    f"{old[0][1].name}); pass --resume to continue it or choose another --out"
                )
            elif not self.resume:
                moved = _set_aside(self.out / "metrics.jsonl", _stamp())
                if moved is not None:
                    print(f"geode train: an earlier run's metrics moved to {moved}", flush=True)
        problem = broadcast_object(problem, self.info)
        if problem:
            raise ResumeError(problem)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.info.is_main)
        barrier(self.info)

    def _trainer_state(self) -> dict[str, Any]:
        """Everything besides model/optimizer that an exact resume needs."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loader": self.loader.state_dict(),
            "goodput": self.goodput.state(),
            "world_size": self.info.world_size,
            "recipe": recipe_dict(self.recipe),
        }

    def _load_trainer_state(self, st: dict[str, Any], goodput: bool = True) -> None:
        self.step = int(st["step"])
        self.tokens = int(st["tokens"])
        self.loader.load_state_dict(st["loader"])
        if goodput:
            self.goodput = Goodput.from_state(st["goodput"])

    def _check_resumable(self, saved: dict[str, Any], where: str) -> None:
        mine = recipe_dict(self.recipe)
        for key in _RESUME_KEYS:
            a, b = _dig(saved, key), _dig(mine, key)
            if a != b:
                raise ResumeError(
                    f"{where} was written with {key} = {a!r}, this recipe has {b!r}; "
                    "resume with the same model, data and batch settings (or use another --out)"
                )

    def _resume(self) -> None:
        """Continue from the newest verified checkpoint or in-memory replica, if resuming."""
        if not self.resume:
            self._after_restore(None)
            return
        found: Found | None = self.ckpt.latest()
        replica = self.replicas.restore() if self.replicas is not None else None
        if replica is not None and (found is None or replica[0] > found.step):
            step, payload, where = replica
            self._check_resumable(payload["trainer"]["recipe"], "the in-memory replica")
            restore_snapshot(self.raw_model, self.optimizer, payload["snap"])
            self._load_trainer_state(payload["trainer"])
            set_rng_state(payload["rng"])
            source = f"in-memory replica of step {step} ({where})"
        elif found is not None:
            self._check_resumable(found.trainer["recipe"], str(found.path))
            self.ckpt.load(found, self.model, self.optimizer)
            self._load_trainer_state(found.trainer)
            self._saved_step = found.step
            source = f"checkpoint {found.path}"
        else:
            self._start_fresh()
            self._after_restore(None)
            return
        self.goodput.restarts += 1
        self.metrics.truncate_after(self.step)
        event = {"kind": "event", "event": "resume", "step": self.step, "source": source}
        self.metrics.write(event)
        if self.info.is_main:
            print(f"geode train: resumed at step {self.step} from {source}", flush=True)
        self._after_restore(source)

    def _start_fresh(self) -> None:
        """No valid checkpoint or replica to resume from. If some were rejected, fail naming
        every bad file unless `allow_fresh`; otherwise (nothing was ever saved: a first start, or
        a restart before the first checkpoint) start from step 0. Either way the abandoned
        run's checkpoints and metrics are set aside, never mixed into this run."""
        bad = self.ckpt.rejected + (self.replicas.rejected if self.replicas is not None else [])
        partial = [f"{p}: a checkpoint write that never finished" for p in self.ckpt.partial()]
        if bad and not self.allow_fresh:
            listed = "\n".join(f"  - {x}" for x in bad + partial)
            raise ResumeError(
                f"cannot resume {self.out}: no valid checkpoint or in-memory replica:\n{listed}\n"
                "repair or remove them, or pass --allow-fresh to start again from step 0 (the "
                "abandoned run's checkpoints and metrics are then moved aside)"
            )
        stamp, moved = _stamp(), []
        if self.info.is_main:
            self.metrics.close()
            for path in (self.ckpt.root, self.out / "metrics.jsonl"):
                aside = _set_aside(path, stamp)
                if aside is not None:
                    moved.append(str(aside))
            self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=True)
        if self.replicas is not None:
            self.replicas.discard()
        barrier(self.info)
        why = "--allow-fresh" if bad else "no checkpoint or replica was saved yet"
        event = {"kind": "event", "event": "fresh_start", "step": 0, "reason": why}
        self.metrics.write({**event, "rejected": bad, "set_aside": moved})
        if self.info.is_main:
            print(
                f"geode train: nothing valid to resume in {self.out}; starting from step 0 ({why})"
                + "".join(f"\n  rejected: {x}" for x in bad)
                + (f"\n  set aside: {', '.join(moved)}" if moved else ""),
                flush=True,
            )

    def _after_restore(self, source: str | None) -> None:
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.toml").write_text(recipe_to_toml(self.recipe))
        if self.sdc_every:
            self._take_sdc_snapshot()

    # ------------------------------------------------------------------ data
    def _open_packed_data(self) -> None:
        """The recipe's prepared dataset (training streams + the held-out stream)."""
        recipe = self.recipe
        self.data = open_dataset(recipe.data.path)
        eval_path = recipe.data.eval_path or recipe.data.path
        if self.eval_source:
            self.eval_data = self.data if eval_path == recipe.data.path else open_dataset(eval_path)
            if self.eval_source not in self.eval_data.streams:
                raise DataError(
                    f"data.eval_source = {self.eval_source!r}: no such stream in {eval_path} "
                    f"(streams: {', '.join(self.eval_data.streams)})"
                )
        sources = list(recipe.data.sources)
        if not sources:
            sources = [
                s
                for s in self.data.streams
                if not (s == self.eval_source and eval_path == recipe.data.path)
            ]
        self.sources = sources

    def _train_loader(self) -> DataLoader:
        return DataLoader(
            self.data,
            batch_size=self.micro * self.accum,
            seq_len=self.recipe.data.seq_len,
            seed=self.recipe.data.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
            mixture=self.recipe.data.mixture,
            sources=self.sources,
        )

    # ------------------------------------------------------------------ step
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def train_step(self, replay: bool = False) -> dict[str, Any]:
        """Run optimizer step number self.step + 1; returns its metrics record."""
        t0 = time.perf_counter()
        step = self.step + 1
        if self.sdc_every:
            self._sdc_records[step] = param_checksum(self.raw_model)
        if not replay:
            self.faults.maybe_kill(step)
        batch = self.loader.next_batch()
        # Every micro-batch back-propagates its loss *sum*; the gradient is divided by the
        # normalizer summed over micro-batches and ranks after the last one (base.py).
        sums: dict[str, float] = {}
        normalizer = 0.0
        n_micro = max(1, -(-len(batch) // self.micro))
        for i in range(n_micro):
            mb = batch.rows(slice(i * self.micro, (i + 1) * self.micro)).to(self.info.device)
            with grad_sync(self.model, self.parallel, i == n_micro - 1):
                if self.router is not None:
                    self.router.clear()
                total, n, metrics = self.objective.loss_sum(self.model, mb)
                if self.router is not None:
                    total = self.router.add(total, n)  # + coef * aux * n (objectives/router.py)
                total.backward()
            normalizer += float(n)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        stats = torch.tensor(
            [normalizer, float(batch.loss_mask.sum()), *(sums[k] for k in keys)],
            dtype=torch.float64,
        )
        all_reduce_sum(stats, self.info)
        n_global = float(stats[0])
        self._scale_grads(self.info.world_size / max(n_global, 1.0))  # DDP/FSDP averaged over W
        gsum = grad_checksum(self.raw_model) if self._sdc_due(step) else None
        if not replay:
            self.faults.maybe_bitflip(step, self.raw_model, "grad")
        grad_norm = self._clip()
        lr = lr_at(self.step, self.recipe.optim, self.recipe.train.max_steps)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not replay:
            self.faults.maybe_bitflip(step, self.raw_model, "param")
        self.step = step
        self.tokens += int(stats[1])  # trained targets
        dt = time.perf_counter() - t0
        self.goodput.useful_s += dt
        self._step_times[step] = dt
        report = self.objective.report(
            {k: float(v) for k, v in zip(keys, stats[2:])}, n_global, training=True
        )
        if self.router is not None:
            report.update(self.router.report(n_global, self.info))
        rec: dict[str, Any] = {
            "kind": "train",
            "step": step,
            "loss": report.pop("loss"),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens,
            "step_s": dt,
            "tokens_per_s": self.micro * self.accum * self.info.world_size
            * self.recipe.data.seq_len / dt,
            **report,
        }  # fmt: skip
        if replay:
            rec["replay"] = True
        if gsum is not None:
            rec["_grad_checksum"] = gsum
        return rec

    def _scale_grads(self, factor: float) -> None:
        """Multiply every gradient by `factor` (the global normalisation of the loss sums)."""
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    def _clip(self) -> float:
        """Clip the global gradient norm (DTensor-aware); returns the norm before clipping."""
        max_norm = self.recipe.optim.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------ SDC
    def _sdc_due(self, step: int) -> bool:
        return bool(self.sdc_every) and step % self.sdc_every == 0

    def _take_sdc_snapshot(self) -> None:
        self._sdc_snap = {
            "snap": local_snapshot(self.raw_model, self.optimizer),
            "trainer": self._trainer_state(),
            "rng": rng_state(),
        }
        self._sdc_records.clear()
        self._step_times.clear()

    def _sdc_check(self, rec: dict[str, Any]) -> None:
        """Compare checksums across replicas; on a mismatch roll back, replay, name the rank."""
        step = self.step
        values = [param_checksum(self.raw_model), rec.pop("_grad_checksum", 0)]
        rows = compare_replicas(values, self.info)
        if not disagreeing(rows):
            self._take_sdc_snapshot()
            return
        snap = self._sdc_snap
        assert snap is not None
        start = snap["trainer"]["step"]
        self._sdc_records[step + 1] = values[0]  # the state that failed the check
        lost = sum(t for s, t in self._step_times.items() if s > start)
        records = dict(self._sdc_records)
        restore_snapshot(self.raw_model, self.optimizer, snap["snap"])
        self._load_trainer_state(snap["trainer"], goodput=False)
        set_rng_state(snap["rng"])
        self.goodput.useful_s -= lost
        first = None
        while True:
            s = self.step + 1
            if first is None and records.get(s) is not None:
                if param_checksum(self.raw_model) != records[s]:
                    first = s
            if s > step:
                break
            replayed = self.train_step(replay=True)
            replayed.pop("_grad_checksum", None)
            self.goodput.replayed_steps += 1
            self.metrics.write(replayed)
        faulty, at = name_faulty(first, self.info)
        event = {
            "kind": "event",
            "event": "sdc",
            "step": step,
            "detected_at": step,
            "faulty_ranks": faulty,
            "first_divergent_step": at,
            "rolled_back_to": start,
            "replayed_steps": step - start,
            "checksums": rows,
        }
        self.sdc_events.append(event)
        self.metrics.write(event)
        if self.info.is_main:
            who = f"rank {faulty[0]}" if len(faulty) == 1 else f"ranks {faulty}"
            msg = (
                f"SDC detected at step {step}: data-parallel replicas disagree "
                f"(param/grad checksums {rows}); deterministic replay from step {start} names "
                f"{who if faulty else 'no rank (transient fault in the comparison?)'}"
                f"{f' (its state differs from the replay from step {at} on)' if at else ''}; "
                f"rolled back and replayed {step - start} steps"
            )
            warnings.warn(msg, SDCWarning, stacklevel=2)
            print(f"geode train: {msg}", file=sys.stderr, flush=True)
        rows = compare_replicas([param_checksum(self.raw_model), 0], self.info)
        if disagreeing(rows):
            raise SDCError(
                f"replicas still disagree after rollback and replay at step {step} "
                f"(checksums {rows}): persistent fault on rank(s) {faulty}; take the host out"
            )
        self._take_sdc_snapshot()

    # ------------------------------------------------------------------ eval
    def _eval_rows(self) -> int:
        """Held-out sequences per eval batch, all ranks together (independent of world size)."""
        rows = self.recipe.eval.batch_size or self.recipe.batch.global_batch_size
        if rows % self.info.world_size:
            raise RecipeError(
                f"eval.batch_size = {rows} is not divisible by the world size "
                f"{self.info.world_size}"
            )
        return rows

    def _eval_loader(self, world: int | None = None, rank: int | None = None) -> DataLoader:
        w = self.info.world_size if world is None else world
        return DataLoader(
            self.eval_data,
            batch_size=self._eval_rows() // w,
            seq_len=self.recipe.data.seq_len,
            seed=self.recipe.data.seed + EVAL_SEED_OFFSET,
            rank=self.info.rank if rank is None else rank,
            world_size=w,
            sources=[self.eval_source],
        )

    def _eval_batches(self):
        """This rank's held-out batches (the same every time), or None without held-out data."""
        if self.train_data is not None:
            make = self.train_data.eval_batches
            return make() if make is not None else None
        if self.eval_data is None:
            return None
        loader = self._eval_loader()
        return (loader.next_batch() for _ in range(self.recipe.eval.batches))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics of the objective ("eval_loss", ...) on the same batches every time."""
        batches = self._eval_batches()
        if batches is None:
            return {}
        self.model.eval()
        sums: dict[str, float] = {}
        normalizer = 0.0
        for batch in batches:
            for i in range(0, len(batch), self.micro):  # forward passes of micro rows
                b = batch.rows(slice(i, i + self.micro)).to(self.info.device)
                _, n, metrics = self.objective.loss_sum(self.model, b)
                normalizer += float(n)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        stats = torch.tensor([normalizer, *(sums[k] for k in keys)], dtype=torch.float64)
        all_reduce_sum(stats, self.info)
        self.model.train()
        report = {k: float(v) for k, v in zip(keys, stats[1:])}
        return self.objective.report(report, float(stats[0]), training=False)

    # ------------------------------------------------------------------ run
    def fit(self) -> dict[str, Any]:
        """Train to train.max_steps; evaluate, checkpoint, export; returns the summary."""
        r, info = self.recipe, self.info
        max_steps = r.train.max_steps
        bar = None
        if info.is_main:  # a bar on a terminal, else a line every N s (geode/progress.py)
            from ..progress import progress

            bar = progress(max_steps, r.name, "step", initial=self.step, enabled=self.progress)
        t_fit = time.perf_counter()
        tok0 = self.tokens
        rec: dict[str, Any] = {}
        evaluated_at = -1
        while self.step < max_steps:
            rec = self.train_step()
            step = self.step
            if step % r.train.log_every == 0 or step == max_steps:
                self.metrics.write({k: v for k, v in rec.items() if not k.startswith("_")})
            if self._sdc_due(step):
                self._sdc_check(rec)
            if self.replicas is not None and step % r.fault.replica_every == 0:
                self.replicas.save(
                    step,
                    {
                        "snap": local_snapshot(self.raw_model, self.optimizer),
                        "trainer": self._trainer_state(),
                        "rng": rng_state(),
                    },
                )
            if r.eval.every and step % r.eval.every == 0:
                self._log_eval()
                evaluated_at = step
            if bar is not None:
                elapsed = time.perf_counter() - t_fit
                post = {"loss": f"{rec['loss']:.3f}", "lr": f"{rec['lr']:.2e}"}
                post["tok/s"] = f"{(self.tokens - tok0) / max(elapsed, 1e-9):,.0f}"
                if self.last_eval:
                    post["eval"] = f"{self.last_eval['eval_loss']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if (r.checkpoint.every and step % r.checkpoint.every == 0) and step < max_steps:
                self.ckpt.save(step, self.model, self.optimizer, self._trainer_state())
                self._saved_step = step
        if bar is not None:
            bar.close()
        if evaluated_at != self.step:
            self._log_eval()
        if self._saved_step != self.step:
            self.ckpt.save(self.step, self.model, self.optimizer, self._trainer_state())
            self._saved_step = self.step
        model_dir = self._export() if r.checkpoint.export else None
        summary = self._summary(time.perf_counter() - t_fit, self.tokens - tok0, model_dir)
        if self.replicas is not None:
            barrier(info)
            self.replicas.clear()
        self.metrics.close()
        torch.use_deterministic_algorithms(self._was_deterministic)
        return summary

    def _log_eval(self) -> None:
        ev = self.evaluate()
        if ev:
            self.last_eval = ev
            self.metrics.write({"kind": "eval", "step": self.step, "tokens": self.tokens, **ev})

    def _export(self) -> Path | None:
        """Write the final weights to OUT/model in the Hugging Face layout (rank 0)."""
        path = self.out / "model"
        if self.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(self.model, options=opts)
            model = None
            if self.info.is_main:
                with torch.device("meta"):
                    from ..model import Transformer

                    model = Transformer(self.config)
                model.load_state_dict(full, assign=True)
        else:
            model = unwrap(self.model)
        if self.info.is_main:
            files = {}
            if self.train_data is not None:
                tok = self.train_data.tokenizer
            else:
                tok = (self.data.manifest.get("tokenizer") or {}).get("path")
            if tok and Path(tok).is_file():  # exported under its kind's name
                files["tokenizer.json" if str(tok).endswith(".json") else "tokenizer.model"] = tok
            if self.recipe.lora is not None:  # OUT/adapter (peft layout) + merged OUT/model
                from .sft_lora import merged_copy, save_adapter

                save_adapter(model, self.out / "adapter", self.recipe.lora)
                model = merged_copy(model)
            self.objective.save_model(model, path, files)
        barrier(self.info)
        return path

    def _summary(self, seconds: float, tokens: int, model_dir: Path | None) -> dict[str, Any]:
        gp = self.goodput.report(time.time())
        last = read_metrics(self.out / "metrics.jsonl") if self.info.is_main else []
        train_losses = [x["loss"] for x in last if x.get("kind") == "train"]
        summary = {
            "name": self.recipe.name,
            "steps": self.step,
            "tokens": self.tokens,
            "final_train_loss": train_losses[-1] if train_losses else None,
            **self.last_eval,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "seconds": seconds,
            "world_size": self.info.world_size,
            "parallel": self.parallel,
            "sdc_events": self.sdc_events,
            **gp,
            "model": str(model_dir) if model_dir else None,
        }
        if self.info.is_main:
            import json

            self.metrics.write({"kind": "event", "event": "end", "step": self.step, **gp})
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            try:
                plot_curves(read_metrics(self.out / "metrics.jsonl"), self.out / "curves.png",
                            title=self.recipe.name)  # fmt: skip
            except Exception as e:  # a missing plotting backend must not fail a finished run
                print(f"geode train: could not draw curves.png ({e})", file=sys.stderr)
            print(
                f"geode train: {self.recipe.name}: {self.step} steps, {self.tokens:,} tokens, "
                f"{summary['tokens_per_s']:,.0f} tok/s"
                + (f", held-out loss {self.last_eval['eval_loss']:.4f}" if self.last_eval else "")
                + f"; goodput {gp['goodput']:.1%} (useful {gp['useful_s']:.1f}s of "
                f"{gp['wall_s']:.1f}s wall, {gp['restarts']} restarts, "
                f"{gp['replayed_steps']} replayed steps)",
                flush=True,
            )
        return broadcast_object(summary, self.info)


def _count_params(config: ModelConfig) -> int:
    """Parameters of the decoder with this config, any family (geode.family.parameter_counts)."""
    from ..family import parameter_counts

    return parameter_counts(config)["total"]


def _stamp() -> str:
    """UTC time for the names of set-aside files (metrics.abandoned-20260101T120000Z.jsonl)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _set_aside(path: Path, stamp: str) -> Path | None:
    """Rename `path` (a file or directory of an abandoned run) to NAME.abandoned-STAMP[.ext];
    None if it does not exist."""
    if not path.exists():
        return None
    dest = path.with_name(f"{path.stem}.abandoned-{stamp}{path.suffix}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.stem}.abandoned-{stamp}-{n}{path.suffix}")
    os.replace(path, dest)
    return dest


def _dig(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d
