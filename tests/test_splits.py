"""The validation split: stratified, seeded, by index, recorded, refused where it would empty a class."""
import json

import numpy as np
import pytest

from pipeline import identity
from pipeline.config import ConfigError, load_config
from pipeline.data import prepare_dataset
from pipeline.data.prepare import dataset_splits
from pipeline.data.splits import validation_split


def test_each_class_gives_the_ceiling_of_its_share_and_the_parts_cover_the_split():
    labels = np.repeat([0, 1, 2], [10, 7, 2])
    split = validation_split(labels, 0.2, seed=3)
    assert np.bincount(labels[split.val]).tolist() == [2, 2, 1]  # ceil(0.2 n_c): every class is validated
    assert np.intersect1d(split.val, split.bank).size == 0
    assert np.array_equal(np.union1d(split.val, split.bank), np.arange(len(labels)))
    again, other = validation_split(labels, 0.2, seed=3), validation_split(labels, 0.2, seed=4)
    assert np.array_equal(again.val, split.val) and not np.array_equal(other.val, split.val)
    none = validation_split(labels, 0.0, seed=3)
    assert none.val.size == 0 and np.array_equal(none.bank, np.arange(len(labels)))


def test_a_class_that_would_lose_its_only_training_sample_is_refused():
    with pytest.raises(ConfigError, match="leaves class 'b' \\(1 training sample\\) none to train on"):
        validation_split(np.array([0, 0, 0, 1]), 0.1, seed=0, class_names=["a", "b"])


def test_the_split_is_chosen_by_index_recorded_beside_the_files_and_part_of_the_run_identity(tmp_path):
    config = load_config(None, ["data.val_fraction=0.2"])
    files = prepare_dataset(config.data, tmp_path, log=lambda *_: None)
    beton_written = (tmp_path.glob("digits-*/train.beton").__next__()).stat().st_mtime_ns
    split = dataset_splits(config.data, files)
    assert files.num_val == len(split.val) and files.num_train == 1347
    (record,) = tmp_path.glob("digits-*/validation-0.2-0.json")
    written = json.loads(record.read_text())
    assert written["num_val"] == files.num_val and written["val_indices_sha256_16"] == files.val_digest
    assert sum(written["val_per_class"]) == files.num_val and min(written["val_per_class"]) >= 1

    other = load_config(None, ["data.val_fraction=0.1"])
    smaller = prepare_dataset(other.data, tmp_path, log=lambda *_: None)
    assert smaller.train == files.train and smaller.num_val < files.num_val  # the same file, other indices
    assert next(tmp_path.glob("digits-*/train.beton")).stat().st_mtime_ns == beton_written
    assert identity.run_key(config) != identity.run_key(other)
    assert identity.run_key(load_config(None, ["data.val_seed=1", "data.val_fraction=0.2"])) != \
        identity.run_key(config)
