"""Prepared ``.beton`` files staged on each node before training reads them (``data.stage``).

FFCV memory-maps its files: read from a shared network mount (EFS) while the page cache is cold, every epoch's
random order is a random page fault over NFS. Staging reads each file once, sequentially:

    none    the files are read where they are
    local   each file is copied once per node to ``data.stage_dir`` (a local disk: the p4d's NVMe), hashed while it
            is copied (no second read) and checked against its manifest (size and sha256); the copy is reused while
            the manifest's sha256 matches, replaced when it comes from an older manifest, and the least recently
            used copies are evicted past ``data.stage_limit_gb``. Workers on one node share one copy (a file lock).
    cache   the file's pages are read into the page cache by parallel sequential reads (nothing is written)
    auto    local where ``data.stage_dir`` is set and exists, else none

A staged copy is ``<stage_dir>/<dataset folder>/<file>`` with its manifest beside it, the manifest renamed into
place last (a copy without one is incomplete and is redone). A reused copy is re-hashed per ``data.verify_hash``
(``auto``: files up to 1 GiB), otherwise its size is checked. Staging changes where files are read, never what
is trained: the keys are operational.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.data.manifest import AUTO_HASH_LIMIT_BYTES, manifest_path, read_manifest, sha256_of
from pipeline.data.prepare import PreparedDataset
from pipeline.data.sources import DataError

CHUNK = 8 << 20  # bytes per read while copying and warming


def stage_mode(mode: str, stage_dir: str) -> str:
    """``auto`` resolved: ``local`` where ``stage_dir`` is set and is a folder, else ``none``."""
    if mode != "auto":
        return mode
    return "local" if stage_dir and Path(stage_dir).is_dir() else "none"


@dataclass(frozen=True)
class DeclaredDisks:
    """The local disk each node type that runs training workers declares: ``{node type: GB}``, and where."""

    gb: dict[str, float]
    source: str = ""


def check_fits(paths: list[Path], mode: str, disks: DeclaredDisks | None) -> None:
    """Refuse ``data.stage=local|auto`` where the files to stage (``paths``, all copied to every node) exceed a
    node type's declared local disk, before any node is asked for."""
    if mode not in ("local", "auto") or disks is None:
        return
    total = sum(path.stat().st_size for path in paths if path.is_file())
    for name, gb in disks.gb.items():
        if total > gb * 1e9:
            raise ConfigError(f"data.stage={mode}: the files to stage take {total / 1e9:.1f} GB ("
                              f"{', '.join(p.name for p in paths)}) but node type {name} declares {gb:g} GB of "
                              f"local disk in {disks.source}: set data.stage=cache (warm the page cache) or none, "
                              f"or give that node type a larger disk")


def staged(files: PreparedDataset, mode: str, stage_dir: str, limit_gb: float, verify_hash: str = "auto",
           log: Callable[[str], None] = print) -> PreparedDataset:
    """``files`` with its ``.beton`` paths staged per ``mode`` (see the module docstring); the torchvision loader's
    empty paths stay empty."""
    mode = stage_mode(mode, stage_dir)
    paths = {name: getattr(files, name) for name in ("train", "test") if getattr(files, name)}
    if mode == "none" or not paths:
        return files
    if mode == "cache":
        for path in paths.values():
            warm_page_cache(Path(path))
        return files
    folder = Path(stage_dir)
    local = {name: str(copy_once(Path(path), folder, verify_hash, log)) for name, path in paths.items()}
    if limit_gb > 0:
        evict(folder, int(limit_gb * (1 << 30)), keep={Path(p).parent for p in local.values()}, log=log)
    return replace(files, **local)


