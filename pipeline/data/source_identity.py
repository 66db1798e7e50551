"""Is a prepared dataset still the source's? What each start-up checks of the source (``data.source_check``).

``varcon prepare`` records two fingerprints of the source in each manifest; a later start compares one of them,
or none, with the source as it is now:

    walk      path, size and mtime of every file (a listing per folder and a ``stat`` per file: 1.33 M for
              ImageNet, minutes over NFS even on ``data.scan_threads`` threads): finds any file added, removed,
              renamed, resized or touched
    folders   path and mtime of the source's folders down to the class folders (ImageNet: ~2,000 ``stat``
              calls): finds files added, removed or renamed (a folder's mtime changes with its entries), not a
              file rewritten in place under the same name
    manifest  nothing of the source is read: the prepared files are trusted as ``varcon prepare`` recorded them,
              after their own integrity check (size and FFCV header; sha256 only up to ``data.verify_hash``'s
              limit), which the start says in one line
    auto      ``manifest`` where ``data.root`` is not visible (a driver that cannot see the cluster's source),
              else ``folders`` for image folders and ``walk`` for the few files of CIFAR

Generated sources (digits, synthetic) are fully described by their settings: every fingerprint is "".
A manifest written before ``folders`` existed holds only the walk fingerprint: ``folders`` then walks.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.data.file_scan import files_under, iter_lines, scan_threads

if TYPE_CHECKING:
    from pipeline.config import DataConfig

SOURCE_CHECKS = ("auto", "walk", "folders", "manifest")
FILE_SOURCES = ("cifar10", "cifar100", "imagefolder")


def _root(d: DataConfig) -> Path | None:
    return Path(d.root).expanduser() if d.dataset in FILE_SOURCES and d.root else None


def walk_fingerprint(d: DataConfig) -> str:
    """sha256 over (relative path, size, mtime) of every file under ``data.root``, in path order; listed and
    stat'ed on ``data.scan_threads`` threads."""
    root = _root(d)
    if root is None:
        return ""
    digest = hashlib.sha256()
    for line in iter_lines(files_under(root, scan_threads(root, d.scan_threads))):
        digest.update(line)
    return digest.hexdigest()


def folders_fingerprint(d: DataConfig) -> str:
    """sha256 over (relative path, mtime) of ``data.root``, its folders and theirs (image folders: the root, the
    splits and the class folders) and of the files at those levels (CIFAR's pickles); files inside class
    folders are never listed."""
    root = _root(d)
    if root is None:
        return ""
    digest = hashlib.sha256()
    level = [root]
    for _ in range(3):  # root, train/ and val/, their class folders
        below = []
        for folder in sorted(level):
            info = folder.stat()
            digest.update(f"{folder.relative_to(root)}/|{info.st_mtime_ns}\n".encode())
            if folder == root or folder.parent == root:  # the class folders' own entries are the images
                with os.scandir(folder) as entries:
                    for entry in sorted(entries, key=lambda e: e.name):
                        if entry.is_dir():
                            below.append(Path(entry.path))
                        else:
                            stat = entry.stat()
                            digest.update(f"{Path(entry.path).relative_to(root)}|{stat.st_size}|"
                                          f"{stat.st_mtime_ns}\n".encode())
        level = below
    return digest.hexdigest()


def source_fingerprints(d: DataConfig) -> dict[str, str]:
    """What ``varcon prepare`` records in each manifest (``source_fingerprints``)."""
    return {"walk": walk_fingerprint(d), "folders": folders_fingerprint(d)}


@dataclass(frozen=True)
class SourceIdentity:
    """What a start compares with a manifest: the check (``mode``) and the source's fingerprint under it (None
    for ``manifest``: nothing compared)."""

    mode: str
    fingerprint: str | None

    def matches(self, manifest: dict) -> bool:
        if self.mode == "manifest":
            return True
        return recorded(manifest).get(self.mode) == self.fingerprint


def recorded(manifest: dict) -> dict[str, str]:
    """A manifest's fingerprints by mode (an older manifest: its ``source_fingerprint`` is the walk)."""
    return manifest.get("source_fingerprints") or {"walk": manifest.get("source_fingerprint")}


def source_check(d: DataConfig) -> str:
    """``data.source_check`` with ``auto`` resolved (see the module docstring)."""
    if d.source_check != "auto":
        return d.source_check
    root = _root(d)
    if root is None:
        return "walk"  # generated: nothing to read
    if not root.exists():
        return "manifest"
    return "folders" if d.dataset == "imagefolder" else "walk"


def source_identity(d: DataConfig, manifest: dict | None) -> SourceIdentity:
    """The identity a start compares with ``manifest`` (the prepared train file's, None if there is none yet)."""
    mode = source_check(d)
    if mode == "folders" and manifest is not None and "folders" not in recorded(manifest):
        mode = "walk"  # prepared before folders were recorded
    if mode == "manifest":
        return SourceIdentity(mode, None)
    return SourceIdentity(mode, walk_fingerprint(d) if mode == "walk" else folders_fingerprint(d))
