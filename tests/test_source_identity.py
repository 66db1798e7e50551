"""What a start reads of the source (data.source_check): the changes each mode finds, its cost in folders, a run
whose source is gone after `varcon prepare`, and manifests written before the folders record."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from test_data import data_config, write_image_folder

from pipeline.data import DataError, prepare_dataset
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
