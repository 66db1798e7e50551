"""Cross-entropy baseline: ``z`` are class logits ``[B, K]`` from a linear classifier on the encoder."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses._inputs import check_inputs


class CrossEntropyLoss(torch.nn.Module):
    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_inputs(z, labels)
        with torch.autocast(device_type=z.device.type, enabled=False):
            logits = z.float()
            loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(1) == labels).float().mean()
        return loss, {"train_top1": accuracy}
