"""Gemma 3 distillation: cross-entropy to K sampled, renormalised teacher probabilities.

Gemma 3 Technical Report (arXiv:2503.19786), §2.2 "Distillation": "We sample 256 logits per
token, weighted by teacher probabilities. The student learns the teacher's distribution
within these samples via cross-entropy loss. The teacher's target distribution is set to zero
probability for non-sampled logits, and renormalized." For one token, with teacher
probabilities p = softmax(z_t / tau) and a sampled set S of K vocabulary ids:

    q_i = p_i / sum_{j in S} p_j   for i in S,   q_i = 0 otherwise
    L   = - sum_{i in S} q_i log softmax(z_s)_i                             (student logits z_s)

S is drawn without replacement with probability proportional to p (Gumbel-top-K: the K
largest log p_i + g_i, g_i ~ Gumbel(0, 1); Vieira 2014, Kool et al. 2019 arXiv:1903.06059),
or is the K most probable ids with `sampling = "top"`. The noise is seeded by the data window
(source, window index), so a target is a function of the window alone: the online mode (the
teacher runs in-process) and the offline mode (targets precomputed into a compact cache of
ids + probabilities, the teacher absent at student time) give the same targets.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CACHE_FORMAT = "geode-distill-cache"
CACHE_FILE = "cache.json"


class DistillError(ValueError):
    """Teacher and student do not fit together, or a target cache does not fit the run."""


def window_seed(seed: int, source: str, window: int) -> int:
    """The noise seed of one data window (stable across runs, ranks and world sizes)."""
    return (seed * 1_000_003 + zlib.crc32(source.encode()) * 7_919 + window) % (2**63 - 1)


@torch.no_grad()
def sample_targets(
    logits: torch.Tensor,
    k: int,
    sampling: str = "sample",
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits (..., V) -> sampled ids (..., K) int64 and renormalised q (..., K) float32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    k = min(k, logp.shape[-1])
    if sampling == "top":
        keys = logp
    elif sampling == "sample":
        dev = generator.device if generator is not None else logp.device
        u = torch.rand(logp.shape, generator=generator, device=dev).to(logp.device)
        e = -torch.log(u.clamp_min(1e-20))  # (..., V) Exponential(1) samples
        gumbel = -torch.log(e.clamp_min(1e-20))  # (..., V) Gumbel(0, 1) = -log(-log u)
        keys = logp + gumbel
    else:
        raise ValueError(f"distill.sampling {sampling!r} is unknown; use 'sample' or 'top'")
    ids = keys.topk(k, dim=-1).indices  # (..., K)
    q = torch.softmax(logp.gather(-1, ids), dim=-1)  # (..., K) = p_S / sum p_S
    return ids, q


def targets_for_batch(
    teacher_logits: torch.Tensor,
    sources: list[str],
    windows: list[int],
    k: int,
    sampling: str,
    temperature: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row seeded `sample_targets`: logits (B, T, V) -> ids, q (B, T, K)."""
    ids, qs = [], []
    for b in range(teacher_logits.shape[0]):
        g = torch.Generator(teacher_logits.device)
        g.manual_seed(window_seed(seed, sources[b], windows[b]))
        i, q = sample_targets(teacher_logits[b], k, sampling, temperature, g)
        ids.append(i)
        qs.append(q)
    return torch.stack(ids), torch.stack(qs)


@torch.no_grad()
def student_rollout(
    engine: Any, batch: Any, n: int, temperature: float, seeds: list[int]
) -> tuple[Any, torch.Tensor]:
    """On-policy rows: the student (driving `engine`) rewrites the last `n` tokens of each row.

    Each row keeps its first T+1-n tokens; the document that is open at the cut is the
    prompt (the engine sees it from its start, as the model does under segment masking), and
    `n` sampled tokens continue it (eos ignored, seeded per row by `seeds`). Returns the new
    batch (positions and segment ids continue that document) and `real` (B, T) bool: True
    where the next-token target is still data, not a student sample (GKD, arXiv:2306.13649).
    """
    from ..infer import Request

    tokens, positions, segments = (
        t.clone() for t in (batch.tokens, batch.positions, batch.segment_ids)
    )  # (B, T+1) each
    B, T1 = tokens.shape
    cut = T1 - n  # tokens kept per row
    requests = []
    for b in range(B):
        seg = segments[b, cut - 1]
        start = int((segments[b, :cut] == seg).nonzero()[0])  # its document starts here
        requests.append(
            Request(tokens[b, start:cut].tolist(), max_new_tokens=n, temperature=temperature,
                    ignore_eos=True, seed=seeds[b])
        )  # fmt: skip
    results = engine.generate(requests)
    for b, res in enumerate(results):
        tokens[b, cut:] = torch.tensor(res.token_ids[:n], dtype=tokens.dtype)
        segments[b, cut:] = segments[b, cut - 1]
        positions[b, cut:] = positions[b, cut - 1] + 1 + torch.arange(n)
    real = torch.zeros(B, T1 - 1, dtype=torch.bool)
    real[:, : cut - 1] = True  # target t is token t+1
    out = type(batch)(tokens, positions, segments, batch.sources, batch.windows)
    return out, real


