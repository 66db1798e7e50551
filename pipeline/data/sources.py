"""Dataset sources: the ``train`` and ``test`` splits of a dataset as indexable ``(image, label)`` samples.

Each split is either in memory (``LabelledImages``: digits, synthetic, CIFAR) or a list of image files decoded
on access (``ImageFiles``: any ImageFolder tree such as ImageNet). Nothing is downloaded unless the user sets
``data.download=true``. Every user mistake raises ``DataError`` with a message naming the fix.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.file_scan import map_in_order, scan_threads

if TYPE_CHECKING:
    from pipeline.config import DataConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """A dataset the user pointed at cannot be used; the message names the fix."""


@dataclass
class LabelledImages:
    """``images`` uint8 ``[N, H, W, 3]``, ``labels`` int64 ``[N]`` in ``[0, len(class_names))``."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str  # where the samples came from, recorded in the manifest
    skipped: int = 0  # unreadable samples left out

    def __post_init__(self) -> None:
        _check_labels(self.labels, len(self.class_names), self.source)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        return self.images[index], int(self.labels[index]), index

    def sample_for_stats(self, limit: int = 4096) -> np.ndarray:
        return self.images[:: max(1, len(self) // limit)]


@dataclass
class ImageFiles:
    """Image files decoded to RGB uint8 ``[H, W, 3]`` on access; one folder per class."""

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    source: str
    skipped: int = 0

    def __post_init__(self) -> None:
        _check_labels(self.labels, len(self.class_names), self.source)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        return _read_rgb(self.paths[index]), int(self.labels[index]), index

    def sample_for_stats(self, limit: int = 512) -> np.ndarray:
        picks = range(0, len(self), max(1, len(self) // limit))
        return np.concatenate([_read_rgb(self.paths[i]).reshape(-1, 3) for i in picks])


def channel_stats(split: LabelledImages | ImageFiles) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of a split (over an evenly spaced sample of its images)."""
    pixels = split.sample_for_stats().reshape(-1, 3).astype(np.float64) / 255.0
    return pixels.mean(0).round(6).tolist(), pixels.std(0).round(6).tolist()


def _check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    if len(labels) == 0:
        raise DataError(f"{source} holds no samples: point data.root at a non-empty dataset")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{source}: labels range over [{labels.min()}, {labels.max()}] but there are "
                        f"{num_classes} class names: fix the labels or the class list")


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels)


def digits(image_size: int, test_fraction: float, split_seed: int) -> dict[str, LabelledImages]:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), upscaled bilinearly to RGB ``image_size``.

    The train/test split is stratified and seeded, so every run and every worker sees the same split.
    """
    import sklearn
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images / 16.0).float()[:, None]  # [N, 1, 8, 8] in [0, 1]
    upscaled = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (upscaled.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    images = images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, S, S, 3]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(labels, test_fraction, split_seed)
    names = [str(c) for c in bunch.target_names]
    source = f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})"
    return {split: LabelledImages(images[idx], labels[idx], names, source)
            for split, idx in (("train", train_idx), ("test", test_idx))}


def synthetic(num_classes: int, train_samples: int, test_samples: int, image_size: int,
              seed: int) -> dict[str, LabelledImages]:
    """Procedural images: per class a colour and a sinusoidal grating (orientation, frequency); per sample a
    random phase, contrast and pixel noise. Deterministic in ``seed``; learnable but not trivial.
    """
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.2, 0.8, (num_classes, 3))
    angles = rng.uniform(0, np.pi, num_classes)
    freqs = rng.uniform(2, 6, num_classes) * 2 * np.pi / image_size
    coords = np.arange(image_size, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    def make(count: int, offset: int) -> LabelledImages:
        labels = (np.arange(count) + offset) % num_classes
        sample_rng = np.random.default_rng([seed, offset])
        images = np.empty((count, image_size, image_size, 3), np.uint8)
        for start in range(0, count, 256):
            y = labels[start:start + 256]
            n = len(y)
            phase = sample_rng.uniform(0, 2 * np.pi, (n, 1, 1))
            proj = xx[None] * np.cos(angles[y])[:, None, None] + yy[None] * np.sin(angles[y])[:, None, None]
            wave = np.sin(proj * freqs[y][:, None, None] + phase) * sample_rng.uniform(0.15, 0.35, (n, 1, 1))
            pixels = colours[y][:, None, None, :] + wave[..., None]
            pixels += sample_rng.normal(0, 0.05, pixels.shape)
            images[start:start + n] = (np.clip(pixels, 0, 1) * 255).astype(np.uint8)
        return LabelledImages(images, labels.astype(np.int64), [f"class_{c}" for c in range(num_classes)],
                              f"synthetic(classes={num_classes}, size={image_size}, seed={seed})")

    return {"train": make(train_samples, 0), "test": make(test_samples, train_samples)}


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except FileNotFoundError:
        raise DataError(f"{path} is missing: data.root must hold the python version of CIFAR "
                        f"(cifar-10-batches-py/ or cifar-100-python/), or set data.download=true") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a readable CIFAR pickle ({exc}): download the dataset again") from None


def cifar(root: str, num_classes: int, download: bool) -> dict[str, LabelledImages]:
    """CIFAR-10/100 from ``root`` in the standard python-pickle layout (optionally downloaded there)."""
    folder_name = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    base = Path(root).expanduser()
    if download:
        import torchvision

        dataset_class = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
        dataset_class(str(base), train=True, download=True)
    folder = base / folder_name if (base / folder_name).is_dir() else base
    if not folder.is_dir():
        raise DataError(f"data.root={root!r} does not exist: point it at the folder holding {folder_name}/, "
                        f"or set data.download=true")
    if num_classes == 10:
        batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        names, label_key = _unpickle(folder / "batches.meta")["label_names"], "labels"
    else:
        batches = {"train": ["train"], "test": ["test"]}
        names, label_key = _unpickle(folder / "meta")["fine_label_names"], "fine_labels"
    splits = {}
    for split, files in batches.items():
        parts = [_unpickle(folder / name) for name in files]
        try:
            data = np.concatenate([np.asarray(p["data"], np.uint8).reshape(-1, 3, 32, 32) for p in parts])
            labels = np.concatenate([np.asarray(p[label_key], np.int64) for p in parts])
        except (KeyError, ValueError) as exc:
            raise DataError(f"{folder}: CIFAR {split} batches are malformed ({exc}): download them again") from None
        splits[split] = LabelledImages(np.ascontiguousarray(data.transpose(0, 2, 3, 1)), labels, list(names),
                                       str(folder / f"{split} batches"))
    return splits


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _unreadable(path: Path) -> str | None:
    """None if ``path`` opens as an image and passes PIL's ``verify``, else the exception's name (a test replaces
    this function to watch the threads that call it)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:
        return type(exc).__name__
    return None


def _scan_class_folders(split_dir: Path, on_bad_image: str, class_names: list[str] | None,
                        log: Callable[[str], None], threads: int = 1) -> ImageFiles:
    """List ``split_dir/<class>/<image>``; check every image opens (skip and count, or fail). The class folders
    are listed and the images checked on ``threads`` threads (``pipeline.data.file_scan``)."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} does not exist: data.root must contain train/ and val/ with one folder "
                        f"per class")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"{split_dir} has no class folders: put each class's images in {split_dir}/<class>/")
    names = class_names if class_names is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"{split_dir} has class folders absent from train/: {unknown[:5]}: make both splits "
                        f"use the same classes")
    index = {name: i for i, name in enumerate(names)}
    candidates = []
    listed = map_in_order(_image_files, [split_dir / name for name in found], threads,
                          f"listing {split_dir.name}/", unit="folder")
    for name, files in zip(found, listed):
        if not files:
            raise DataError(f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                            f"add images or remove the folder")
        candidates += [(path, name) for path in files]
    def readable_or_fail(path: Path) -> str | None:  # data.on_bad_image=fail: the scan stops at the first
        problem = _unreadable(path)
        if problem is not None and on_bad_image == "fail":
            raise DataError(f"unreadable image {path} ({problem}): remove or replace it, or set "
                            f"data.on_bad_image=skip")
        return problem

    problems = map_in_order(readable_or_fail, [path for path, _ in candidates], threads,
                            f"checking {split_dir.name}/", unit="img")
    paths, labels, skipped = [], [], 0
    for (path, name), problem in zip(candidates, problems):
        if problem is not None:
            skipped += 1
            continue
        paths.append(path)
        labels.append(index[name])
    if skipped:
        log(f"skipped {skipped} unreadable image(s) in {split_dir}")
    return ImageFiles(paths, np.asarray(labels, np.int64), list(names), str(split_dir), skipped)


