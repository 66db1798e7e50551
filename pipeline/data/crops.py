"""Seeded random-resized crops and flips, and the resize that renders them: numba functions both loaders share.

Draws are a function of (seed, epoch, global sample index, view) only (SplitMix64, the scheme of
``pipeline.data.augment.sample_uniform``), so a resumed epoch repeats its crops and neither the loader's thread
count nor the world size changes them. ``crop_box`` is torchvision's ``RandomResizedCrop.get_params`` (ten
attempts at a scale and log-uniform aspect ratio, then the centre crop clamped to the ratio range) on those draws.
``resize_crop`` renders a box like torchvision's antialiased bilinear ``resized_crop``: separable triangle filters
whose support widens with the shrink factor (PIL's and torch's ``_upsample_bilinear2d_aa`` coefficients), plain
bilinear interpolation (half-pixel centres) when enlarging.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
DRAWS_PER_ATTEMPT = 4  # scale, log ratio, row offset, column offset
FLIP_DRAW = 10 * DRAWS_PER_ATTEMPT + 1


@nb.njit(cache=True, inline="always")
def _mix(x: np.uint64) -> np.uint64:
    x = (x ^ (x >> np.uint64(30))) * MIX1
    x = (x ^ (x >> np.uint64(27))) * MIX2
    return x ^ (x >> np.uint64(31))


@nb.njit(cache=True)
def sample_key(seed: int, epoch: int, index: int, view: int) -> np.uint64:
    """The uint64 key of one sample's view in one epoch."""
    key = _mix(_mix(_mix(np.uint64(seed)) + np.uint64(epoch)) + np.uint64(view))
    return _mix(np.uint64(index) * GOLDEN + key)


@nb.njit(cache=True)
def uniform(key: np.uint64, draw: int) -> float:
    """The ``draw``-th uniform in [0, 1) of ``key`` (53 bits)."""
    bits = _mix(key + np.uint64(draw + 1) * GOLDEN) >> np.uint64(11)
    return bits * (1.0 / 9007199254740992.0)


@nb.njit(cache=True)
def crop_box(seed: int, epoch: int, index: int, view: int, height: int, width: int, scale_min: float,
             scale_max: float, ratio_min: float, ratio_max: float) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of torchvision's ``RandomResizedCrop.get_params``, drawn for one sample's view."""
    key = sample_key(seed, epoch, index, view)
    area = height * width
    log_min, log_max = math.log(ratio_min), math.log(ratio_max)
    for attempt in range(10):
        base = attempt * DRAWS_PER_ATTEMPT
        target_area = area * (scale_min + (scale_max - scale_min) * uniform(key, base))
        aspect = math.exp(log_min + (log_max - log_min) * uniform(key, base + 1))
        w = int(np.rint(math.sqrt(target_area * aspect)))
        h = int(np.rint(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, base + 2) * (height - h + 1))
            left = int(uniform(key, base + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio_min:
        w = width
        h = int(np.rint(w / ratio_min))
    elif in_ratio > ratio_max:
        h = height
        w = int(np.rint(h * ratio_max))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@nb.njit(cache=True)
def flips(seed: int, epoch: int, index: int, view: int) -> bool:
    """Whether the view is mirrored (probability 1/2)."""
    return uniform(sample_key(seed, epoch, index, view), FLIP_DRAW) < 0.5


@nb.njit(cache=True, fastmath=True)
def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output position: the first input position, the number of taps and ``[out, taps]`` normalised
    triangle weights (support 1, widened by the shrink factor: antialias)."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    taps = int(math.ceil(support)) * 2 + 1
    first = np.empty(out_size, np.int64)
    count = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, taps), np.float32)
    for x in range(out_size):
        centre = (x + 0.5) * scale
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), in_size)
        total = 0.0
        for k in range(low, high):
            value = 1.0 - abs((k - centre + 0.5) / support)
            if value > 0.0:
                weights[x, k - low] = value
                total += value
        for t in range(high - low):
            weights[x, t] /= total
        first[x], count[x] = low, high - low
    return first, count, weights


@nb.njit(cache=True, fastmath=True)
def resize_crop(image: np.ndarray, top: int, left: int, h: int, w: int, flip: bool, out: np.ndarray) -> None:
    """Render ``image[top:top+h, left:left+w]`` (uint8 ``[H, W, 3]``) into ``out`` (uint8 ``[S, T, 3]``),
    mirrored when ``flip``: horizontal pass into float32 rows, then vertical, rounded and clamped."""
    out_h, out_w = out.shape[0], out.shape[1]
    col_first, col_count, col_weights = _coefficients(w, out_w)
    row_first, row_count, row_weights = _coefficients(h, out_h)
    rows = np.empty((h, out_w * 3), np.float32)
    for r in range(h):
        source = image[top + r]
        for x in range(out_w):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            base = left + col_first[x]
            for t in range(col_count[x]):
                weight = col_weights[x, t]
                a0 += weight * source[base + t, 0]
                a1 += weight * source[base + t, 1]
                a2 += weight * source[base + t, 2]
            target = 3 * (out_w - 1 - x if flip else x)
            rows[r, target] = a0
            rows[r, target + 1] = a1
            rows[r, target + 2] = a2
    line = np.empty(out_w * 3, np.float32)
    for y in range(out_h):
        line[:] = 0.0
        for t in range(row_count[y]):
            weight = row_weights[y, t]
            row = rows[row_first[y] + t]
            for q in range(out_w * 3):
                line[q] += weight * row[q]
        flat = out[y].reshape(-1)
        for q in range(out_w * 3):
            value = np.rint(line[q])
            flat[q] = 0 if value < 0 else 255 if value > 255 else np.uint8(value)
