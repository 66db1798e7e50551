"""What staging a prepared file on the node costs (``data.stage``), against an ImageNet-1K epoch on the cluster.

Measured here, on a file of ``--gib`` GiB of random bytes (interleaved repeats, median):
  hash       sha256 of a file in the page cache, one core (what staging adds to a copy)
  copy+hash  ``staging.copy_once``: read, hash and write one core's worth (the source in the page cache)
  warm       ``staging.warm_page_cache``: parallel sequential reads of a file in the page cache (8 threads)
  random     FFCV's access pattern: one contiguous sample per read at random offsets of a memory-mapped local
             file (``--sample-kib``, ImageNet's mean stored sample in the bundled proportion mode, 86 KiB)
Stated, with their sources (``ASSUMPTIONS``): the throughput of EFS to one client and of a p4d's NVMe, the
ImageNet file's size and the epoch time of the 32-GPU job (the repository's H200 model-only figure, the fastest
a step can be). Staging then costs one sequential read of the file from EFS per node, bounded by the slower of
EFS and copy+hash; warming the page cache costs the same read without the write.

    python bench/staging.py [--gib 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import statistics
import tempfile
from pathlib import Path

from timing import timed

from pipeline.data import staging
from pipeline.data.manifest import manifest_path, sha256_of

GIB = 1 << 30
ASSUMPTIONS = {
    "efs_client_gib_s": (1.5, "EFS with Elastic throughput: up to 1,500 MiB/s read per NFS client (AWS EFS "
                              "performance documentation); Bursting on a ~110 GB file system: ~100 MiB/s"),
    "efs_bursting_gib_s": (0.1, "EFS Bursting, a file system of ~110 GB (AWS: 100 MiB/s burst for small ones)"),
    "nvme_gib_s": (8.0, "a p4d's 8 x 1 TB instance-store NVMe as RAID-0, ~1 GiB/s sequential write each (assumed; "
                        "AWS publishes no per-disk figure)"),
    "imagenet_gib": (110.0, "the ImageNet-1K train .beton in the bundled proportion mode (issue 25)"),
    "epoch_s": (1_281_167 / (32 * 2445), "1.28 M images / (32 GPUs x 2,445 img/s: the H200 model-only step, "
                                         "bench/results/2026-12-04-h200-gpu_throughput-bc46e1e.md)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-kib", type=int, default=86)
    args = parser.parse_args()
    size = int(args.gib * GIB)
    with tempfile.TemporaryDirectory(prefix="varcon-staging-") as folder:
        source = Path(folder) / "data" / "train.beton"
        source.parent.mkdir()
        with source.open("wb") as handle:
            for _ in range(0, size, 64 << 20):
                handle.write(os.urandom(min(64 << 20, size - handle.tell())))
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        manifest_path(source).write_text(json.dumps({"sha256": digest, "size_bytes": size}))
        times: dict[str, list[float]] = {"hash": [], "copy+hash": [], "warm": [], "random": []}
        count = max(1, size // (args.sample_kib << 10))
        for repeat in range(args.repeats):  # interleaved: each repeat measures every case once
            times["hash"].append(timed(lambda: sha256_of(source)))
            target = Path(folder) / f"stage-{repeat}"
            times["copy+hash"].append(timed(lambda target=target: staging.copy_once(source, target,
                                                                                  log=lambda *_: None)))
            times["warm"].append(timed(lambda: staging.warm_page_cache(source)))
            staged = target / "data" / "train.beton"
            with staged.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                offsets = [random.randrange(0, size - (args.sample_kib << 10)) for _ in range(count)]
                times["random"].append(timed(lambda offsets=offsets, mapped=mapped:
                                             [mapped[o:o + (args.sample_kib << 10)] for o in offsets]))
    rates = {name: args.gib / statistics.median(values) for name, values in times.items()}
    print(f"a {args.gib:g} GiB file, {args.repeats} interleaved repeats, median GiB/s on this machine:")
    for name, rate in rates.items():
        print(f"  {name:10s} {rate:6.2f} GiB/s")
    a = {key: value for key, (value, _) in ASSUMPTIONS.items()}
    print("stated:")
    for key, (value, source_text) in ASSUMPTIONS.items():
        print(f"  {key} = {value:.4g}: {source_text}")
    for efs in ("efs_client_gib_s", "efs_bursting_gib_s"):
        rate = min(a[efs], rates["copy+hash"], a["nvme_gib_s"])
        stage_s, warm_s = a["imagenet_gib"] / rate, a["imagenet_gib"] / min(a[efs], rates["warm"])
        print(f"ImageNet-1K ({a['imagenet_gib']:g} GiB) over {efs}: staging {stage_s / 60:.1f} min per node "
              f"(= {stage_s / a['epoch_s']:.1f} epochs of {a['epoch_s']:.1f} s, once per node, reused across "
              f"restarts and jobs); warming the page cache {warm_s / 60:.1f} min (per boot, nothing reused)")


if __name__ == "__main__":
    main()
