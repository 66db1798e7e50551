"""Colour augmentation and normalisation on the training device: batched, per-sample, seeded, no host sync.

``ColorAugment`` does what torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)`` followed by
``RandomGrayscale(p_gray)`` does to each image, with the same operations (torchvision's blend formulas, its
grayscale weights, hue through HSV), the same parameter ranges and the same per-image random order of the four
colour steps, for a whole batch at once. Every random number comes from ``sample_uniform(seed, epoch, index,
draw)``, a counter-based hash of the sample's global index, so an image is augmented the same way whatever the
worker count, loader threads or batch it lands in, and a resumed epoch repeats its augmentation exactly. Nothing
reads a tensor back to the host: a branch is a mask, never an ``if`` on device data.

One pass per step, not one per (position, step): brightness, contrast and saturation are all blends
``clamp(r * x + (1 - r) * T)`` with T = 0, the image's gray mean or the pixel's gray, so a position is one blend
with per-image ``r`` and T. Each image's 3 blends are laid out around one shared hue slot::

    blend slots 0 1 2 | hue | 3 4 5        image with hue at position k: its blends in slots 3-k .. 5-k

(slot j holds the step at position ``k + (-3, -2, -1, 1, 2, 3)[j]``; the other slots are ``r = 1``, an exact
identity), so the chain is 6 blends and 1 hue for every image, whatever its order. Hue is torchvision's
rgb -> hsv -> rgb, the sextant table picked per channel (no ``[n, 3, 6, H, W]`` table).

Two paths, equal to float rounding (``tests/test_augment.py``):

- eager (CPU; CUDA with ``compile="off"``): the chain on ``[n, 3, H, W]``, the contrast mean reduced at each
  blend slot: ~196 ops per call (the masked version: 462), ~20x normalisation's bytes (it: 77x).
- compiled (``torch.compile``; CUDA by default): ``_augment_planes`` on the 3 channel planes, from uint8 to the
  normalised output. The contrast mean is the only reduction: pass 1 runs the chain and keeps each image's gray at
  its contrast slot (``mean`` over H, W), pass 2 reruns it from the uint8 input with that mean, then grayscale
  and ``(x - mean) / std``, written once (in the input's memory format). The draws run inside too, from
  ``index * golden + key`` made on the host: the per-call ``epoch`` and ``view`` only enter ``key``, never a
  compiled constant, so nothing recompiles per call. Inductor's Triton code for it is 3 small kernels (draws,
  order, plan) and one reduction kernel whose second loop is pass 2 (a split reduction, for few large images,
  adds one or two): the uint8 image is read twice, the float output written once, no intermediate in memory.
  The first call per shape compiles (tens of seconds).

Shapes: images uint8 ``[n, 3, H, W]`` (any memory format, kept), indices int64 ``[n]``; output float32
``[n, 3, H, W]``.
"""
from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pipeline.data.transfer import to_device

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
ORDERS = torch.tensor(list(itertools.permutations(range(4))))  # [24, 4]: torchvision's randperm(4), uniformly
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
SLOT_OFFSETS = (-3, -2, -1, 1, 2, 3)  # blend slot j: the step at position (hue's position) + SLOT_OFFSETS[j]
HUE_SLOT = 3  # the hue runs before blend slot 3
SEXTANT_SHIFTS = (0.0, 4.0, 2.0)  # channel c reads torchvision's red column at sextant (i + shift_c) mod 6

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


def _draw_key(seed: int, epoch: int, stream: int) -> int:
    """The key of one (seed, epoch, stream): ``mix(mix(mix(seed) + epoch) + stream)``."""
    return _mix_int(_mix_int(_mix_int(seed) + epoch) + stream)


def _seeded(seed: int, epoch: int, index: torch.Tensor, stream: int) -> torch.Tensor:
    """int64 ``[n]``: ``index * golden + key``, the input of ``_uniforms``."""
    return index.to(torch.int64) * _GOLDEN + _draw_key(seed, epoch, stream)


def _counters(draws: int, device: torch.device | None = None) -> torch.Tensor:
    """int64 ``[draws]``: ``j * golden`` for j = 1..draws (wrapping)."""
    return torch.arange(1, draws + 1, device=device, dtype=torch.int64) * _GOLDEN


