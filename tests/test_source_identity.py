"""What a start reads of the source (data.source_check): the changes each mode finds, its cost in folders, a run
whose source is gone after `varcon prepare`, and manifests written before the folders record."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from services import patience
from test_data import data_config, write_image_folder

from pipeline.data import DataError, file_scan, prepare_dataset, sources
from pipeline.data import source_identity as identity
from pipeline.data.manifest import manifest_path


@pytest.fixture
def source(tmp_path):
    return write_image_folder(tmp_path / "imagenet")


def changes(root):
    """Three changes a user makes to a source, each applied to a fresh copy: (name, function)."""
    def add(r):
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(r / "train" / "cat" / "new.jpg")

    def remove(r):
        (r / "val" / "dog" / "0.jpg").unlink()

    def rewrite(r):  # same name, other pixels, a later mtime: no folder's entries change
        path = r / "train" / "eel" / "1.png"
        Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(path)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    return {"added": add, "removed": remove, "rewritten in place": rewrite}


@pytest.mark.parametrize("change", ["added", "removed", "rewritten in place"])
def test_walk_finds_every_change_and_folders_all_but_a_file_rewritten_in_place(source, tmp_path, change):
    d = data_config(dataset="imagefolder", root=str(source))
    before = identity.source_fingerprints(d)
    os.utime(source / "train" / "cat", ns=(0, 0))  # folder mtimes that a change must move (1 s filesystems)
    os.utime(source / "val" / "dog", ns=(0, 0))
    settled = identity.source_fingerprints(d)
    assert settled["walk"] == before["walk"] and settled["folders"] != before["folders"]
    changes(source)[change](source)
    after = identity.source_fingerprints(d)
    assert after["walk"] != settled["walk"]
    assert (after["folders"] != settled["folders"]) == (change != "rewritten in place")


def test_folders_never_lists_the_images(source, monkeypatch):
    listed = []
    real = os.scandir
    monkeypatch.setattr(identity.os, "scandir", lambda path: listed.append(os.path.relpath(path, source))
                        or real(path))
    identity.folders_fingerprint(data_config(dataset="imagefolder", root=str(source)))
    assert sorted(listed) == [".", "train", "val"]  # the root and the splits; class folders are only stat'ed


def test_a_run_whose_source_is_gone_trains_from_what_prepare_recorded(source, tmp_path):
    d = data_config(dataset="imagefolder", root=str(source))
    prepared = prepare_dataset(d, tmp_path / "cache", log=lambda *_: None)
    recorded = json.loads(manifest_path(prepared.train).read_text())["source_fingerprints"]
    assert recorded == identity.source_fingerprints(d)
    shutil.rmtree(source)  # the driver cannot see the source (auto), or it is gone
    lines = []
    again = prepare_dataset(d, tmp_path / "cache", log=lines.append)
    assert again == prepared
    (line,) = lines
    assert line.startswith("data.source_check=manifest (data.root is not visible here): the source is not read")
    assert "size and header check (sha256 up to 1 GiB, data.verify_hash=auto)" in line


def test_manifest_mode_needs_prepared_files_and_never_writes(source, tmp_path):
    d = data_config(dataset="imagefolder", root=str(source), source_check="manifest")
    with pytest.raises(DataError, match="data.source_check=manifest and no prepared files under .*: run `varcon "
                                        "prepare` where data.root="):
        prepare_dataset(d, tmp_path / "cache", log=lambda *_: None)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.beton"))


def test_a_manifest_from_before_the_folders_record_is_compared_by_walking(source, tmp_path):
    d = data_config(dataset="imagefolder", root=str(source))
    prepared = prepare_dataset(d, tmp_path / "cache", log=lambda *_: None)
    for path in (prepared.train, prepared.test):  # as version-2 manifests were written before
        manifest = json.loads(manifest_path(path).read_text())
        del manifest["source_fingerprints"]
        manifest_path(path).write_text(json.dumps(manifest))
    found = identity.source_identity(d, json.loads(manifest_path(prepared.train).read_text()))
    assert found.mode == "walk" and found.matches(json.loads(manifest_path(prepared.train).read_text()))
    lines = []
    prepare_dataset(d, tmp_path / "cache", log=lines.append)
    assert not any(line.startswith("writing") for line in lines)  # current: nothing rewritten


def naive_walk_fingerprint(root):
    """The walk fingerprint as it was first written (one thread, ``rglob``): manifests written then hold it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        info = path.stat()
        digest.update(f"{path.relative_to(root)}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@pytest.mark.parametrize("threads", [1, 4])
def test_the_threaded_walk_hashes_what_a_one_thread_rglob_hashes(source, threads):
    (source / "train" / "cat" / "deeper").mkdir()
    (source / "train" / "cat" / "deeper" / "x.jpg").write_bytes(b"not listed by folders")
    (source / ".hidden").write_text("dotfiles count")
    (source / "README").write_text("so do files at the root")
    os.symlink(source / "README", source / "val" / "readme-link")  # a link to a file is that file
    os.symlink(source / "train", source / "train-link")  # a link to a folder is not entered
    d = data_config(dataset="imagefolder", root=str(source), scan_threads=threads)
    assert identity.walk_fingerprint(d) == naive_walk_fingerprint(source)


def meet_in_pairs(work, monkeypatch, module, name) -> list:
    """Replace ``module.name`` (a per-file function) by one whose first two calls on scan threads return only once
    both are in flight: a scan that runs them one at a time breaks the barrier. Returns the list of calls that
    met (a one-item level, such as the root's listing, runs in the calling thread and is not paired)."""
    barrier = threading.Barrier(2, timeout=patience(30))
    met, entered, lock = [], [], threading.Lock()

    def paired(item):
        with lock:  # a slot is taken before waiting, so a third call never waits alone
            waits = threading.current_thread() is not threading.main_thread() and sum(entered) < 2
            entered.append(waits)
        if waits:
            met.append(barrier.wait())
        return work(item)
    monkeypatch.setattr(module, name, paired)
    return met


def test_a_source_is_listed_and_checked_on_several_threads(source, monkeypatch):
    listings = meet_in_pairs(file_scan._list_folder, monkeypatch, file_scan, "_list_folder")
    checks = meet_in_pairs(sources._unreadable, monkeypatch, sources, "_unreadable")
    d = data_config(dataset="imagefolder", root=str(source), scan_threads=4)
    assert identity.walk_fingerprint(d) == naive_walk_fingerprint(source)
    split = sources.load_source(d)["train"]
    assert [p.relative_to(source).as_posix() for p in split.paths] == sorted(
        p.relative_to(source).as_posix() for p in (source / "train").rglob("*.*"))
    assert sorted(listings) == sorted(checks) == [0, 1]  # two listings and two checks were in flight together


def test_a_threaded_check_names_the_first_unreadable_image_in_order(source):
    for bad in ("train/dog/2.jpg", "train/eel/1.png"):
        (source / bad).write_bytes(b"not an image")
    d = data_config(dataset="imagefolder", root=str(source), scan_threads=4)
    with pytest.raises(DataError, match=r"unreadable image .*train/dog/2\.jpg \(UnidentifiedImageError\)"):
        sources.load_source(d)
    skipped = sources.load_source(data_config(dataset="imagefolder", root=str(source), scan_threads=4,
                                              on_bad_image="skip"))["train"]
    assert skipped.skipped == 2 and len(skipped) == 10


MOUNTS = """/dev/vda / ext4 rw,relatime 0 0
fs-0123.efs.us-east-1.amazonaws.com:/ /mnt/efs nfs4 rw,vers=4.1 0 0
/dev/nvme1n1 /mnt/efs/local\\040copy ext4 rw 0 0
s3fs /mnt/bucket fuse.s3fs rw 0 0
/dev/sdb1 /mnt/usb fuseblk rw 0 0
"""


@pytest.mark.parametrize("path, threads", [("/mnt/efs/imagenet", 32), ("/mnt/efs", 32), ("/mnt/bucket/x", 32),
                                           ("/mnt/efs/local copy/imagenet", 1), ("/mnt/efsx", 1), ("/data", 1),
                                           ("/mnt/usb/x", 1)])
def test_auto_scan_threads_follow_the_file_system_of_the_source(path, threads):
    assert file_scan.scan_threads(Path(path), 0, MOUNTS) == threads
    assert file_scan.scan_threads(Path(path), 5, MOUNTS) == 5  # a configured count is kept
