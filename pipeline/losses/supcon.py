"""SupCon, the "outside" form (Khosla et al., 2020): the baseline VarCon is compared against.

For unit embeddings ``z`` ``[B, D]`` and labels ``[B]``, with P(i) the other views sharing i's label and A(i) all
other views:

    L_i = -(tau / base_tau) * mean_{p in P(i)} [ z_i.z_p / tau - log sum_{a in A(i)} exp(z_i.z_a / tau) ]

averaged over the anchors that have at least one positive. Cost O(B^2 D). Computed in float32.
"""
from __future__ import annotations

import torch

from pipeline.losses._inputs import check_inputs


class SupConLoss(torch.nn.Module):
    def __init__(self, temperature: float = 0.1, base_temperature: float = 0.07) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0 (SupCon uses 0.1)")
        if not base_temperature > 0:
            raise ValueError(f"base_temperature={base_temperature} must be > 0 (SupCon uses 0.07)")
        self.temperature, self.base_temperature = float(temperature), float(base_temperature)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_inputs(z, labels)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            n = z.shape[0]
            self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
            positives = (labels[:, None] == labels[None, :]) & ~self_mask  # [B, B]
            logits = z @ z.T / self.temperature
            logits = logits - logits.max(dim=1, keepdim=True).values.detach()
            logits = logits.masked_fill(self_mask, float("-inf"))  # the anchor is not in A(i)
            log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
            num_pos = positives.sum(1)
            pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
            has_pos = num_pos > 0
            mean_log_prob = pos_log_prob / num_pos.clamp(min=1)
            per_anchor = -(self.temperature / self.base_temperature) * mean_log_prob
            loss = (per_anchor * has_pos).sum() / has_pos.sum().clamp(min=1)
        return loss, {"anchors_with_positive": has_pos.float().mean().detach()}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, base_temperature={self.base_temperature}"
