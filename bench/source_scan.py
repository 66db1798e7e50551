"""What reading a large image-folder source costs with one thread and with ``data.scan_threads`` threads.

``varcon prepare`` lists every class folder and opens every image (``pipeline.data.sources``), and the walk
fingerprint lists every folder and stats every file (``pipeline.data.source_identity``). Measured here on a
generated tree of ``--classes`` x ``--per-class`` small JPEGs (interleaved repeats, median):

  local       the tree on this machine's disk, in the page cache: the CPU cost per file (threads cannot beat
              the GIL here, so expect no gain, or a small loss)
  round trip  the same image checks with ``--round-trip-ms`` of waiting added to each open, as an NFS open and
              header read over EFS would add (a model, not a measurement of EFS: AWS states read latencies "as
              low as 250 us" for General Purpose file systems; one open + read is at least a round trip or two)

It then states what one pass over ImageNet-1K's 1.33 M files costs at that round trip, serial and threaded.

    python bench/source_scan.py [--classes 40] [--per-class 50] [--threads 32] [--round-trip-ms 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from timing import timed

from pipeline.config import DataConfig
from pipeline.data import file_scan, sources
from pipeline.data.source_identity import walk_fingerprint

IMAGENET_FILES = 1_331_167  # train 1,281,167 + val 50,000


def write_tree(root: Path, classes: int, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class // (1 if split == "train" else 5) or 1):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(folder / f"{i}.JPEG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=file_scan.NETWORK_THREADS)
    parser.add_argument("--round-trip-ms", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    check = sources._unreadable

    def with_round_trip(path):
        time.sleep(args.round_trip_ms / 1000)
        return check(path)

    with tempfile.TemporaryDirectory(prefix="varcon-scan-") as folder:
        root = Path(folder) / "imagenet"
        write_tree(root, args.classes, args.per_class)
        files = sum(1 for p in root.rglob("*") if p.is_file())

        def config(threads: int) -> DataConfig:
            return DataConfig(dataset="imagefolder", root=str(root), scan_threads=threads)

        def load(threads: int, delayed: bool) -> None:
            sources._unreadable = with_round_trip if delayed else check
            try:
                sources.load_source(config(threads), log=lambda *_: None)
            finally:
                sources._unreadable = check

        cases = {}
        for threads in (1, args.threads):
            cases[f"walk fingerprint, {threads} thread(s)"] = lambda t=threads: walk_fingerprint(config(t))
            cases[f"list + check, {threads} thread(s)"] = lambda t=threads: load(t, False)
            cases[f"list + check + {args.round_trip_ms:g} ms, {threads} thread(s)"] = lambda t=threads: load(t, True)
        times = {name: [] for name in cases}
        for _ in range(args.repeats):  # interleaved: each repeat measures every case once
            for name, case in cases.items():
                times[name].append(timed(case))
    print(f"{files} files ({args.classes} classes), {args.repeats} interleaved repeats, median on this machine:")
    per_file = {}
    for name, values in times.items():
        per_file[name] = statistics.median(values) / files
        print(f"  {name:<42} {statistics.median(values):7.3f} s   {per_file[name] * 1e6:8.1f} us/file")
    for kind in ("walk fingerprint", "list + check", f"list + check + {args.round_trip_ms:g} ms"):
        serial, threaded = per_file[f"{kind}, 1 thread(s)"], per_file[f"{kind}, {args.threads} thread(s)"]
        print(f"  {kind}: {args.threads} threads take {threaded / serial:.2f}x the time of one; "
              f"ImageNet-1K's {IMAGENET_FILES:,} files: {serial * IMAGENET_FILES / 60:.1f} min -> "
              f"{threaded * IMAGENET_FILES / 60:.1f} min")


if __name__ == "__main__":
    main()
