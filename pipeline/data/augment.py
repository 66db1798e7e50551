"""Batched, per-sample random colour augmentation and normalisation on the training device (kornia)."""
from __future__ import annotations

import torch
from torch import nn


class ColorAugment(nn.Module):
    """uint8 ``[n, 3, H, W]`` -> normalised float32 ``[n, 3, H, W]``.

    With probability ``jitter_prob`` a sample gets ColorJitter(brightness=contrast=saturation=s, hue=s/4),
    then with probability ``grayscale_prob`` it turns gray; each sample draws its own parameters.
    ``strength=0`` and both probabilities 0 give plain normalisation (the evaluation transform).
    """

    def __init__(self, mean, std, strength: float = 0.0, jitter_prob: float = 0.0, grayscale_prob: float = 0.0):
        super().__init__()
        import kornia.augmentation as K

        ops: list[nn.Module] = []
        if strength > 0 and jitter_prob > 0:
            ops.append(K.ColorJitter(strength, strength, strength, strength / 4, p=jitter_prob))
        if grayscale_prob > 0:
            ops.append(K.RandomGrayscale(p=grayscale_prob))
        self.random_ops = nn.Sequential(*ops)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device, torch.float32, non_blocking=True) / 255.0
        if len(self.random_ops):
            x = self.random_ops(x)
        return (x - self.mean) / self.std