def distill_loss_sum(
    student_logits: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """sum over unmasked tokens of -sum_k q_k log softmax(z_s)[ids_k].

    student_logits (B, T, V), ids (B, T, K) int64, q (B, T, K), mask (B, T) bool.
    """
    logp = torch.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    ce = -(q.float() * logp.gather(-1, ids)).sum(-1)  # (B, T)
    return (ce * mask).sum()


def target_entropy_sum(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over unmasked tokens of H(q) = -sum_k q_k log q_k (so KL = CE - H)."""
    h = -(q.float() * torch.log(q.float().clamp_min(1e-30))).sum(-1)  # (B, T)
    return (h * mask).sum()


# ------------------------------------------------------------------------------ offline
class TargetCache:
    """Precomputed teacher targets per data window: ids (S, T, K) and q (S, T, K) per stream.

    Files: cache.json (settings), <stream>.ids (uint16 or uint32), <stream>.q (float16),
    <stream>.done (uint8 per window). Memory-mapped; only the windows a run uses are filled
    (the files are sparse on disk until written).
    """

    def __init__(self, root: Path, meta: dict[str, Any], writable: bool = False):
        self.root, self.meta = Path(root), meta
        self.T, self.K = int(meta["seq_len"]), int(meta["top_k"])
        self.id_dtype = np.dtype(meta["id_dtype"])
        mode = "r+" if writable else "r"
        self.ids, self.q, self.done = {}, {}, {}
        for name, n in meta["streams"].items():
            shape = (n, self.T, self.K)
            self.ids[name] = np.memmap(
                self.root / f"{name}.ids", self.id_dtype, mode=mode, shape=shape
            )
            self.q[name] = np.memmap(self.root / f"{name}.q", np.float16, mode=mode, shape=shape)
            self.done[name] = np.memmap(self.root / f"{name}.done", np.uint8, mode=mode, shape=(n,))

    @classmethod
    def create(cls, root: Path, meta: dict[str, Any]) -> TargetCache:
        """Allocate (sparse) files for every stream and write cache.json."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        isz = np.dtype(meta["id_dtype"]).itemsize
        for name, n in meta["streams"].items():
            cells = n * int(meta["seq_len"]) * int(meta["top_k"])
            for suffix, nbytes in (("ids", cells * isz), ("q", cells * 2), ("done", n)):
                path = root / f"{name}.{suffix}"
                if not path.exists() or path.stat().st_size != nbytes:
                    with open(path, "wb") as f:
                        f.truncate(nbytes)
        tmp = root / f".{CACHE_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, root / CACHE_FILE)
        return cls(root, meta, writable=True)

    @classmethod
    def open(cls, root: Path, expect: dict[str, Any], writable: bool = False) -> TargetCache:
        """Open an existing cache; its settings must equal `expect` (else DistillError)."""
        path = Path(root) / CACHE_FILE
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DistillError(f"{path}: cannot read the distillation cache ({e})") from None
        for key, value in expect.items():
            if meta.get(key) != value:
                raise DistillError(
                    f"{path}: cache has {key} = {meta.get(key)!r}, this run needs {value!r} "
                    "(delete the cache or point distill.cache elsewhere)"
                )
        return cls(root, meta, writable)

    def missing(self, stream: str, windows: np.ndarray) -> np.ndarray:
        """The subset of `windows` of `stream` not yet filled."""
        return windows[self.done[stream][windows] == 0]

    def put(self, stream: str, window: int, ids: torch.Tensor, q: torch.Tensor) -> None:
        """Store one window's targets (T, K)."""
        self.ids[stream][window] = ids.cpu().numpy().astype(self.id_dtype)
        self.q[stream][window] = q.cpu().numpy().astype(np.float16)
        self.done[stream][window] = 1

    def flush(self) -> None:
        """Write memory-mapped changes to disk."""
        for d in (self.ids, self.q, self.done):
            for m in d.values():
                m.flush()

    def get(self, stream_names: list[str], windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T, K) int64 and q (B, T, K) float32 for rows (source name, window)."""
        ids, qs = [], []
        for name, w in zip(stream_names, windows):
            if not self.done[name][w]:
                raise DistillError(
                    f"{self.root}: window {w} of stream {name!r} has no cached targets "
                    "(the cache was built for fewer steps; rebuild it with the teacher)"
                )
            ids.append(torch.from_numpy(self.ids[name][w].astype(np.int64)))
            qs.append(torch.from_numpy(self.q[name][w].astype(np.float32)))
        q = torch.stack(qs)  # (B, T, K), renormalised again after the float16 rounding
        return torch.stack(ids), q / q.sum(-1, keepdim=True)


def dense_target(ids: torch.Tensor, q: torch.Tensor, vocab: int) -> torch.Tensor:
    """(…, K) ids and q -> dense (…, V) distribution with zeros off the sampled set (for tests)."""
    out = torch.zeros(*ids.shape[:-1], vocab, dtype=torch.float32, device=q.device)
    return out.scatter_add_(-1, ids, q.float())


def kl_dense_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor):
    """sum over unmasked tokens of KL(p_teacher || p_student) with the full vocabulary."""
    lt = torch.log_softmax(teacher_logits.float(), -1)  # (B, T, V)
    ls = torch.log_softmax(student_logits.float(), -1)  # (B, T, V)
    kl = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)  # (B, T)
    return (kl * mask).sum()
