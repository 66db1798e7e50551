"""The digits source, the FFCV writer's cache and manifest, and the two-view loader."""
import json

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.data import prepare_datasets
from pipeline.data.ffcv_loader import EvalLoader, TwoViewLoader
from pipeline.data.ffcv_writer import read_manifest
from pipeline.data.sources import digits


def test_digits_split_is_seeded_stratified_and_upscaled():
    splits = digits(32, 0.25, split_seed=0)
    again = digits(32, 0.25, split_seed=0)
    assert len(splits["train"]) + len(splits["test"]) == 1797
    assert splits["train"].images.shape[1:] == (32, 32, 3) and splits["train"].images.dtype == np.uint8
    np.testing.assert_array_equal(splits["test"].labels, again["test"].labels)
    assert np.bincount(splits["test"].labels).min() >= 40  # every class held out


def test_beton_round_trip_counts_and_labels(digits_files):
    splits = digits(32, 0.25, split_seed=0)
    assert digits_files.num_train == len(splits["train"]) == 1347
    assert digits_files.num_test == len(splits["test"]) == 450
    images, labels = zip(*EvalLoader(digits_files.test, batch_size=128))
    np.testing.assert_array_equal(torch.cat(labels).numpy(), splits["test"].labels)
    np.testing.assert_array_equal(torch.cat(images).permute(0, 2, 3, 1).numpy(), splits["test"].images)
    manifest = read_manifest(digits_files.train)
    assert manifest["num_samples"] == 1347 and manifest["num_classes"] == 10 and len(manifest["sha256"]) == 64


def test_prepare_reuses_cache_and_rewrites_on_changed_settings(tmp_path):
    data = load_config().data
    messages = []
    first = prepare_datasets(data, tmp_path, log=messages.append)
    stamp = (tmp_path / "digits" / "train.beton").stat().st_mtime_ns
    prepare_datasets(data, tmp_path, log=messages.append)
    assert len(messages) == 2 and (tmp_path / "digits" / "train.beton").stat().st_mtime_ns == stamp
    data.split_seed = 1
    second = prepare_datasets(data, tmp_path, log=messages.append)
    assert len(messages) == 4
    assert json.loads((tmp_path / "digits" / "train.beton.manifest.json").read_text())["settings"]["split_seed"] == 1
    assert first.num_train == second.num_train
    assert not list(tmp_path.glob("digits/.*tmp*")), "no temporary files left behind"


def test_two_views_differ_and_share_labels(digits_files):
    loader = TwoViewLoader(digits_files.train, 64, 32, 0.2, True, distributed=False, seed=0)
    view1, view2, labels = next(iter(loader))
    assert view1.shape == view2.shape == (64, 3, 32, 32) and view1.dtype == torch.uint8
    assert labels.shape == (64,) and labels.dtype == torch.int64
    differing = (view1 != view2).flatten(1).any(1).float().mean().item()
    assert differing > 0.9
    assert len(loader) == 1347 // 64
