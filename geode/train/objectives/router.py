"""The MoE term of every objective: the load-balancing loss and the router statistics.

A model with routed layers (Gemma 4 with `enable_moe_block`) keeps each MoE layer's last
(router_logits (N, E), expert_load (E,)) in `DecoderLayer.routing`. After an objective's
`loss_sum` ran the forward pass, the trainer adds (loop.py, one place for every objective)

    sum <- sum + coef * aux * n        aux = load_balancing_loss(router logits of all layers)

where n is the micro-batch's normalizer, so the step's update is

    d/dθ [ sum_mb (loss_sum_mb + coef * aux_mb * n_mb) ] / N  =  loss mean + coef * mean aux

(aux weighted by each micro-batch's share of N). With one micro-batch this is transformers'
`loss + router_aux_loss_coef * aux_loss` (e.g. `MixtralForCausalLM.forward`). The balancing
loss is Switch's (Fedus et al. 2021, arXiv:2101.03961, eq. 4-6; balance.py). Like
transformers' it is computed per forward pass (per micro-batch): f_i and P_i are batch
statistics, so a different micro-batch split changes it slightly.

Router statistics come from the token-expert assignments counted exactly over the whole
step (all micro-batches and ranks): per layer the load fraction of each expert (sums to 1;
balanced: 1/E), summarised as its max, min and normalised entropy H(load) / ln E
(1 = balanced). There is no expert capacity (moe.py), so no token is ever dropped and no
dropped-token count is reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import DistInfo, all_reduce_sum
from .balance import load_balancing_loss

SWITCH_AUX_COEF = 1e-2  # Switch Transformer's alpha (arXiv:2101.03961 §2.2)


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of `model` (any wrapper around it) that carry an MoE block."""
    from ...model.transformer import DecoderLayer

    return [m for m in model.modules() if isinstance(m, DecoderLayer) and m.moe]


def config_aux_coef(init: str) -> float | None:
    """`router_aux_loss_coef` of a checkpoint's config.json (top level or text_config), if set."""
    if not init:
        return None
    path = Path(init) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_model reports a missing or broken config by name
    for table in (config, config.get("text_config") or {}):
        value = table.get("router_aux_loss_coef")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{path}: router_aux_loss_coef = {value!r}: must be a number >= 0")
            return float(value)
    return None


def resolve_aux_coef(recipe: Any) -> float:
    """The recipe's `objective.router_aux_loss_coef`, else the checkpoint's, else Switch's 0.01."""
    coef = recipe.objective.router_aux_loss_coef
    if coef is None:
        coef = config_aux_coef(recipe.model.init)
    return SWITCH_AUX_COEF if coef is None else float(coef)


class RouterTerm:
    """The balancing term and routing statistics of the MoE layers of one trained model."""

    def __init__(self, layers: list[nn.Module], num_experts: int, top_k: int, coef: float):
        self.layers, self.num_experts, self.top_k, self.coef = layers, num_experts, top_k, coef
        self.reset()

    @classmethod
    def for_model(cls, model: nn.Module, config: Any, coef: float) -> RouterTerm | None:
        """The term of `model` (config: its ModelConfig); None when it has no MoE layer."""
        layers = moe_layers(model)
        if not layers:
            return None
        return cls(layers, config.num_experts, config.top_k_experts, coef)

    def reset(self) -> None:
        """Forget the step's sums: [normalizer-weighted aux, counts (L*E)], on the model's device
        (read once per step in `report`, so micro-batches add no device-to-host sync)."""
        self.sums: torch.Tensor | None = None

    def clear(self) -> None:
        """Drop the layers' last routing, so a forward pass that skipped them is caught."""
        for layer in self.layers:
            layer.routing = None

    def routings(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each MoE layer's (router_logits (N, E), expert_load (E,)) of the last forward pass."""
        missing = [i for i, layer in enumerate(self.layers) if layer.routing is None]
        if missing:
            raise RuntimeError(
                f"MoE layers {missing} (of {len(self.layers)}) kept no routing: the objective's "
                "forward pass did not run them"
            )
        return [layer.routing for layer in self.layers]

    def aux_loss(self) -> torch.Tensor:
        """Switch balancing loss over every MoE layer of the last forward pass (scalar)."""
        logits = [r[0] for r in self.routings()]
        return load_balancing_loss(logits, self.num_experts, self.top_k)

    def add(self, total: torch.Tensor, normalizer: float) -> torch.Tensor:
        """`total` + coef * aux * normalizer (with gradient); counts and aux enter the step sums."""
        routings = self.routings()
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.coef > 0):
            aux = self.aux_loss()
        with torch.no_grad():
            slots = routings[0][0].shape[0] * self.top_k  # token-expert assignments per layer
            counts = (torch.stack([r[1] for r in routings]).double() * slots).round()  # (L, E)
            step = torch.cat([aux.detach().double().reshape(1) * normalizer, counts.reshape(-1)])
            self.sums = step if self.sums is None else self.sums + step
        self.clear()  # the next forward pass sets them again
        return total + self.coef * normalizer * aux if self.coef > 0 else total

    def report(self, normalizer: float, info: DistInfo) -> dict[str, Any]:
        """Step metrics (all ranks summed; collective): aux loss and load summaries."""
        size = 1 + len(self.layers) * self.num_experts
        stats = torch.zeros(size, dtype=torch.float64) if self.sums is None else self.sums.cpu()
        all_reduce_sum(stats, info)
        counts = stats[1:].reshape(len(self.layers), self.num_experts)  # (L, E)
        self.reset()
        load = counts / counts.sum(-1, keepdim=True).clamp(min=1)  # (L, E) fractions
        entropy = -torch.where(load > 0, load * load.log(), torch.zeros_like(load)).sum(-1)
        entropy = entropy / math.log(self.num_experts) if self.num_experts > 1 else entropy + 1
        return {
            "router_aux_loss": float(stats[0]) / max(normalizer, 1.0),
            "router_load_max": float(load.max()),  # the most loaded expert of any layer
            "router_load_min": float(load.min()),  # the least loaded expert of any layer
            "router_load_entropy": float(entropy.mean()),  # mean over layers, 1 = balanced
            "router_layers": {
                "load_max": [round(float(x), 6) for x in load.max(-1).values],
                "load_min": [round(float(x), 6) for x in load.min(-1).values],
                "entropy": [round(float(x), 6) for x in entropy],
            },
        }