def _uniforms(seeded: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """``[n, draws]``: SplitMix64 over ``mix(seeded) + counters_j``, top 24 bits / 2^24. ``counters`` is an input
    (``_counters``), not made here: Inductor would fold ``arange * golden`` into an index that overflows int64."""
    bits = _shift_right(_mix(_mix(seeded)[:, None] + counters[None, :]), 40)  # the top 24 bits
    return bits.to(torch.float32) / float(1 << 24)


def sample_uniform(seed: int, epoch: int, index: torch.Tensor, draws: int, stream: int = 0) -> torch.Tensor:
    """``[n, draws]`` float32 uniforms in [0, 1), a function of (seed, epoch, stream, sample index) only:
    SplitMix64 over ``mix(index * golden + mix(key)) + j * golden`` for draws j = 1..draws."""
    return _uniforms(_seeded(seed, epoch, index, stream), _counters(draws, index.device))


def _luma(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W] -> [n, 1, H, W]`` luma with torchvision's weights."""
    return _luma(*x.unbind(1)).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor | float, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``ratio * x + (1 - ratio) * other``, clamped to [0, 1]; ratio ``[n, 1, 1, 1]``."""
    return (ratio * x + (1.0 - ratio) * other).clamp(0.0, 1.0)


def _hsv_rotated(r: torch.Tensor, g: torch.Tensor, b: torch.Tensor, shift: torch.Tensor):
    """torchvision's rgb -> hsv, hue + ``shift`` (turns), and the parts of hsv -> rgb: ``(i, v, p, q, t)`` with
    sextant i = floor(6h) in 0..6 (float), v = max, p = v(1 - s), q = v(1 - sf), t = v(1 - s(1 - f))."""
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    same = maxc == minc
    cr = maxc - minc
    s = cr / torch.where(same, 1.0, maxc)
    divisor = torch.where(same, 1.0, cr)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(torch.fmod(h / 6.0 + 1.0, 1.0) + shift + 1.0, 1.0)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    p = (maxc * (1.0 - s)).clamp(0.0, 1.0)
    q = (maxc * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (maxc * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    return i, maxc, p, q, t


def _sextant_pick(j: torch.Tensor, v: torch.Tensor, p: torch.Tensor, q: torch.Tensor, t: torch.Tensor):
    """torchvision's red column ``(v, q, p, p, t, v)[j]``, j in {0..5} (float); green is it at j + 4, blue at j + 2."""
    return torch.where((j == 0) | (j == 5), v, torch.where(j == 1, q, torch.where(j == 4, t, p)))


def _sextant_shifts(x: torch.Tensor) -> torch.Tensor:
    """``SEXTANT_SHIFTS`` as ``[1, 3, 1, 1]`` on ``x``'s device (an arange: no host copy)."""
    return torch.arange(0, 12, 4, device=x.device, dtype=x.dtype).remainder(6).view(1, 3, 1, 1)


def _plan(u: torch.Tensor, low: torch.Tensor, high: torch.Tensor, orders: torch.Tensor, probs: torch.Tensor,
          offsets: torch.Tensor):
    """Per image, from its uniforms ``u`` ``[n, 8]``: per blend slot ``[n, 6]`` the ratio r (1: identity), the
    weight of the target T (1 - r; 0 for brightness, whose T is 0, and for identity), is-contrast; ``[n]`` the hue
    shift, hue on (= jitter applied), grayscale on.

    factor_s = low_s + u_{1+s} (high_s - low_s); order = ORDERS[floor(24 u_5)]; k = position of HUE in order;
    slot j: step order[k + offsets_j] where 0 <= k + offsets_j <= 3 and the jitter applies (u_0 < p_jitter).
    """
    applied = u[:, 0] < probs[0]
    factors = low + u[:, 1:5] * (high - low)  # [n, 4]
    order = orders[(u[:, 5] * 24).long().clamp_max(23)]  # [n, 4]: the step at each position
    position = (order == HUE).long().argmax(1, keepdim=True) + offsets  # [n, 6]
    used = (position >= 0) & (position <= 3) & applied[:, None]
    step = order.gather(1, position.clamp(0, 3))
    ratio = torch.where(used, factors.gather(1, step), 1.0)
    keep = torch.where(used & (step == BRIGHTNESS), 0.0, 1.0 - ratio)  # r x + 0 * T = r x + (1 - r) * 0, exactly
    return ratio, keep, used & (step == CONTRAST), factors[:, HUE], applied, u[:, 6] < probs[1]


def _jitter(x: torch.Tensor, plan: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The eager path: 6 blend slots and the hue slot on ``x`` ``[n, 3, H, W]`` in [0, 1], then grayscale."""
    ratio, keep, contrast, shift, hue_on, gray_on = plan
    shape = (-1, 1, 1, 1)
    for slot in range(len(SLOT_OFFSETS)):
        if slot == HUE_SLOT:
            i, v, p, q, t = _hsv_rotated(x[:, 0:1], x[:, 1:2], x[:, 2:3], shift.view(shape))
            sextants = torch.remainder(i + _sextant_shifts(x), 6.0)  # [n, 3, H, W]
            x = torch.where(hue_on.view(shape), _sextant_pick(sextants, v, p, q, t), x)
        gray = grayscale(x)
        target = torch.where(contrast[:, slot].view(shape), gray.mean(dim=(1, 2, 3), keepdim=True), gray)
        x = (ratio[:, slot].view(shape) * x + keep[:, slot].view(shape) * target).clamp_(0.0, 1.0)
    return torch.where(gray_on.view(shape), grayscale(x), x)


def _jitter_planes(planes: list[torch.Tensor], plan: tuple[torch.Tensor, ...],
                   contrast_mean: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
    """The chain on channel planes ``[n, H, W]`` (one elementwise expression per pixel for Inductor).
    ``contrast_mean`` None (pass 1): returns each image's gray just before its contrast slot ``[n, H, W]``;
    else ``[n, 1, 1]`` (pass 2): returns the 3 jittered planes (grayscale not applied)."""
    ratio, keep, contrast, shift, hue_on, _ = plan
    shape = (-1, 1, 1)
    picked = None
    for slot in range(len(SLOT_OFFSETS)):
        if slot == HUE_SLOT:
            i, v, p, q, t = _hsv_rotated(*planes, shift.view(shape))
            planes = [torch.where(hue_on.view(shape), _sextant_pick(torch.remainder(i + k, 6.0), v, p, q, t), c)
                      for k, c in zip(SEXTANT_SHIFTS, planes)]
        gray = _luma(*planes)
        is_contrast = contrast[:, slot].view(shape)
        if contrast_mean is None:
            picked = gray if picked is None else torch.where(is_contrast, gray, picked)
            if slot == len(SLOT_OFFSETS) - 1:
                return picked
            target = gray  # this image's contrast, if here, is only used in pass 2
        else:
            target = torch.where(is_contrast, contrast_mean, gray)
        planes = [(ratio[:, slot].view(shape) * c + keep[:, slot].view(shape) * target).clamp(0.0, 1.0)
                  for c in planes]
    return planes


def _augment_planes(images: torch.Tensor, seeded: torch.Tensor, counters: torch.Tensor, low: torch.Tensor,
                    high: torch.Tensor, orders: torch.Tensor, probs: torch.Tensor, offsets: torch.Tensor,
                    mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 ``[n, 3, H, W]`` and ``seeded`` int64 ``[n]`` -> normalised float32 ``[n, 3, H, W]``, two passes
    over the planes (the function ``torch.compile`` compiles)."""
    plan = _plan(_uniforms(seeded, counters), low, high, orders, probs, offsets)
    planes = [c.to(torch.float32) / 255.0 for c in images.unbind(1)]
    contrast_mean = _jitter_planes(planes, plan).mean(dim=(1, 2), keepdim=True)  # [n, 1, 1]
    planes = _jitter_planes(planes, plan, contrast_mean)
    gray, gray_on = _luma(*planes), plan[-1].view(-1, 1, 1)
    out = [(torch.where(gray_on, gray, c) - mean[0, k]) / std[0, k] for k, c in enumerate(planes)]
    return torch.stack(out, dim=3).permute(0, 3, 1, 2) if channels_last else torch.stack(out, dim=1)


@functools.cache
def compiled_augment() -> Callable[..., torch.Tensor]:
    """``_augment_planes`` under ``torch.compile(fullgraph=True, dynamic=False)``. Static shapes: a training run
    calls it with one or two (full batch, last batch; per memory format), each compiled once, and static sizes give
    the simplest kernels (fixed reduction length and split, no size arguments); a dynamic batch would save only that
    second compilation. ``realize_opcount_threshold=30`` is Inductor's CUDA default, also used on CPU there (its CPU
    default, 50, doubles the code generation time of this long expression; no buffer is added)."""
    return torch.compile(_augment_planes, fullgraph=True, dynamic=False, options={"realize_opcount_threshold": 30})


class ColorAugment(nn.Module):
    """uint8 ``[n, 3, H, W]`` -> normalised float32 ``[n, 3, H, W]``.

    With probability ``jitter_prob`` an image gets ColorJitter(brightness=contrast=saturation=s, hue=s/4): its
    four steps in a random order, factors drawn from [1 - s, 1 + s] (brightness from [max(0, 1 - s), 1 + s]) and
    a hue shift from [-s/4, s/4]; then with probability ``grayscale_prob`` it turns gray. ``strength=0`` and both
    probabilities 0 give plain normalisation (the evaluation transform, ``forward(images)``). The random draws of
    an image are ``sample_uniform(seed, epoch, index, 8, stream=view)``.

    ``compile``: "auto" runs the augmentation compiled on CUDA and eager elsewhere (falling back to eager, with a
    warning, if compilation fails), "on" compiles on any device (errors raise), "off" is always eager.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], strength: float = 0.0, jitter_prob: float = 0.0,
                 grayscale_prob: float = 0.0, seed: int = 0, compile: str = "auto") -> None:
        super().__init__()
        if compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be 'auto', 'on' or 'off', not {compile!r}")
        self.strength, self.jitter_prob, self.grayscale_prob, self.seed = strength, jitter_prob, grayscale_prob, seed
        self.compile = compile
        self.random = (strength > 0 and jitter_prob > 0) or grayscale_prob > 0
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("orders", ORDERS.clone(), persistent=False)
        # per colour step: the factor range, [1 - s, 1 + s] (brightness from max(0, 1 - s)) and hue [-s/4, s/4]
        self.register_buffer("low", torch.tensor([max(0.0, 1 - strength), 1 - strength, 1 - strength,
                                                  -strength / 4]), persistent=False)
        self.register_buffer("high", torch.tensor([1 + strength] * 3 + [strength / 4]), persistent=False)
        # float32, as eager compares ``u < p`` in float32
        self.register_buffer("probs", torch.tensor([jitter_prob, grayscale_prob]), persistent=False)
        self.register_buffer("offsets", torch.tensor(SLOT_OFFSETS), persistent=False)
        self.register_buffer("counters", _counters(8), persistent=False)

    def compiled(self, device: torch.device) -> bool:
        """Whether ``forward`` on ``device`` takes the compiled path."""
        return self.compile == "on" or (self.compile == "auto" and device.type == "cuda")

    def forward(self, images: torch.Tensor, epoch: int = 0, index: torch.Tensor | None = None,
                view: int = 0) -> torch.Tensor:
        images = to_device(images, self.mean.device)
        if self.random:
            if index is None:
                raise ValueError("ColorAugment draws per sample: pass the batch's global sample indices")
            if self.compiled(images.device):
                out = self._forward_compiled(images, to_device(_seeded(self.seed, epoch, index, view), images.device))
                if out is not None:
                    return out
            x = self.jitter(images.to(torch.float32) / 255.0,
                            sample_uniform(self.seed, epoch, to_device(index, images.device), 8, stream=view))
        else:
            x = images.to(torch.float32) / 255.0
        return (x - self.mean) / self.std

    def _forward_compiled(self, images: torch.Tensor, seeded: torch.Tensor) -> torch.Tensor | None:
        """The compiled path; None where compile="auto" and compiling failed (then eager from now on)."""
        channels_last = images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(
            memory_format=torch.channels_last)
        try:
            with torch.no_grad():
                return compiled_augment()(images, seeded, self.counters, self.low, self.high, self.orders, self.probs,
                                          self.offsets, self.mean, self.std, channels_last)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            if self.compile == "on":
                raise
            warnings.warn(f"ColorAugment: torch.compile failed, running eager from now on ({error!r:.300})",
                          stacklevel=3)
            self.compile = "off"
            return None

    def jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Colour jitter and grayscale of ``x`` in [0, 1] ``[n, 3, H, W]`` with the uniforms ``u`` ``[n, 8]``
        (the eager path)."""
        return _jitter(x, _plan(u, self.low, self.high, self.orders, self.probs, self.offsets))

    @staticmethod
    def _step(x: torch.Tensor, step: int, factor: torch.Tensor) -> torch.Tensor:
        """One colour step on ``x`` ``[n, 3, H, W]`` with per-image ``factor`` ``[n]`` (torchvision's op)."""
        ratio = factor.view(-1, 1, 1, 1)
        if step == BRIGHTNESS:
            return _blend(x, 0.0, ratio)
        if step == CONTRAST:
            return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), ratio)
        if step == SATURATION:
            return _blend(x, grayscale(x), ratio)
        i, v, p, q, t = _hsv_rotated(x[:, 0:1], x[:, 1:2], x[:, 2:3], factor.view(-1, 1, 1, 1))
        return _sextant_pick(torch.remainder(i + _sextant_shifts(x), 6.0), v, p, q, t)
