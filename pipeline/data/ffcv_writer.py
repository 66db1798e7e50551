"""Write one dataset split to an FFCV ``.beton`` file, atomically, with its manifest beside it.

A split is written to a temporary name and renamed only when complete, so an interrupted write leaves no file
that looks valid; the manifest (``pipeline.data.manifest``) is renamed into place last.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.data import manifest as manifests
from pipeline.data.sources import ImageFiles, LabelledImages, channel_stats


def write_beton(split: LabelledImages | ImageFiles, path: Path, settings: dict, fingerprints: dict[str, str],
                workers: int) -> dict:
    """Write ``split`` to ``path`` (temporary file, then rename) and its manifest; return the manifest."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    manifest_file = manifests.manifest_path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    manifest_tmp = path.with_name(f".{manifest_file.name}.tmp-{os.getpid()}")
    # settings name only what changes the bytes: JPEG values are absent where no JPEG is written
    image_field = RGBImageField(write_mode=settings["write_mode"], max_resolution=settings["max_resolution"],
                                jpeg_quality=settings.get("jpeg_quality", 90),
                                compress_probability=settings.get("compress_probability", 0.5))
    try:
        DatasetWriter(str(tmp), {"image": image_field, "label": IntField(), "index": IntField()},
                      num_workers=workers).from_indexed_dataset(split)
        mean, std = channel_stats(split)
        manifest = {
            "version": manifests.MANIFEST_VERSION,
            "sha256": manifests.sha256_of(tmp),
            "size_bytes": tmp.stat().st_size,
            "num_samples": len(split),
            "num_classes": len(split.class_names),
            "class_names": split.class_names,
            "skipped_unreadable": split.skipped,
            "channel_mean": mean,
            "channel_std": std,
            "fields": manifests.FIELDS,
            "settings": settings,
            "source": split.source,
            "source_fingerprint": fingerprints["walk"],  # what manifests before source_fingerprints held
            "source_fingerprints": fingerprints,  # by data.source_check mode (pipeline.data.source_identity)
        }
        manifest_tmp.write_text(json.dumps(manifest, indent=2))
        manifest_file.unlink(missing_ok=True)  # never leave a new file beside an old manifest
        os.replace(tmp, path)
        os.replace(manifest_tmp, manifest_file)
    finally:
        tmp.unlink(missing_ok=True)
        manifest_tmp.unlink(missing_ok=True)
    return manifest
