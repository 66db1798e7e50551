"""Sources, the FFCV writer (cache, manifest, atomicity, corruption checks) and the loaders."""
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from services import join_group, patience, process_context, spawn_ranks

from pipeline.config import DataConfig, load_config
from pipeline.data import DataError, dataset_folder, prepare_dataset, verify_beton
from pipeline.data import manifest as manifests
from pipeline.data.ffcv_loader import EvalLoader, TwoViewLoader
from pipeline.data.manifest import manifest_path, read_manifest
from pipeline.data.sources import digits, load_source
from pipeline.data.torchvision_loader import TorchvisionEvalLoader, TorchvisionTwoViewLoader


def all_batches(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


# ---------------------------------------------------------------- fixtures the tests generate

def write_cifar(root, num_classes: int, train: int = 40, test: int = 20, bad_label: bool = False):
    """A tiny CIFAR tree in the python-pickle layout; returns (train images, train labels)."""
    rng = np.random.default_rng(num_classes)
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    key = "labels" if num_classes == 10 else "fine_labels"

    def batch(n):
        labels = (np.arange(n) % num_classes).tolist()
        if bad_label:
            labels[0] = num_classes
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: labels}

    def dump(name, obj):
        with open(folder / name, "wb") as handle:
            pickle.dump(obj, handle)

    if num_classes == 10:
        parts = [batch(train // 5) for _ in range(5)]
        for i, part in enumerate(parts, 1):
            dump(f"data_batch_{i}", part)
        dump("test_batch", batch(test))
        dump("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        parts = [batch(train)]
        dump("train", parts[0])
        dump("test", batch(test))
        dump("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    images = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.concatenate([p[key] for p in parts])


def write_image_folder(root, classes=("cat", "dog", "eel"), per_class=4, size=(40, 30)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                suffix = ".png" if i % 2 else ".jpg"
                Image.fromarray(pixels).save(folder / f"{i}{suffix}")
    return root


def data_config(**values) -> DataConfig:
    config = DataConfig(writer_workers=1)
    for key, value in values.items():
        setattr(config, key, value)
    return config


# ---------------------------------------------------------------- sources

def test_digits_split_is_seeded_stratified_and_upscaled():
    splits = digits(32, 0.25, split_seed=0)
    again = digits(32, 0.25, split_seed=0)
    assert len(splits["train"]) + len(splits["test"]) == 1797
    assert splits["train"].images.shape[1:] == (32, 32, 3) and splits["train"].images.dtype == np.uint8
    np.testing.assert_array_equal(splits["test"].labels, again["test"].labels)
    assert np.bincount(splits["test"].labels).min() >= 40  # every class held out


def test_synthetic_source_is_deterministic_and_balanced():
    config = data_config(dataset="synthetic", num_classes=5, train_samples=50, test_samples=20, image_size=16)
    first, second = load_source(config), load_source(config)
    np.testing.assert_array_equal(first["train"].images, second["train"].images)
    assert first["train"].images.shape == (50, 16, 16, 3)
    assert np.bincount(first["train"].labels).tolist() == [10] * 5
    assert not np.array_equal(first["train"].images[0], first["train"].images[5])  # same class, new sample


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pickles_round_trip_through_beton(tmp_path, num_classes):
    images, labels = write_cifar(tmp_path / "src", num_classes)
    # 40 images of 100 classes: some classes hold one image, which a validation split would leave untrained
    config = data_config(dataset=f"cifar{num_classes}", root=str(tmp_path / "src"), val_fraction=0.0)
    files = prepare_dataset(config, tmp_path / "cache", log=lambda *_: None)
    assert (files.num_classes, files.num_train, files.num_test) == (num_classes, 40, 20)
    read_images, read_labels, _ = zip(*EvalLoader(files.train, 16, 32))
    np.testing.assert_array_equal(torch.cat(read_labels).numpy(), labels)
    np.testing.assert_array_equal(torch.cat(read_images).permute(0, 2, 3, 1).numpy(), images)


def test_image_folder_round_trip_with_jpeg_storage(tmp_path):
    root = write_image_folder(tmp_path / "src")
    config = data_config(dataset="imagefolder", root=str(root), image_size=24, write_mode="jpg", max_resolution=32)
    files = prepare_dataset(config, tmp_path / "cache", log=lambda *_: None)
    manifest = read_manifest(files.train)
    assert manifest["class_names"] == ["cat", "dog", "eel"] and manifest["num_samples"] == 12
    assert manifest["settings"]["write_mode"] == "jpg" and manifest["fields"]["image"] == "RGBImageField"
    images, labels, _ = zip(*EvalLoader(files.test, 5, 24))
    assert torch.cat(labels).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.cat(images).shape == (12, 3, 24, 24)


# ---------------------------------------------------------------- writer: cache, manifest, atomicity

def test_beton_round_trip_counts_and_labels(digits_files):
    splits = digits(32, 0.25, split_seed=0)
    assert digits_files.num_train == len(splits["train"]) == 1347
    assert digits_files.num_test == len(splits["test"]) == 450
    images, labels, _ = zip(*EvalLoader(digits_files.test, batch_size=128, image_size=32))
    np.testing.assert_array_equal(torch.cat(labels).numpy(), splits["test"].labels)
    np.testing.assert_array_equal(torch.cat(images).permute(0, 2, 3, 1).numpy(), splits["test"].images)
    manifest = read_manifest(digits_files.train)
    assert manifest["num_samples"] == 1347 and manifest["num_classes"] == 10 and len(manifest["sha256"]) == 64
    assert manifest["size_bytes"] == os.path.getsize(digits_files.train)


def test_prepare_reuses_cache_and_rewrites_on_changed_settings(tmp_path):
    data = load_config().data
    messages = []
    files = prepare_dataset(data, tmp_path, log=messages.append)
    stamp = os.stat(files.train).st_mtime_ns
    data.loader_threads, data.verify_hash = 4, "never"  # reading settings: the same files
    assert prepare_dataset(data, tmp_path, log=messages.append) == files
    assert len(messages) == 2 and os.stat(files.train).st_mtime_ns == stamp
    data.split_seed = 1  # another split: other files, in another folder; the first ones stay
    other = prepare_dataset(data, tmp_path, log=messages.append)
    assert len(messages) == 4 and other.train != files.train and os.stat(files.train).st_mtime_ns == stamp
    assert json.loads(manifest_path(other.train).read_text())["settings"]["split_seed"] == 1
    assert not list(tmp_path.rglob(".*tmp*")) and not list(tmp_path.glob("*.lock")), "nothing left behind"


def test_changed_source_files_are_rewritten(tmp_path):
    root = write_image_folder(tmp_path / "src")
    config = data_config(dataset="imagefolder", root=str(root))
    messages = []
    prepare_dataset(config, tmp_path / "cache", log=messages.append)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "cat" / "new.png")
    files = prepare_dataset(config, tmp_path / "cache", log=messages.append)
    assert files.num_train == 13 and len([m for m in messages if m.startswith("writing")]) == 4


def test_interrupted_write_leaves_nothing_that_looks_valid(tmp_path, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(manifests, "sha256_of", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(data_config(dataset="synthetic", train_samples=20, test_samples=10), tmp_path)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------- corruption and bad input

@pytest.fixture
def small_files(tmp_path):
    config = data_config(dataset="synthetic", train_samples=64, test_samples=16, verify_hash="always")
    return config, prepare_dataset(config, tmp_path, log=lambda *_: None), tmp_path


def test_truncated_beton_is_refused(small_files):
    config, files, root = small_files
    with open(files.train, "r+b") as handle:
        handle.truncate(os.path.getsize(files.train) - 100)
    with pytest.raises(DataError, match="truncated or altered"):
        verify_beton(files.train)
    with pytest.raises(DataError, match="truncated or altered"):
        TwoViewLoader(files.train, 8, 32, 0.2, True, distributed=False, seed=0)


def test_altered_beton_is_caught_by_its_hash(small_files):
    config, files, root = small_files
    size = os.path.getsize(files.train)
    with open(files.train, "r+b") as handle:
        handle.seek(size // 2)
        byte = handle.read(1)
        handle.seek(size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    verify_beton(files.train, check_hash="never")  # size and count still agree
    with pytest.raises(DataError, match="sha256"):
        verify_beton(files.train, check_hash="always")


def test_manifest_mismatch_and_absence_are_refused(small_files):
    config, files, root = small_files
    manifest = json.loads(manifest_path(files.test).read_text())
    manifest["num_samples"] += 1
    manifest_path(files.test).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds 16 samples but its manifest says 17"):
        verify_beton(files.test)
    manifest_path(files.test).unlink()
    with pytest.raises(DataError, match="run `varcon prepare`"):
        verify_beton(files.test)


@pytest.mark.parametrize("setup, fragment", [
    (lambda root: None, "is not a folder"),
    (lambda root: (root / "train").mkdir(parents=True), "has no class folders"),
    (lambda root: (root / "train" / "cat").mkdir(parents=True), "holds no images"),
])
def test_bad_image_folders_name_the_fix(tmp_path, setup, fragment):
    root = tmp_path / "src"
    setup(root)
    with pytest.raises(DataError, match=fragment):
        prepare_dataset(data_config(dataset="imagefolder", root=str(root)), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_unreadable_image_fails_or_is_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "src")
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="unreadable image .*broken.jpg.*on_bad_image=skip"):
        prepare_dataset(data_config(dataset="imagefolder", root=str(root)), tmp_path / "cache")
    files = prepare_dataset(data_config(dataset="imagefolder", root=str(root), on_bad_image="skip"),
                             tmp_path / "cache", log=lambda *_: None)
    assert files.num_train == 12 and read_manifest(files.train)["skipped_unreadable"] == 1


def test_cifar_labels_out_of_range_are_refused(tmp_path):
    write_cifar(tmp_path / "src", 10, bad_label=True)
    with pytest.raises(DataError, match=r"labels range over \[\d+, 10\] but there are 10 class names"):
        load_source(data_config(dataset="cifar10", root=str(tmp_path / "src")))


def test_missing_cifar_folder_suggests_download(tmp_path):
    with pytest.raises(DataError, match="data.download=true"):
        load_source(data_config(dataset="cifar100", root=str(tmp_path / "none")))


# ---------------------------------------------------------------- loaders

def test_two_views_differ_and_share_labels(digits_files):
    loader = TwoViewLoader(digits_files.train, 64, 32, 0.2, True, distributed=False, seed=0)
    view1, view2, labels, index = next(iter(loader))
    assert view1.shape == view2.shape == (64, 3, 32, 32) and view1.dtype == torch.uint8
    assert labels.shape == (64,) and labels.dtype == torch.int64
    assert (view1 != view2).flatten(1).any(1).float().mean().item() > 0.9
    splits = digits(32, 0.25, split_seed=0)
    np.testing.assert_array_equal(labels.numpy(), splits["train"].labels[index.numpy()])  # same sample, same label
    assert len(loader) == 1347 // 64


def test_torchvision_loader_has_the_same_interface(digits_files):
    split = digits(32, 0.25, split_seed=0)["train"]
    loader = TorchvisionTwoViewLoader(split, 64, 32, 0.2, True, distributed=False, seed=0, workers=0)
    view1, view2, labels, index = next(iter(loader))
    assert view1.shape == view2.shape == (64, 3, 32, 32) and view1.dtype == torch.uint8
    assert labels.dtype == torch.int64 and len(loader) == 1347 // 64
    np.testing.assert_array_equal(labels.numpy(), split.labels[index.numpy()])
    images, labels, index = next(iter(TorchvisionEvalLoader(split, 16, 32, workers=0)))
    np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), split.images[:16])
    assert index.tolist() == list(range(16))


@pytest.mark.parametrize("loader", ["ffcv", "torchvision"])
def test_evaluation_batches_can_be_kept_across_a_whole_pass(digits_files, loader):
    """Labels and indices of every batch stay what they were when the pass is over (FFCV refills its batch
    buffers as it goes), at the indices asked for."""
    split = digits(32, 0.25, split_seed=0)["train"]
    chosen = np.arange(3, 1347, 2)
    batches = (EvalLoader(digits_files.train, 16, 32, indices=chosen) if loader == "ffcv" else
               TorchvisionEvalLoader(split, 16, 32, workers=0, indices=chosen))
    kept = list(batches)  # ~42 batches, more than FFCV's ring of buffers
    labels, index = torch.cat([b[1] for b in kept]), torch.cat([b[2] for b in kept])
    assert index.tolist() == chosen.tolist() and batches.num_samples == len(chosen)
    np.testing.assert_array_equal(labels.numpy(), split.labels[chosen])


def _shard_rank(rank, rendezvous, path, results):
    join_group(rank, rendezvous, 2)
    try:
        loader = TwoViewLoader(path, 16, 32, 0.5, False, distributed=True, seed=3)
        results[rank] = [torch.cat([b[3] for b in loader]).tolist() for _ in range(2)]  # two epochs
    finally:
        dist.destroy_process_group()


def test_two_ranks_read_disjoint_shards_covering_the_data(tmp_path):
    config = data_config(dataset="synthetic", train_samples=128, test_samples=8)
    files = prepare_dataset(config, tmp_path, log=lambda *_: None)
    results = spawn_ranks(_shard_rank, files.train, world=2)
    for epoch in range(2):
        rank0, rank1 = results[0][epoch], results[1][epoch]
        assert len(rank0) == len(rank1) == 64 and not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == list(range(128))
    assert results[0][0] != results[0][1], "a new order every epoch"


def _passes(make, skip: int) -> tuple[list, list, list, list]:
    """Epoch 1's batches (index, view1) of a fresh loader, and of another one told to skip ``skip`` batches of
    that pass (a resume within epoch 1); then the indices of epoch 2 of both."""
    whole, resumed = make(), make()
    for loader in (whole, resumed):
        loader.epoch = 1
    full = [(b[3].clone(), b[0].clone()) for b in whole]
    resumed.skip_next(skip)
    part = [(b[3].clone(), b[0].clone()) for b in resumed]
    after = [b[3].clone() for b in resumed]
    whole.epoch = 2
    return full, part, after, [b[3].clone() for b in whole]


def _loader_maker(kind, files, distributed):
    if kind == "ffcv":
        return lambda: TwoViewLoader(files.train, 16, 32, 0.5, True, distributed=distributed, seed=3)
    split = load_source(data_config(dataset="synthetic", train_samples=128, test_samples=8))["train"]
    return lambda: TorchvisionTwoViewLoader(split, 16, 32, 0.5, True, distributed=distributed, seed=3, workers=0)


def _check_skip(full, part, after, reference_after, skip):
    assert len(part) == len(full) - skip
    for (index, view), (want_index, want_view) in zip(part, full[skip:]):
        assert index.tolist() == want_index.tolist()
        assert torch.equal(view, want_view)  # the same crops and flips: drawn by (seed, epoch, index)
    assert [i.tolist() for i in after] == [i.tolist() for i in reference_after]  # the skip applies once


def _skip_rank(rank, rendezvous, kind, files, results):
    join_group(rank, rendezvous, 2)
    try:
        results[rank] = _passes(_loader_maker(kind, files, distributed=True), skip=2)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["ffcv", "torchvision"])
def test_a_pass_told_to_skip_starts_at_that_batch_of_the_same_order(tmp_path, kind):
    config = data_config(dataset="synthetic", train_samples=128, test_samples=8)
    files = prepare_dataset(config, tmp_path, log=lambda *_: None)
    full, part, after, reference_after = _passes(_loader_maker(kind, files, distributed=False), skip=3)
    assert len(full) == 8
    _check_skip(full, part, after, reference_after, 3)
    ranks = spawn_ranks(_skip_rank, kind, files, world=2)  # each rank skips its own first two of four batches
    for rank in (0, 1):
        full, part, after, reference_after = ranks[rank]
        assert len(full) == 4
        _check_skip(full, part, after, reference_after, 2)
    assert not set(torch.cat([i for i, _ in ranks[0][1]]).tolist()) & set(torch.cat([i for i, _ in ranks[1][1]]
                                                                                      ).tolist())


def test_prepare_with_repair_rewrites_a_damaged_file(small_files):
    config, files, root = small_files
    with open(files.train, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(DataError, match="truncated or altered"):
        prepare_dataset(config, root, log=lambda *_: None)
    messages = []
    repaired = prepare_dataset(config, root, log=messages.append, repair=True)
    assert "rewriting" in messages[0] and verify_beton(repaired.train)["num_samples"] == 64


# ---------------------------------------------------------------- the cache: keyed by what is stored, one writer

def test_cache_folders_are_keyed_by_what_is_stored(tmp_path):
    """Two ImageFolder datasets (say ImageNet-100 and ImageNet-1K) never share files; the training crop size
    does not change the stored bytes when max_resolution fixes them, nor do JPEG settings of raw storage."""
    first = write_image_folder(tmp_path / "first")
    second = write_image_folder(tmp_path / "second", classes=("ant", "bee"))
    a = data_config(dataset="imagefolder", root=str(first), max_resolution=32, image_size=24)
    b = data_config(dataset="imagefolder", root=str(second), max_resolution=32, image_size=24)
    files_a = prepare_dataset(a, tmp_path / "cache", log=lambda *_: None)
    files_b = prepare_dataset(b, tmp_path / "cache", log=lambda *_: None)
    assert Path(files_a.train).parent != Path(files_b.train).parent
    assert (files_a.num_classes, files_b.num_classes) == (3, 2)
    assert prepare_dataset(a, tmp_path / "cache", log=lambda *_: None) == files_a  # b did not overwrite a
    same_bytes = data_config(dataset="imagefolder", root=str(first), max_resolution=32, image_size=16,
                             jpeg_quality=50)
    assert dataset_folder(same_bytes, tmp_path) == dataset_folder(a, tmp_path)
    for changed in ({"max_resolution": 40}, {"write_mode": "jpg"}, {"on_bad_image": "skip"}):
        assert dataset_folder(data_config(**{**vars(a), **changed}), tmp_path) != dataset_folder(a, tmp_path)


def _prepare_in_process(cache, queue):
    messages = []
    queue.put("started")
    prepare_dataset(data_config(dataset="synthetic", train_samples=400, test_samples=100), cache,
                    log=messages.append)
    queue.put(sum(m.startswith("writing") for m in messages))


def test_concurrent_writers_of_one_folder_write_it_once(tmp_path):
    """Two processes (two sweep trials, say) preparing the same data: the lock lets one write, the other finds
    the files current and only verifies them."""
    from filelock import FileLock

    ctx = process_context()
    queue = ctx.Queue()
    processes = [ctx.Process(target=_prepare_in_process, args=(tmp_path, queue)) for _ in range(2)]
    folder = dataset_folder(data_config(dataset="synthetic", train_samples=400, test_samples=100), tmp_path)
    with FileLock(str(folder) + ".lock"):  # both start while the folder is taken, then race for it
        for process in processes:
            process.start()
        assert [queue.get(timeout=patience(120)) for _ in processes] == ["started", "started"]
    for process in processes:
        process.join(patience(120))
        assert process.exitcode == 0
    written = sorted(queue.get(timeout=patience(10)) for _ in processes)
    assert written == [0, 2]  # one wrote both splits, one wrote nothing
    (folder,) = [p for p in tmp_path.iterdir()]
    verify_beton(folder / "train.beton", "always")
