"""Frozen copy of ``ColorAugment`` as of commit b02a0f8 (before the one-pass rewrite): the "before" of
``bench/augment.py`` and the reference of ``tests/test_augment.py``. Do not optimise this file.

Every colour step (brightness, contrast, saturation, hue) runs at each of the 4 positions for every image and is
kept with ``torch.where`` where it is that image's turn; each hue evaluation builds a ``[n, 3, 6, H, W]`` table.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.data.augment import ORDERS, sample_uniform
from pipeline.data.transfer import to_device

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor | float, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * x + (1.0 - ratio) * other).clamp(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    same = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(same, ones, maxc)
    cr_divisor = torch.where(same, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    sextant = i.unsqueeze(1) == torch.arange(6, device=i.device).view(1, -1, 1, 1)  # [n, 6, H, W]
    table = torch.stack((torch.stack((v, q, p, p, t, v), 1), torch.stack((t, v, v, q, p, p), 1),
                         torch.stack((p, p, t, v, v, q), 1)), 1)  # [n, 3, 6, H, W]
    return (table * sextant.unsqueeze(1)).sum(2)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    hue = torch.fmod(hsv[:, 0] + shift + 1.0, 1.0)
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


class ColorAugmentBefore(nn.Module):
    """The masked version: same constructor, ``forward`` and ``jitter`` as ``ColorAugment`` had at b02a0f8."""

    def __init__(self, mean, std, strength: float = 0.0, jitter_prob: float = 0.0, grayscale_prob: float = 0.0,
                 seed: int = 0):
        super().__init__()
        self.strength, self.jitter_prob, self.grayscale_prob, self.seed = strength, jitter_prob, grayscale_prob, seed
        self.random = (strength > 0 and jitter_prob > 0) or grayscale_prob > 0
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("orders", ORDERS.clone(), persistent=False)
        self.register_buffer("low", torch.tensor([max(0.0, 1 - strength), 1 - strength, 1 - strength,
                                                  -strength / 4]), persistent=False)
        self.register_buffer("high", torch.tensor([1 + strength] * 3 + [strength / 4]), persistent=False)

    def forward(self, images: torch.Tensor, epoch: int = 0, index: torch.Tensor | None = None,
                view: int = 0) -> torch.Tensor:
        x = to_device(images, self.mean.device).to(torch.float32) / 255.0
        if self.random:
            if index is None:
                raise ValueError("ColorAugment draws per sample: pass the batch's global sample indices")
            x = self.jitter(x, sample_uniform(self.seed, epoch, to_device(index, x.device), 8, stream=view))
        return (x - self.mean) / self.std

    def jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1, 1)
        applied = (u[:, 0] < self.jitter_prob).view(shape)
        factors = self.low + u[:, 1:5] * (self.high - self.low)  # [n, 4]
        order = self.orders[(u[:, 5] * 24).long().clamp_max(23)]  # [n, 4]
        for position in range(4):
            for step in range(4):
                turn = (order[:, position] == step).view(shape) & applied
                x = torch.where(turn, self._step(x, step, factors[:, step]), x)
        gray = (u[:, 6] < self.grayscale_prob).view(shape)
        return torch.where(gray, grayscale(x).expand_as(x), x)

    @staticmethod
    def _step(x: torch.Tensor, step: int, factor: torch.Tensor) -> torch.Tensor:
        ratio = factor.view(-1, 1, 1, 1)
        if step == BRIGHTNESS:
            return _blend(x, 0.0, ratio)
        if step == CONTRAST:
            return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), ratio)
        if step == SATURATION:
            return _blend(x, grayscale(x), ratio)
        return _adjust_hue(x, factor.view(-1, 1, 1))
