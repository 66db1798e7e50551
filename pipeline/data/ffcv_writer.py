"""Write dataset splits to FFCV ``.beton`` files, atomically, each with a JSON manifest beside it; verify them.

A split is written to a temporary name and renamed only when complete, so an interrupted write leaves no file
that looks valid. The manifest records the sha256, size, sample count, classes, field schema, writer settings
and the source's fingerprint; a split is rewritten only when its settings or its source change. FFCV files carry
no checksum of their own: ``verify_beton`` compares a file with its manifest before any training starts.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path


from pipeline.data.sources import DataError, channel_stats, load_source, source_fingerprint

MANIFEST_VERSION = 2
FIELDS = {"image": "RGBImageField", "label": "IntField", "index": "IntField"}
AUTO_HASH_LIMIT_BYTES = 1 << 30  # verify_hash=auto hashes files up to 1 GiB


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


def dataset_settings(d) -> dict:
    """Everything in a ``DataConfig`` that changes the written files."""
    settings = {"dataset": d.dataset, "root": str(Path(d.root).expanduser().resolve()) if d.root else "",
                "image_size": d.image_size, "write_mode": d.write_mode, "max_resolution": max_resolution(d),
                "jpeg_quality": d.jpeg_quality, "compress_probability": d.compress_probability}
    if d.dataset == "digits":
        settings.update(test_fraction=d.test_fraction, split_seed=d.split_seed)
    if d.dataset == "synthetic":
        settings.update(num_classes=d.num_classes, train_samples=d.train_samples, test_samples=d.test_samples,
                        split_seed=d.split_seed)
    if d.dataset == "imagefolder":
        settings.update(on_bad_image=d.on_bad_image)
    return settings


def max_resolution(d) -> int:
    """Longest stored side: ``data.max_resolution``, else the training size."""
    return d.max_resolution or d.image_size


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_path(beton: str | Path) -> Path:
    beton = Path(beton)
    return beton.with_name(beton.name + ".manifest.json")


def read_manifest(beton: str | Path) -> dict:
    path = manifest_path(beton)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is missing or unreadable ({type(exc).__name__}): run `varcon prepare` "
                        f"to rewrite the dataset files") from None


def write_beton(split, path: Path, settings: dict, fingerprint: str, workers: int) -> dict:
    """Write ``split`` to ``path`` (temporary file, then rename) and its manifest; return the manifest."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    manifest_tmp = path.with_name(f".{manifest_path(path).name}.tmp-{os.getpid()}")
    image_field = RGBImageField(write_mode=settings["write_mode"], max_resolution=settings["max_resolution"],
                                jpeg_quality=settings["jpeg_quality"],
                                compress_probability=settings["compress_probability"])
    try:
        DatasetWriter(str(tmp), {"image": image_field, "label": IntField(), "index": IntField()},
                      num_workers=workers).from_indexed_dataset(split)
        mean, std = channel_stats(split)
        manifest = {
            "version": MANIFEST_VERSION,
            "sha256": sha256_of(tmp),
            "size_bytes": tmp.stat().st_size,
            "num_samples": len(split),
            "num_classes": len(split.class_names),
            "class_names": split.class_names,
            "skipped_unreadable": split.skipped,
            "channel_mean": mean,
            "channel_std": std,
            "fields": FIELDS,
            "settings": settings,
            "source": split.source,
            "source_fingerprint": fingerprint,
        }
        manifest_tmp.write_text(json.dumps(manifest, indent=2))
        manifest_path(path).unlink(missing_ok=True)  # never leave a new file beside an old manifest
        os.replace(tmp, path)
        os.replace(manifest_tmp, manifest_path(path))
    finally:
        tmp.unlink(missing_ok=True)
        manifest_tmp.unlink(missing_ok=True)
    return manifest


def verify_beton(path: str | Path, check_hash: str = "auto") -> dict:
    """Compare ``path`` with its manifest (size and FFCV sample count always; sha256 per ``check_hash``:
    ``always``, ``never`` or ``auto`` = files up to 1 GiB). Returns the manifest; raises ``DataError``.
    """
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist: run `varcon prepare` (with the same config) first")
    manifest = read_manifest(path)
    fix = "run `varcon prepare` to rewrite it"
    size = path.stat().st_size
    if size != manifest.get("size_bytes"):
        raise DataError(f"{path} is {size} bytes but its manifest says {manifest.get('size_bytes')} (truncated "
                        f"or altered): {fix}")
    try:
        num_samples = int(Reader(str(path)).num_samples)
    except Exception as exc:
        raise DataError(f"{path} is not a readable FFCV file ({type(exc).__name__}): {fix}") from None
    if num_samples != manifest.get("num_samples"):
        raise DataError(f"{path} holds {num_samples} samples but its manifest says {manifest.get('num_samples')}: "
                        f"{fix}")
    if check_hash == "always" or (check_hash == "auto" and size <= AUTO_HASH_LIMIT_BYTES):
        if sha256_of(path) != manifest.get("sha256"):
            raise DataError(f"{path} does not match the sha256 in its manifest (altered after writing): {fix}")
    return manifest


def _is_current(path: Path, settings: dict, fingerprint: str) -> bool:
    if not path.is_file() or not manifest_path(path).is_file():
        return False
    try:
        manifest = read_manifest(path)
    except DataError:
        return False
    return (manifest.get("version") == MANIFEST_VERSION and manifest.get("settings") == settings
            and manifest.get("source_fingerprint") == fingerprint)


def prepare_datasets(data_config, cache_root: Path, log=print, repair: bool = False) -> DatasetFiles:
    """Write the train and test ``.beton`` files for ``data_config`` under ``cache_root`` unless files written
    with the same settings from the same source are there, then verify both against their manifests.

    A file that fails verification is rewritten with ``repair`` (``varcon prepare``); otherwise it is refused
    with a ``DataError`` (``varcon train``: a damaged file is reported, never silently replaced).
    """
    settings = dataset_settings(data_config)
    fingerprint = source_fingerprint(data_config)
    folder = cache_root / data_config.dataset
    paths = {split: folder / f"{split}.beton" for split in ("train", "test")}

    def write_all() -> None:
        splits = load_source(data_config, log)
        workers = data_config.writer_workers or os.cpu_count() or 1
        for name, path in paths.items():
            log(f"writing {path} ({len(splits[name])} samples)")
            write_beton(splits[name], path, settings, fingerprint, workers)

    if not all(_is_current(p, settings, fingerprint) for p in paths.values()):
        write_all()
    try:
        manifests = {name: verify_beton(path, data_config.verify_hash) for name, path in paths.items()}
    except DataError as exc:
        if not repair:
            raise
        log(f"{exc}: rewriting")
        write_all()
        manifests = {name: verify_beton(path, data_config.verify_hash) for name, path in paths.items()}
    if manifests["train"]["class_names"] != manifests["test"]["class_names"]:
        raise DataError(f"the train and test splits of {data_config.dataset} list different classes: "
                        f"fix the source so both use the same class set")
    return DatasetFiles(train=str(paths["train"]), test=str(paths["test"]),
                        num_classes=manifests["train"]["num_classes"],
                        num_train=manifests["train"]["num_samples"], num_test=manifests["test"]["num_samples"],
                        channel_mean=tuple(manifests["train"]["channel_mean"]),
                        channel_std=tuple(manifests["train"]["channel_std"]))