def copy_once(source: Path, stage_dir: Path, verify_hash: str = "auto", log: Callable[[str], None] = print) -> Path:
    """The local copy of ``source`` under ``stage_dir``: reused when current, else copied (hashed on the way)
    under a lock that the node's other workers wait on."""
    from filelock import FileLock

    manifest = read_manifest(source)
    target_dir = stage_dir / source.parent.name
    target = target_dir / source.name
    target_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target_dir / f".{source.name}.lock")):
        if _is_current(target, manifest, verify_hash):
            os.utime(manifest_path(target))  # recently used: evicted last
            return target
        for stale in (manifest_path(target), target):  # an older manifest's copy, or an incomplete one
            stale.unlink(missing_ok=True)
        free = shutil.disk_usage(target_dir).free
        if free < manifest["size_bytes"]:
            raise DataError(_full(target_dir, manifest["size_bytes"], free))
        started = time.monotonic()
        _copy_hashed(source, target, manifest)
        seconds = time.monotonic() - started
        log(f"staged {source} -> {target} ({manifest['size_bytes'] / (1 << 30):.2f} GiB in {seconds:.1f} s, "
            f"sha256 checked)")
    return target


def _is_current(target: Path, manifest: dict, verify_hash: str) -> bool:
    if not (target.is_file() and manifest_path(target).is_file()):
        return False
    try:
        staged_manifest = json.loads(manifest_path(target).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    size = target.stat().st_size
    if staged_manifest.get("sha256") != manifest["sha256"] or size != manifest["size_bytes"]:
        return False
    if verify_hash == "always" or (verify_hash == "auto" and size <= AUTO_HASH_LIMIT_BYTES):
        return sha256_of(target) == manifest["sha256"]
    return True


def _copy_hashed(source: Path, target: Path, manifest: dict) -> None:
    """Copy ``source`` to ``target`` through a temporary name, hashing each chunk as it passes; the manifest is
    renamed into place last. A hash or size other than the manifest's, or a full disk, leaves nothing behind."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    manifest_tmp = target.with_name(f".{manifest_path(target).name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with source.open("rb") as reader, tmp.open("wb") as writer:
            for chunk in iter(lambda: reader.read(CHUNK), b""):
                digest.update(chunk)
                writer.write(chunk)
        if digest.hexdigest() != manifest["sha256"] or tmp.stat().st_size != manifest["size_bytes"]:
            raise DataError(f"{source} does not match the sha256 and size in its manifest (altered after it was "
                            f"written): run `varcon prepare` to rewrite it")
        os.replace(tmp, target)
        manifest_tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(manifest_tmp, manifest_path(target))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DataError(_full(target.parent, manifest["size_bytes"], shutil.disk_usage(target.parent).free)
                            ) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
        manifest_tmp.unlink(missing_ok=True)


def _full(folder: Path, needed: int, free: int) -> str:
    return (f"data.stage_dir {folder.parent} has {free / (1 << 30):.2f} GiB free but {folder.name} needs "
            f"{needed / (1 << 30):.2f} GiB: free space there, lower data.stage_limit_gb or set data.stage=none")


def evict(stage_dir: Path, limit_bytes: int, keep: set[Path], log: Callable[[str], None] = print) -> None:
    """Remove the least recently used staged copies (their manifests' mtime) until the total is within
    ``limit_bytes``; never those in ``keep``."""
    copies = []
    for beton in stage_dir.glob("*/*.beton"):
        marker = manifest_path(beton)
        used = marker.stat().st_mtime if marker.is_file() else 0.0
        copies.append((used, beton))
    total = sum(beton.stat().st_size for _, beton in copies)
    for _, beton in sorted(copies):
        if total <= limit_bytes:
            break
        if beton.parent in keep:
            continue
        size = beton.stat().st_size
        manifest_path(beton).unlink(missing_ok=True)  # first: a copy without its manifest is never reused
        beton.unlink(missing_ok=True)
        total -= size
        log(f"evicted the staged {beton} ({size / (1 << 30):.2f} GiB, least recently used)")


def warm_page_cache(path: Path, threads: int = 8) -> float:
    """Read ``path`` once in ``threads`` parallel sequential ranges so its pages sit in the page cache; returns
    the seconds taken."""
    size = path.stat().st_size
    span = -(-size // threads) if size else 0
    started = time.monotonic()

    def read_range(start: int) -> None:
        with path.open("rb", buffering=0) as handle:
            handle.seek(start)
            left = min(span, size - start)
            while left > 0:
                chunk = handle.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read_range, range(0, size, span or 1)))
    return time.monotonic() - started
