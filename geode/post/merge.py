"""Weight merging over state dicts: EMA, SLERP of task vectors, LITI, linear interpolation.

WARP (Rame et al. 2024, arXiv:2406.16768) uses three:
  EMA    theta_ema <- (1 - mu) theta_ema + mu theta            (the KL anchor during RL, eq. 3)
  SLERP  of the task vectors d_m = theta_m - theta_init, per tensor, with Omega the angle between
         d_1 and d_2:  slerp(theta_init, theta_1, theta_2, lam)
           = theta_init + sin((1 - lam) Omega) / sin(Omega) d_1 + sin(lam Omega) / sin(Omega) d_2
         (eq. 4; M > 2 policies are merged iteratively, lam = 1/m at step m)
  LITI   theta <- (1 - eta) theta_init + eta theta_slerp      (eq. 5)

All arithmetic is float32; results take each tensor's dtype. Non-float tensors (integer buffers)
must be equal in every model and are copied. Key or shape mismatches raise naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]
PARALLEL_EPS = 1e-6  # |sin Omega| below this: task vectors (anti)parallel, interpolate linearly


def lerp(a: StateDict, b: StateDict, t: float) -> dict[str, torch.Tensor]:
    """(1 - t) a + t b per tensor."""
    _check_same(a=a, b=b)
    return {k: _combine(k, (a[k], b[k]), lambda x, y: (1 - t) * x + t * y) for k in a}


def liti(init: StateDict, merged: StateDict, eta: float) -> dict[str, torch.Tensor]:
    """LITI (WARP eq. 5): (1 - eta) theta_init + eta theta_merged."""
    return lerp(init, merged, eta)


def slerp(init: StateDict, a: StateDict, b: StateDict, lam: float) -> dict[str, torch.Tensor]:
    """SLERP of the task vectors a - init and b - init per tensor (WARP eq. 4), plus init."""
    _check_same(init=init, a=a, b=b)
    return {
        k: _combine(k, (init[k], a[k], b[k]), lambda i, x, y: _slerp(i, x, y, lam)) for k in init
    }


def slerp_merge(init: StateDict, models: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """SLERP of M >= 1 models fine-tuned from `init`, iteratively with lam = 1/m at step m."""
    if not models:
        raise ValueError("slerp_merge: no models")
    merged = dict(models[0])
    for m, model in enumerate(models[1:], 2):
        merged = slerp(init, merged, model, 1.0 / m)
    return merged


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, mu: float) -> None:
    """In place: theta_ema <- (1 - mu) theta_ema + mu theta (WARP eq. 3), float32 math."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"ema_update: mu must be in [0, 1], got {mu}")
    target, source = ema.state_dict(), model.state_dict()
    _check_same(ema=target, model=source)
    for k, t in target.items():
        s = source[k]
        if t.is_floating_point():
            t.copy_(((1 - mu) * t.float() + mu * s.float()).to(t.dtype))
        elif not torch.equal(t, s):
            raise ValueError(f"ema_update: non-float tensor {k!r} differs between the models")


def _slerp(init: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """One tensor: init + SLERP of the task vectors a - init and b - init (float32)."""
    da, db = a - init, b - init
    na, nb = da.norm(), db.norm()
    if na == 0 or nb == 0:  # a zero task vector has no direction
        return init + (1 - lam) * da + lam * db
    cos = torch.clamp((da * db).sum() / (na * nb), -1.0, 1.0)
    omega = torch.arccos(cos).item()
    s = math.sin(omega)
    if abs(s) < PARALLEL_EPS:
        return init + (1 - lam) * da + lam * db
    return init + (math.sin((1 - lam) * omega) / s) * da + (math.sin(lam * omega) / s) * db


def _combine(name: str, tensors: tuple[torch.Tensor, ...], fn) -> torch.Tensor:
    """fn over float32 copies, cast to the first tensor's dtype; non-floats must all be equal."""
    first = tensors[0]
    if not first.is_floating_point():
        if any(not torch.equal(first, t) for t in tensors[1:]):
            raise ValueError(f"merge: non-float tensor {name!r} differs between the models")
        return first.clone()
    return fn(*(t.float() for t in tensors)).to(first.dtype)


def _check_same(**states: StateDict) -> None:
    """Raise naming the tensor when the state dicts' keys or shapes differ."""
    names = list(states)
    ref_name, ref = names[0], states[names[0]]
    for name in names[1:]:
        other = states[name]
        missing, extra = sorted(set(ref) - set(other)), sorted(set(other) - set(ref))
        if missing or extra:
            raise ValueError(
                f"merge: {name} lacks tensors {missing[:5]} and has extra {extra[:5]} "
                f"compared with {ref_name}"
            )
        for k, v in ref.items():
            if other[k].shape != v.shape:
                raise ValueError(
                    f"merge: tensor {k!r} has shape {tuple(other[k].shape)} in {name}, "
                    f"{tuple(v.shape)} in {ref_name}"
                )
