"""Colour augmentation and normalisation on the training device: batched, per-sample, seeded, no host sync.

``ColorAugment`` does what torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)`` followed by
``RandomGrayscale(p_gray)`` does to each image, with the same operations (torchvision's blend formulas, its
grayscale weights, hue through HSV), the same parameter ranges and the same per-image random order of the four
colour steps, for a whole batch at once. Every random number comes from ``sample_uniform(seed, epoch, index,
draw)``, a counter-based hash of the sample's global index, so an image is augmented the same way whatever the
worker count, loader threads or batch it lands in, and a resumed epoch repeats its augmentation exactly. Nothing
reads a tensor back to the host: a branch is a mask, never an ``if`` on device data.

Shapes: images uint8 ``[n, 3, H, W]`` (any memory format), indices int64 ``[n]``; output float32 ``[n, 3, H, W]``.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from pipeline.data.transfer import to_device

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
ORDERS = torch.tensor(list(itertools.permutations(range(4))))  # [24, 4]: torchvision's randperm(4), uniformly
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def _mix_int(x: int) -> int:
    """``_mix`` on a python int, as a signed 64-bit value (a kernel argument: no copy to the device)."""
    x &= (1 << 64) - 1
    for bits, factor in ((30, _MIX1), (27, _MIX2)):
        x = ((x ^ (x >> bits)) * (factor & ((1 << 64) - 1))) & ((1 << 64) - 1)
    x ^= x >> 31
    return x - (1 << 64) if x >= 1 << 63 else x


def sample_uniform(seed: int, epoch: int, index: torch.Tensor, draws: int, stream: int = 0) -> torch.Tensor:
    """``[n, draws]`` float32 uniforms in [0, 1), a function of (seed, epoch, stream, sample index) only:
    SplitMix64 over ``mix(index * golden + mix(key)) + j * golden`` for draws j = 1..draws."""
    key = _mix_int(_mix_int(_mix_int(seed) + epoch) + stream)
    base = _mix(index.to(torch.int64) * _GOLDEN + key)
    counters = torch.arange(1, draws + 1, device=index.device, dtype=torch.int64) * _GOLDEN
    bits = _shift_right(_mix(base[:, None] + counters[None, :]), 40)  # the top 24 bits
    return bits.to(torch.float32) / float(1 << 24)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W] -> [n, 1, H, W]`` luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor | float, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``ratio * x + (1 - ratio) * other``, clamped to [0, 1]; ratio ``[n, 1, 1, 1]``."""
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
    """torchvision's ``adjust_hue``: rotate the hue by ``shift`` (in turns, ``[n, 1, 1]``)."""
    hsv = _rgb_to_hsv(x)
    hue = torch.fmod(hsv[:, 0] + shift + 1.0, 1.0)
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


class ColorAugment(nn.Module):
    """uint8 ``[n, 3, H, W]`` -> normalised float32 ``[n, 3, H, W]``.

    With probability ``jitter_prob`` an image gets ColorJitter(brightness=contrast=saturation=s, hue=s/4): its
    four steps in a random order, factors drawn from [1 - s, 1 + s] (brightness from [max(0, 1 - s), 1 + s]) and
    a hue shift from [-s/4, s/4]; then with probability ``grayscale_prob`` it turns gray. ``strength=0`` and both
    probabilities 0 give plain normalisation (the evaluation transform, ``forward(images)``). The random draws of
    an image are ``sample_uniform(seed, epoch, index, 8, stream=view)``.
    """

    def __init__(self, mean, std, strength: float = 0.0, jitter_prob: float = 0.0, grayscale_prob: float = 0.0,
                 seed: int = 0):
        super().__init__()
        self.strength, self.jitter_prob, self.grayscale_prob, self.seed = strength, jitter_prob, grayscale_prob, seed
        self.random = (strength > 0 and jitter_prob > 0) or grayscale_prob > 0
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("orders", ORDERS.clone(), persistent=False)
        # per colour step: the factor range, [1 - s, 1 + s] (brightness from max(0, 1 - s)) and hue [-s/4, s/4]
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
        """Colour jitter and grayscale of ``x`` in [0, 1] with the uniforms ``u`` ``[n, 8]``."""
        shape = (-1, 1, 1, 1)
        applied = (u[:, 0] < self.jitter_prob).view(shape)
        factors = self.low + u[:, 1:5] * (self.high - self.low)  # [n, 4]
        order = self.orders[(u[:, 5] * 24).long().clamp_max(23)]  # [n, 4]: the step at each position
        for position in range(4):  # each step at each position, kept where it is that image's turn
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
