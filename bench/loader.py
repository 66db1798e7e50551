"""Two-view images/s of the decode-once FFCV loader, FFCV's two-pipeline loader and the torchvision DataLoader,
measured side by side in one run.

    python bench/loader.py [--threads 2] [--epochs 2]

Both loaders produce two views per image with the reference augmentation: RandomResizedCrop (scale 0.2-1) and a
horizontal flip in the loader, then colour jitter (p=0.8), grayscale (p=0.2) and normalisation batched by
``ColorAugment`` (on this CPU; on a GPU it runs there). Same cores, same batch size, data in the page cache, one
warm-up epoch each (FFCV compiles its pipeline, files enter the cache), then ``--epochs`` timed epochs each.

- cifar-size:    synthetic 32 px images, stored raw in FFCV / held in memory for torchvision (like CIFAR).
- imagenet-size: JPEG files (max side 256, quality 90) in an ImageFolder tree, which torchvision decodes with
                 PIL; FFCV stores them as JPEG (jpg), as FFCV's ImageNet recipe does (proportion: half JPEG, half
                 raw), or raw; random crops resized to --crop px. Two sources: synthetic gratings, and random
                 crops of scikit-learn's two sample photographs (``load_sample_images``: real JPEG statistics).

"loader only" is the CPU-side data path up to uint8 views (decode, crop, flip: what a GPU run spends CPU cores
on; the colour step and normalisation run on the GPU there). "+ colour on cpu" adds them on this CPU, as on a
machine without a GPU. Each row: the three loaders' medians, decode-once / torchvision and decode-once /
two-pipeline ratios (median over interleaved repeats, spread min-max). The last line gives the loader-only
decode-once / torchvision ratios on the photographs for the three FFCV storage modes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.augment import ColorAugment
from pipeline.data.ffcv_loader import TwoViewLoader
from pipeline.data.prepare import prepare_dataset
from pipeline.data.sources import load_source, synthetic
from pipeline.data.torchvision_loader import TorchvisionTwoViewLoader


def images_per_s(loader, augment, epochs: int) -> float:
    """Two-view images/s; ``augment`` (or nothing) runs on both views of every batch."""
    def one_epoch() -> int:
        count = 0
        for view1, view2, _, index in loader:
            if augment is not None:
                augment(view1, 1, index, view=0), augment(view2, 1, index, view=1)
            count += view1.shape[0]
        return count

    one_epoch()  # warm-up: FFCV compiles, files enter the page cache, worker processes start
    start = time.perf_counter()
    images = sum(one_epoch() for _ in range(epochs))
    return images / (time.perf_counter() - start)


def write_jpeg_folder(root: Path, count: int, size: int) -> Path:
    data = synthetic(10, count, count // 5, size, seed=0)
    for split, name in (("train", "train"), ("test", "val")):
        for i, (image, label, _) in enumerate(data[split]):
            folder = root / name / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.jpg", quality=90)
    return root


def write_photo_folder(root: Path, count: int, size: int) -> Path:
    """``count`` JPEG files: random boxes (a third to all of the shorter side) of the two sample photographs,
    resized to ``size`` on the longer side, in 10 classes."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB photographs
    rng = np.random.default_rng(0)
    for name, n in (("train", count), ("val", count // 5)):
        for i in range(n):
            photo = photos[i % 2]
            side = int(rng.uniform(0.33, 1.0) * min(photo.shape[:2]))
            h, w = side, min(photo.shape[1], int(side * rng.uniform(0.75, 1.33)))
            top, left = rng.integers(0, photo.shape[0] - h + 1), rng.integers(0, photo.shape[1] - w + 1)
            image = Image.fromarray(photo[top:top + h, left:left + w])
            image.thumbnail((size, size))
            folder = root / name / f"class_{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.jpg", quality=90)
    return root


REPEATS = 3  # interleaved measurements per row; the row shows the median ratio and its spread (min-max)


def compare(name: str, config: DataConfig, cache: Path, batch: int, crop: int, threads: int, epochs: int,
            with_colour: bool) -> float:
    """Print one row (two with ``with_colour``); return the loader-only ratio decode-once / torchvision."""
    files = prepare_dataset(config, cache / name, log=lambda *_: None)
    split = load_source(config, log=lambda *_: None)["train"]
    args = dict(batch_size=batch, image_size=crop, crop_scale_min=0.2, flip=True, distributed=False, seed=0)
    loaders = {"once": TwoViewLoader(files.train, threads=threads, decode_once=True, **args),
               "two": TwoViewLoader(files.train, threads=threads, decode_once=False, **args),
               "tv": TorchvisionTwoViewLoader(split, workers=threads, **args)}
    augments = {"loader only": None}
    if with_colour:
        augments["+ colour on cpu"] = ColorAugment(files.channel_mean, files.channel_std, 0.4, 0.8, 0.2)
    ratios = {}
    for label, augment in augments.items():  # the three loaders alternate, REPEATS times
        runs = [{key: images_per_s(loader, augment, epochs) for key, loader in loaders.items()}
                for _ in range(REPEATS)]
        vs_tv = [r["once"] / r["tv"] for r in runs]
        vs_two = [r["once"] / r["two"] for r in runs]
        ratios[label] = statistics.median(vs_tv)
        medians = {key: statistics.median(r[key] for r in runs) for key in loaders}
        print(f"{name:>30} {label:>16} {medians['once']:>8.0f} {medians['two']:>8.0f} {medians['tv']:>8.0f} "
              f"{ratios[label]:>6.2f}x ({min(vs_tv):.2f}-{max(vs_tv):.2f}) {statistics.median(vs_two):>6.2f}x "
              f"({min(vs_two):.2f}-{max(vs_two):.2f})", flush=True)
    return ratios["loader only"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="FFCV threads = torchvision worker processes")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--crop", type=int, default=160, help="imagenet-size crop side (160 or 224)")
    parser.add_argument("--cifar-images", type=int, default=10000)
    parser.add_argument("--imagenet-images", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} timed epochs={args.epochs}; two-view images/s of decode-once (once), FFCV's "
          f"two pipelines (two), torchvision (tv)")
    print(f"{'data (ffcv storage)':>30} {'measured':>16} {'once':>8} {'two':>8} {'tv':>8} {'once/tv':>21} "
          f"{'once/two':>17}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cifar = DataConfig(dataset="synthetic", num_classes=10, train_samples=args.cifar_images, test_samples=100,
                           image_size=32, write_mode="raw", writer_workers=args.threads, val_fraction=0.0)
        compare("cifar-size (raw)", cifar, tmp, 256, 32, args.threads, args.epochs, with_colour=True)
        sources = {"synthetic": write_jpeg_folder(tmp / "jpeg", args.imagenet_images, 256),
                   "photos": write_photo_folder(tmp / "photos", args.imagenet_images, 256)}
        ratios = {}
        for source, root in sources.items():
            for mode in ("jpg", "proportion", "raw"):
                imagenet = DataConfig(dataset="imagefolder", root=str(root), image_size=args.crop, write_mode=mode,
                                      max_resolution=256, jpeg_quality=90, compress_probability=0.5,
                                      writer_workers=args.threads, val_fraction=0.0)
                ratios[source, mode] = compare(f"imagenet-size {source} ({mode})", imagenet, tmp / source, 64,
                                               args.crop, args.threads, args.epochs, with_colour=False)
    print(f"loader speedup decode-once/torchvision (imagenet-size): jpg {ratios['photos', 'jpg']:.2f}x, "
          f"proportion {ratios['photos', 'proportion']:.2f}x, raw {ratios['photos', 'raw']:.2f}x")


def _quiet_numba_finalizers(unraisable) -> None:
    """numba's dispatcher finalizer raises KeyError when FFCV's compiled pipelines are collected: harmless."""
    if not (isinstance(unraisable.exc_value, KeyError) and "numba" in repr(unraisable.object)):
        sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
    sys.unraisablehook = _quiet_numba_finalizers
    main()
