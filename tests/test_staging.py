"""Local staging of prepared files (pipeline.data.staging): one copy per node however many workers ask, hashed on
the way, a corrupted or stale copy replaced, least recently used copies evicted, a full disk one error with
nothing half-copied; and a training that reads its staged copies."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from services import patience, process_context

from pipeline import engine
from pipeline.config import ConfigError, load_config
from pipeline.data import DataError, staging
from pipeline.data.manifest import manifest_path, read_manifest


def _copy_in_process(source, folder, queue):
    lines = []
    queue.put(str(staging.copy_once(Path(source), Path(folder), log=lines.append)))
    queue.put(lines)


def test_two_workers_on_a_node_make_one_copy(digits_files, tmp_path):
    ctx = process_context()
    queue = ctx.Queue()
    workers = [ctx.Process(target=_copy_in_process, args=(digits_files.train, tmp_path, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=patience(120)) for _ in range(4)]
    for worker in workers:
        worker.join(patience(60))
        assert worker.exitcode == 0
    paths = [r for r in results if isinstance(r, str)]
    copied = [line for r in results if isinstance(r, list) for line in r]
    target = tmp_path / Path(digits_files.train).parent.name / "train.beton"
    assert paths == [str(target)] * 2 and len(copied) == 1 and copied[0].startswith("staged ")
    assert target.read_bytes() == Path(digits_files.train).read_bytes()
    assert read_manifest(target) == read_manifest(digits_files.train)
    assert sorted(p.name for p in target.parent.iterdir()) == [".train.beton.lock", "train.beton",
                                                              "train.beton.manifest.json"]


def test_a_corrupted_or_stale_copy_is_replaced_and_a_current_one_reused(digits_files, tmp_path):
    source = Path(digits_files.train)
    lines = []
    target = staging.copy_once(source, tmp_path, log=lines.append)
    assert staging.copy_once(source, tmp_path, log=lines.append) == target and len(lines) == 1  # reused
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: found by the re-hash (verify_hash auto, small file)
    target.write_bytes(bytes(data))
    staging.copy_once(source, tmp_path, log=lines.append)
    assert len(lines) == 2 and target.read_bytes() == source.read_bytes()
    older = {**read_manifest(target), "sha256": "0" * 64}  # a copy from an older manifest
    manifest_path(target).write_text(json.dumps(older))
    staging.copy_once(source, tmp_path, verify_hash="never", log=lines.append)
    assert len(lines) == 3 and read_manifest(target) == read_manifest(source)


def test_the_least_recently_used_copies_are_evicted_past_the_limit(digits_files, tmp_path):
    for name in ("old", "used", "new"):  # three datasets' copies, staged in this order
        folder = tmp_path / "sources" / name
        folder.mkdir(parents=True)
        for path in (Path(digits_files.train), manifest_path(digits_files.train)):
            shutil.copy(path, folder / path.name)
        staging.copy_once(folder / "train.beton", tmp_path / "stage", log=lambda *_: None)
        os.utime(manifest_path(tmp_path / "stage" / name / "train.beton"), (1e9 + len(name), 1e9 + len(name)))
    staging.copy_once(tmp_path / "sources" / "used" / "train.beton", tmp_path / "stage", log=lambda *_: None)
    size = Path(digits_files.train).stat().st_size
    lines = []
    staging.evict(tmp_path / "stage", limit_bytes=2 * size, keep={tmp_path / "stage" / "new"}, log=lines.append)
    assert sorted(p.parent.name for p in (tmp_path / "stage").glob("*/*.beton")) == ["new", "used"]
    assert len(lines) == 1 and "old" in lines[0]


def test_a_full_disk_is_one_error_and_leaves_nothing(digits_files, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda _: Usage(10, 10, 1000))
    with pytest.raises(DataError, match=r"has 0.00 GiB free but .* needs 0.0\d GiB: free space there"):
        staging.copy_once(Path(digits_files.train), tmp_path, log=lambda *_: None)  # refused before copying
    assert [p.name for p in (tmp_path / Path(digits_files.train).parent.name).iterdir()] == [".train.beton.lock"]


def test_files_larger_than_a_node_types_declared_disk_are_refused_before_staging(digits_files):
    paths = [Path(digits_files.train), Path(digits_files.test)]
    total_gb = sum(p.stat().st_size for p in paths) / 1e9
    small = staging.DeclaredDisks({"gpu_worker": total_gb * 2, "tiny": total_gb / 2}, "cluster.yaml")
    for mode in ("local", "auto"):
        with pytest.raises(ConfigError, match=rf"data.stage={mode}: the files to stage take .* GB \(train.beton, "
                                              rf"test.beton\) but node type tiny declares .* in cluster.yaml"):
            staging.check_fits(paths, mode, small)
    staging.check_fits(paths, "cache", small)  # nothing copied: nothing to fit
    staging.check_fits(paths, "local", staging.DeclaredDisks({"gpu_worker": total_gb * 2}))
    staging.check_fits(paths, "local", None)  # no cluster config: nothing declared


def test_a_disk_that_fills_during_the_copy_leaves_nothing_half_copied(digits_files, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"a 1 MiB tmpfs needs mount rights (root): {mounted.stderr.decode().strip()}")
    try:
        Usage = namedtuple("Usage", "total used free")
        monkeypatch.setattr(staging.shutil, "disk_usage", lambda _: Usage(1 << 40, 0, 1 << 40))  # looks roomy
        with pytest.raises(DataError, match="free space there, lower data.stage_limit_gb or set data.stage=none"):
            staging.copy_once(Path(digits_files.train), disk, log=lambda *_: None)
        assert [p.name for p in (disk / Path(digits_files.train).parent.name).iterdir()] == [".train.beton.lock"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_training_reads_its_staged_copies_and_trains_as_from_the_source(digits_files, tmp_path):
    overrides = ["ray.num_workers=1", "optim.epochs=1", "optim.warmup_epochs=0", "eval.linear_probe_epochs=0",
                 "eval.few_shot_episodes=0"]
    weights = []
    for extra in ([], ["data.stage=local", f"data.stage_dir={tmp_path}"]):
        config = load_config(None, overrides + extra)
        training = engine.fit(config, digits_files, torch.device("cpu"), lambda *_: None)
        weights.append({k: v.clone() for k, v in training.model.state_dict().items()})
    assert (tmp_path / Path(digits_files.train).parent.name / "train.beton").is_file()
    assert (tmp_path / Path(digits_files.test).parent.name / "test.beton").is_file()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
