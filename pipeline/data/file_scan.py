"""Reading a large source with many threads: listing, ``stat`` and image checks of ~1.3 M ImageNet files.

Over NFS (EFS) each of these is a network round trip (AWS: "as low as 250 us"), so one thread spends its time
waiting: 1.33 M files cost tens of minutes per pass. ``data.scan_threads`` threads keep that many round trips in
flight (the GIL is released while each waits). On a local disk the same threads only contend for the GIL (each
file's syscalls hand it over: 3.4-3.9x slower on 2 cores, ``bench/source_scan.py``), so ``auto`` (0) takes
``NETWORK_THREADS`` for a network file system and one thread otherwise. Results come back in the input's order,
so what is recorded from them (fingerprints, sample order) does not depend on the thread count.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

NETWORK_THREADS = 32  # data.scan_threads=0 on a network file system
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "9p", "gpfs", "beegfs")
MAX_CHUNK = 256  # items per task of a threaded map
Item = TypeVar("Item")
Result = TypeVar("Result")


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the file system holding ``path`` (the longest mount point above it in ``/proc/self/mounts``,
    or ``mounts``' text in that format); "" where there is no such table."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return ""
    target, kind = Path(os.path.realpath(path)), ""  # a link into a mount counts as the mount
    longest = -1
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if (point == target or point in target.parents) and len(point.parts) > longest:
            longest, kind = len(point.parts), fields[2]
    return kind


def scan_threads(path: Path, configured: int, mounts: str | None = None) -> int:
    """``data.scan_threads`` for a source at ``path``: as configured, or for 0 (auto) ``NETWORK_THREADS`` on a
    network file system (FUSE mounts such as s3fs and EFS's own helper included) and 1 on a local one."""
    if configured > 0:
        return configured
    kind = filesystem_type(path, mounts)
    network = kind in NETWORK_FILESYSTEMS or (kind.startswith("fuse") and kind != "fuseblk")  # fuseblk: local disks
    return NETWORK_THREADS if network else 1


def map_in_order(work: Callable[[Item], Result], items: Sequence[Item], threads: int,
                 desc: str | None = None, unit: str = "file") -> list[Result]:
    """``[work(item) for item in items]`` on ``threads`` threads (1: in this thread), with a progress bar when
    ``desc`` is given. Each task is a run of consecutive items (about four per thread, at most
    ``MAX_CHUNK``), so a future's cost is paid per run, not per file. An exception of ``work`` is raised here, for
    the first failing run in order, once the runs in flight end; the others are not started. Parallelism is per
    run of items: the files of one folder are listed by one thread."""
    quiet = {"disable": True} if desc is None else {}  # else tqdm's own default (TQDM_DISABLE may set it)
    bar = tqdm(total=len(items), desc=desc, unit=unit, mininterval=2, **quiet)
    with bar:
        if threads <= 1 or len(items) <= 1:
            results = []
            for item in items:
                results.append(work(item))
                bar.update()
            return results
        size = max(1, min(MAX_CHUNK, len(items) // (4 * threads)))
        runs = [items[start:start + size] for start in range(0, len(items), size)]

        def run(part: Sequence[Item]) -> list[Result]:
            return [work(item) for item in part]
        pool = ThreadPoolExecutor(max_workers=min(threads, len(runs)), thread_name_prefix="varcon-scan")
        try:
            results = []
            for future in [pool.submit(run, part) for part in runs]:
                part = future.result()
                results += part
                bar.update(len(part))
            return results
        finally:  # on an exception the runs not started are dropped, not worked through
            pool.shutdown(wait=True, cancel_futures=True)


FileRecord = tuple[tuple[str, ...], int, int]  # (path parts relative to the root, size, mtime in ns)


def _list_folder(folder: Path) -> tuple[list[FileRecord], list[Path]]:
    """The files of one folder with their ``stat``, and its sub-folders. As ``rglob``: a link to a file counts
    as that file, a link to a folder is neither listed nor entered."""
    files, folders = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
            elif entry.is_file():
                info = entry.stat()
                files.append(((entry.name,), info.st_size, info.st_mtime_ns))
    return files, folders


def files_under(root: Path, threads: int) -> list[FileRecord]:
    """Every file below ``root``, sorted by its path's parts (the order of ``sorted(root.rglob("*"))``), listed
    one folder per task, a level of the tree at a time."""
    found: list[FileRecord] = []
    level = [root]
    while level:
        below = []
        listed = map_in_order(_list_folder, level, threads)
        for folder, (files, folders) in zip(level, listed):
            prefix = folder.relative_to(root).parts
            found += [(prefix + name, size, mtime) for name, size, mtime in files]
            below += folders
        level = below
    return sorted(found)


def iter_lines(records: Iterable[FileRecord]) -> Iterable[bytes]:
    """One ``relative/path|size|mtime_ns`` line per file, as the walk fingerprint hashes them."""
    for parts, size, mtime in records:
        yield f"{'/'.join(parts)}|{size}|{mtime}\n".encode()
