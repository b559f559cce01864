"""Switch Transformer's auxiliary load-balancing loss for routed (mixture-of-experts) layers.

Fedus, Zoph & Shazeer 2021 (arXiv:2101.03961), eq. 4-6, with top-k routing counted as in
transformers' `load_balancing_loss_func` (Mixtral and the other MoE models of transformers 5):

    loss = E * sum_i f_i * P_i
    f_i  = (1/R) sum_rows #{slots of the row's top-k routed to expert i}    (sums to k)
    P_i  = (1/R) sum_rows softmax(logits_row)_i

over the R rows of every layer together (padding rows left out when a mask is given). A
uniform router gives loss = k; the recipe's coefficient (Switch: 1e-2) scales it into the
training loss. f_i is a count and carries no gradient; the gradient reaches the router
through P_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """E * sum_i f_i P_i over all layers: router_logits per layer (N, E) pre-softmax -> scalar.

    attention_mask (B, T) with B*T == N marks real tokens (1) and padding (0) in every layer.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"load_balancing_loss: top_k={top_k} must be in 1..num_experts={num_experts}"
        )
    if len(router_logits) == 0:
        raise ValueError("load_balancing_loss: no router logits (the model has no MoE layer)")
    for i, layer in enumerate(router_logits):
        if layer.dim() != 2 or layer.shape[-1] != num_experts:
            raise ValueError(
                f"load_balancing_loss: router_logits[{i}] has shape {tuple(layer.shape)}, "
                f"expected (tokens, num_experts={num_experts})"
            )
    device = router_logits[0].device
    logits = torch.stack([layer.to(device) for layer in router_logits])  # (L, N, E)
    num_layers, n, _ = logits.shape
    if attention_mask is None:
        keep = torch.ones(n, dtype=torch.float32, device=device)  # (N,)
    else:
        if attention_mask.numel() != n:
            raise ValueError(
                f"load_balancing_loss: attention_mask has {attention_mask.numel()} entries "
                f"{tuple(attention_mask.shape)} but the router saw {n} tokens"
            )
        keep = attention_mask.reshape(-1).to(device=device, dtype=torch.float32)  # (N,)
    probs = torch.softmax(logits, dim=-1)  # (L, N, E), in the logits' dtype as transformers
    chosen = torch.topk(probs, top_k, dim=-1).indices  # (L, N, k)
    slot_weight = keep[None, :, None].expand(num_layers, n, top_k)  # (L, N, k)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    counts.scatter_add_(0, chosen.reshape(-1), slot_weight.reshape(-1))  # (E,)
    prob_sum = (probs.float() * keep[None, :, None]).sum(dim=(0, 1))  # (E,)
    rows = num_layers * keep.sum()
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))
