"""The JSON manifest beside each ``.beton`` file, and the check of a file against it.

FFCV files carry no checksum of their own: the manifest records the sha256, size, sample count, classes, field
schema, writer settings and the source's fingerprint, and ``verify_beton`` compares a file with it before any
training starts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.data.source_identity import SourceIdentity
from pipeline.data.sources import DataError

MANIFEST_VERSION = 2
FIELDS = {"image": "RGBImageField", "label": "IntField", "index": "IntField"}
AUTO_HASH_LIMIT_BYTES = 1 << 30  # verify_hash=auto hashes files up to 1 GiB


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


def is_current(beton: Path, settings: dict, identity: SourceIdentity) -> bool:
    """Whether ``beton`` and its manifest exist and were written with ``settings`` from the same source (as
    ``identity`` compares it: ``pipeline.data.source_identity``)."""
    if not beton.is_file() or not manifest_path(beton).is_file():
        return False
    try:
        manifest = read_manifest(beton)
    except DataError:
        return False
    return (manifest.get("version") == MANIFEST_VERSION and manifest.get("settings") == settings
            and identity.matches(manifest))


def manifest_if_any(beton: Path) -> dict | None:
    """``beton``'s manifest, None where there is none or it cannot be read."""
    try:
        return read_manifest(beton) if manifest_path(beton).is_file() else None
    except DataError:
        return None


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
