"""Write dataset splits to FFCV ``.beton`` files, atomically, each with a JSON manifest beside it.

A split is rewritten only when its writer settings or its source change; otherwise the cached file is reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.data.sources import LabelledImages, load_source

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class DatasetFiles:
    """Paths of the written splits and what the loaders need to know about them."""

    train: str
    test: str
    num_classes: int
    num_train: int
    num_test: int
    channel_mean: tuple[float, float, float]  # of the train split, in [0, 1]
    channel_std: tuple[float, float, float]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_path(beton: Path) -> Path:
    return beton.with_name(beton.name + ".manifest.json")


def read_manifest(beton: str | Path) -> dict:
    path = _manifest_path(Path(beton))
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileNotFoundError(f"{path} is missing or unreadable ({exc}): run `varcon prepare` again") from None


def write_beton(split: LabelledImages, path: Path, settings: dict) -> dict:
    """Write ``split`` to ``path`` (temp file + rename) and its manifest; return the manifest."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fields = {
        "image": RGBImageField(write_mode="raw", max_resolution=settings["image_size"]),
        "label": IntField(),
    }
    try:
        DatasetWriter(str(tmp), fields, num_workers=1).from_indexed_dataset(split)
        manifest = {
            "version": MANIFEST_VERSION,
            "sha256": _sha256(tmp),
            "num_samples": len(split),
            "num_classes": len(split.class_names),
            "class_names": split.class_names,
            "channel_mean": (split.images.reshape(-1, 3).mean(0) / 255).round(6).tolist(),
            "channel_std": (split.images.reshape(-1, 3).std(0) / 255).round(6).tolist(),
            "fields": {"image": "RGBImageField(raw)", "label": "IntField"},
            "settings": settings,
            "source": split.source,
        }
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    manifest_tmp = path.with_name(f".{path.name}.manifest.tmp-{os.getpid()}")
    manifest_tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(manifest_tmp, _manifest_path(path))
    return manifest


def _is_current(path: Path, settings: dict) -> bool:
    if not path.is_file() or not _manifest_path(path).is_file():
        return False
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        return False
    return manifest.get("version") == MANIFEST_VERSION and manifest.get("settings") == settings


def prepare_datasets(data_config, cache_root: Path, log=print) -> DatasetFiles:
    """Write (or reuse) the train and test ``.beton`` files for ``data_config`` under ``cache_root``."""
    settings = {key: value for key, value in asdict(data_config).items()
                if key in ("dataset", "root", "image_size", "test_fraction", "split_seed")}
    folder = cache_root / data_config.dataset
    paths = {split: folder / f"{split}.beton" for split in ("train", "test")}
    if not all(_is_current(p, settings) for p in paths.values()):
        splits = load_source(data_config)
        for name, path in paths.items():
            log(f"writing {path} ({len(splits[name])} samples)")
            write_beton(splits[name], path, settings)
    manifests = {name: read_manifest(path) for name, path in paths.items()}
    return DatasetFiles(train=str(paths["train"]), test=str(paths["test"]),
                        num_classes=manifests["train"]["num_classes"],
                        num_train=manifests["train"]["num_samples"], num_test=manifests["test"]["num_samples"],
                        channel_mean=tuple(manifests["train"]["channel_mean"]),
                        channel_std=tuple(manifests["train"]["channel_std"]))
