"""Frozen reference models: the distillation teacher, the DPO reference, the RL anchor.

A `Reference` wraps a model that never trains: eval mode, no gradient, forward passes under
the trainer's autocast. It gives logits and per-sequence log-probabilities of a batch's
trained targets,

    log pi_ref(y | x) = sum_t loss_mask_t * log softmax(z_t)[y_t]          (per row)

optionally cached on disk (`LogprobCache`) keyed by the SHA-256 of each row's content, so a
preference run computes the reference once (DPO, Rafailov et al. 2023, arXiv:2305.18290,
§4 uses pi_ref log-probs that never change) and a rerun or a second epoch reads them back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.loader import Batch
from ..fileio import atomic_write_bytes, sha256_file

CACHE_FORMAT = "geode-reference-logprobs"
CACHE_FILE = "reference_logprobs.json"


class IncompatibleReference(ValueError):
    """A reference model does not fit the policy (vocabulary, special ids, tokenizer) or its cache."""


def check_compatible(
    ref_cfg: Any,
    policy_cfg: Any,
    where: str,
    *,
    names: tuple[str, str] = ("reference", "policy"),
    error: type[ValueError] = IncompatibleReference,
) -> None:
    """Reference and policy must share the vocabulary and special ids (one tokenizer)."""
    ref, pol = names
    if ref_cfg.vocab_size != policy_cfg.vocab_size:
        raise error(
            f"{where}: {ref} vocab_size {ref_cfg.vocab_size} != {pol} vocab_size "
            f"{policy_cfg.vocab_size}; the two models need the same tokenizer"
        )
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        a, b = getattr(ref_cfg, name), getattr(policy_cfg, name)
        if a != b:
            raise error(f"{where}: {ref} {name} {a} != {pol} {name} {b}")


def check_tokenizer(
    ref_path: str | Path,
    tokenizer_sha256: str | None,
    where: str,
    *,
    error: type[ValueError] = IncompatibleReference,
) -> None:
    """If the reference ships a tokenizer file, it must be the one the data was tokenized with."""
    from ..tokenizer import find_tokenizer

    tok = find_tokenizer(ref_path) if Path(ref_path).is_dir() else None
    if tok is not None and tokenizer_sha256 and sha256_file(tok) != tokenizer_sha256:
        raise error(
            f"{where}: {tok} differs from the tokenizer the training data was tokenized with "
            f"(SHA-256 {tokenizer_sha256[:12]}...); policy and reference need one tokenizer"
        )


def row_keys(batch: Batch) -> list[str]:
    """SHA-256 per row of (tokens, positions, segment ids, loss mask) up to the row's last
    trained target: the cache key. Causal attention makes what follows (e.g. right padding,
    which depends on the other rows of a batch) irrelevant to the row's log-prob."""
    keys = []
    mask = batch.loss_mask.to("cpu")
    for b in range(len(batch)):
        trained = mask[b].nonzero()
        end = int(trained[-1]) + 1 if len(trained) else 0  # targets 0..end-1 (tokens 0..end)
        h = hashlib.sha256()
        for t in (batch.tokens, batch.positions, batch.segment_ids):
            h.update(t[b, : end + 1].to("cpu", torch.int64).numpy().tobytes())
        h.update(mask[b, :end].to(torch.int64).numpy().tobytes())
        keys.append(h.hexdigest())
    return keys


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, bytes): a reference's identity."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class LogprobCache:
    """Per-sequence reference log-probs on disk: one JSON file, rewritten atomically on flush.

    The file records the reference's identity (weights fingerprint, autocast dtype); opening
    it for another reference is an error rather than a silent reuse of stale values.
    """

    def __init__(self, root: str | Path, identity: dict[str, str]):
        self.path = Path(root) / CACHE_FILE
        self.identity = identity
        self.values: dict[str, float] = {}
        self._dirty = False
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                ok = data.get("format") == CACHE_FORMAT and isinstance(data.get("logprobs"), dict)
            except (OSError, ValueError) as e:
                raise IncompatibleReference(f"{self.path}: unreadable cache ({e})") from None
            if not ok:
                raise IncompatibleReference(f"{self.path}: not a {CACHE_FORMAT} file")
            if data.get("identity") != identity:
                raise IncompatibleReference(
                    f"{self.path}: cached for another reference ({data.get('identity')}), this "
                    f"one is {identity}; delete the file or choose another cache directory"
                )
            self.values = {k: float(v) for k, v in data["logprobs"].items()}

    def get(self, keys: list[str]) -> list[float | None]:
        """Cached values for `keys` (None where missing)."""
        return [self.values.get(k) for k in keys]

    def put(self, keys: list[str], values: list[float]) -> None:
        """Remember values (written by `flush`)."""
        self.values.update(zip(keys, values))
        self._dirty = True

    def flush(self) -> None:
        """Write the cache file atomically if anything changed."""
        if self._dirty:
            data = {"format": CACHE_FORMAT, "identity": self.identity, "logprobs": self.values}
            atomic_write_bytes(self.path, (json.dumps(data) + "\n").encode())
            self._dirty = False