def image_folder(root: str, on_bad_image: str, log: Callable[[str], None] = print,
                 threads: int = 1) -> dict[str, ImageFiles]:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet layout); classes are the train folders."""
    base = Path(root).expanduser()
    if not root or not base.is_dir():
        raise DataError(f"data.root={root!r} is not a folder: point it at a folder with train/ and val/ inside")
    train = _scan_class_folders(base / "train", on_bad_image, None, log, threads)
    test = _scan_class_folders(base / "val", on_bad_image, train.class_names, log, threads)
    return {"train": train, "test": test}


def load_source(data_config: DataConfig, log: Callable[[str], None] = print
                ) -> dict[str, LabelledImages | ImageFiles]:
    """The ``train`` and ``test`` splits of the dataset a ``DataConfig`` names."""
    d = data_config
    if d.dataset == "digits":
        return digits(d.image_size, d.test_fraction, d.split_seed)
    if d.dataset == "synthetic":
        return synthetic(d.num_classes, d.train_samples, d.test_samples, d.image_size, d.split_seed)
    if d.dataset in ("cifar10", "cifar100"):
        return cifar(d.root, 10 if d.dataset == "cifar10" else 100, d.download)
    if d.dataset == "imagefolder":
        return image_folder(d.root, d.on_bad_image, log, scan_threads(Path(d.root).expanduser(), d.scan_threads))
    raise DataError(f"unknown dataset {d.dataset!r}: use digits, synthetic, cifar10, cifar100 or imagefolder")
