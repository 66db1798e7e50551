"""Dataset sources: in-memory labelled images, ready for the FFCV writer."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class LabelledImages:
    """``images`` uint8 ``[N, H, W, 3]``, ``labels`` int64 ``[N]`` in ``[0, len(class_names))``."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str  # where the samples came from, recorded in the manifest

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def digits(image_size: int, test_fraction: float, split_seed: int) -> dict[str, LabelledImages]:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), upscaled bilinearly to RGB ``image_size``.

    The train/test split is stratified and seeded, so every run and every worker sees the same split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images / 16.0).float()[:, None]  # [N, 1, 8, 8] in [0, 1]
    upscaled = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (upscaled.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    images = images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, S, S, 3]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           random_state=split_seed, stratify=labels)
    names = [str(c) for c in bunch.target_names]
    source = f"sklearn.datasets.load_digits (scikit-learn {__import__('sklearn').__version__})"
    return {split: LabelledImages(images[idx], labels[idx], names, source)
            for split, idx in (("train", train_idx), ("test", test_idx))}


def load_source(data_config) -> dict[str, LabelledImages]:
    """The ``train`` and ``test`` splits of the dataset a ``DataConfig`` names."""
    if data_config.dataset == "digits":
        return digits(data_config.image_size, data_config.test_fraction, data_config.split_seed)
    raise ValueError(f"unknown dataset {data_config.dataset!r}: use digits")