class Reference:
    """A frozen model (eval mode, requires_grad False): logits and sequence log-probs, no grad."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str = "reference",
        autocast_dtype: torch.dtype | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.autocast_dtype = autocast_dtype
        self.cache: LogprobCache | None = None
        if cache_dir:
            identity = {
                "weights_sha256": model_fingerprint(model),
                "autocast": str(autocast_dtype).removeprefix("torch.")
                if autocast_dtype
                else "none",
            }
            self.cache = LogprobCache(cache_dir, identity)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        policy_config: Any,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tokenizer_sha256: str | None = None,
        where: str = "reference",
        **kwargs: Any,
    ) -> Reference:
        """Load a checkpoint as a reference, checking it fits the policy (`where` names the field)."""
        from ..checkpoint import load_model, read_config

        check_compatible(read_config(path), policy_config, f"{where} = {str(path)!r}")
        check_tokenizer(path, tokenizer_sha256, f"{where} = {str(path)!r}")
        return cls(load_model(path, dtype=dtype, device=device), name=str(path), **kwargs)

    @classmethod
    def for_trainer(
        cls, trainer: Any, path: str | Path, where: str, *, tokenizer: bool = True, **kwargs: Any
    ) -> Reference:
        """`load` beside a trainer's policy: its config, dtype, device and autocast; with
        `tokenizer`, the checkpoint's tokenizer must be the training data's."""
        data = getattr(trainer, "train_data", None)
        sha = (getattr(data, "tokenizer_sha256", None) or None) if tokenizer else None
        return cls.load(
            path,
            policy_config=trainer.config,
            dtype=trainer.raw_model.dtype,
            device=trainer.info.device,
            tokenizer_sha256=sha,
            where=where,
            autocast_dtype=trainer.autocast_dtype,
            **kwargs,
        )

    @classmethod
    def snapshot(cls, model: nn.Module, **kwargs: Any) -> Reference:
        """A frozen copy of `model` as it is now (the DPO reference or RL anchor = the init)."""
        import copy

        return cls(copy.deepcopy(model), **kwargs)

    @property
    def device(self) -> torch.device:
        """Where the reference's weights live."""
        return next(self.model.parameters()).device

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits (B, T, V) of the reference on `batch` (no gradient)."""
        with self._autocast():
            return self.model(**batch.to(self.device).model_inputs())

    @torch.no_grad()
    def sequence_logprobs(self, batch: Batch) -> torch.Tensor:
        """(B,) float32 summed log-probs of each row's trained targets; cached when configured."""
        from .objectives.base import sequence_logprobs

        if self.cache is None:
            return sequence_logprobs(self.logits(batch), batch).cpu()
        keys = row_keys(batch)
        got = self.cache.get(keys)
        todo = [i for i, v in enumerate(got) if v is None]
        if todo:
            sub = batch.rows(torch.tensor(todo)) if len(todo) < len(keys) else batch
            values = sequence_logprobs(self.logits(sub), sub.to(self.device)).cpu().tolist()
            self.cache.put([keys[i] for i in todo], values)
            for i, v in zip(todo, values):
                got[i] = v
        return torch.tensor(got, dtype=torch.float32)

    def flush(self) -> None:
        """Write the log-prob cache (if any) to disk."""
        if self.cache is not None:
            self.cache.flush()
