"""The decode-once two-view FFCV operation: seeded, thread-count independent, equal to the reference render."""
import numpy as np
import pytest
import torch

from pipeline.data import crops
from pipeline.data.ffcv_two_view import two_view_decoder
from pipeline.data.sources import digits

JPEG_TOLERANCE = 4.0  # mean grey levels between views of a JPEG-stored image and of its lossless source


def loader(path, threads, cell):
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import Squeeze, ToTensor

    image = PipelineSpec("image", decoder=two_view_decoder(32, (0.2, 1.0), (3 / 4, 4 / 3), True, 0, cell),
                         transforms=[ToTensor()])
    return Loader(path, batch_size=64, num_workers=threads, order=OrderOption.SEQUENTIAL,
                  pipelines={"image": image, "label": [IntDecoder(), ToTensor(), Squeeze(1)],
                             "index": [IntDecoder(), ToTensor(), Squeeze(1)]})


def test_views_are_seeded_by_epoch_and_index_and_rendered_like_the_reference(digits_files):
    cell = np.zeros(1, np.int64)
    cell[0] = 3
    views, _, index = next(iter(loader(digits_files.train, 1, cell)))
    views, index = views.clone(), index.clone()
    again, _, _ = next(iter(loader(digits_files.train, 2, cell)))
    assert torch.equal(views, again)  # another thread count, the same crops
    cell[0] = 4
    later, _, _ = next(iter(loader(digits_files.train, 2, cell)))
    assert not torch.equal(views, later) and not torch.equal(views[:, 0], views[:, 1])
    images = digits(32, 0.25, split_seed=0)["train"].images
    for row in (0, 5, 63):
        sample = int(index[row])
        for view in (0, 1):
            box = crops.crop_box(0, 3, sample, view, 32, 32, 0.2, 1.0, 3 / 4, 4 / 3)
            expected = np.zeros((32, 32, 3), np.uint8)
            crops.resize_crop(images[sample], *box, crops.flips(0, 3, sample, view), expected)
            assert np.array_equal(views[row, view].numpy(), expected)


def test_the_torchvision_fallback_draws_the_same_views(digits_files):
    """Raw storage: FFCV's decode-once loader and the torchvision loader reading the source give every sample
    the same two views in the same epoch (their orders differ); the next epoch draws others."""
    from pipeline.data.ffcv_loader import TwoViewLoader
    from pipeline.data.torchvision_loader import TorchvisionTwoViewLoader

    args = dict(batch_size=64, image_size=32, crop_scale_min=0.2, flip=True, distributed=False, seed=5)
    split = digits(32, 0.25, split_seed=0)["train"]

    def by_index(loader):
        found = {}
        for view1, view2, _, index in loader:
            for row, sample in enumerate(index.tolist()):
                found[sample] = (view1[row].clone(), view2[row].clone())
        return found

    ffcv_loader = TwoViewLoader(digits_files.train, threads=2, **args)
    tv_loader = TorchvisionTwoViewLoader(split, workers=0, **args)
    ffcv_views, tv_views = by_index(ffcv_loader), by_index(tv_loader)
    common = set(ffcv_views) & set(tv_views)
    assert len(common) > 1200
    for sample in common:
        assert torch.equal(ffcv_views[sample][0], tv_views[sample][0]), sample
        assert torch.equal(ffcv_views[sample][1], tv_views[sample][1]), sample
    second = by_index(tv_loader)
    assert sum(torch.equal(second[s][0], tv_views[s][0]) for s in common if s in second) < len(common) / 10


@pytest.mark.parametrize("write_mode", ["jpg", "proportion", "raw"])
def test_each_storage_mode_renders_the_sources_views(tmp_path, write_mode):
    """An ImageFolder of smooth 48x40 images stored as JPEG, half JPEG or raw: the decode-once views follow
    the torchvision fallback's views of the source files, within JPEG's re-encoding error where JPEG is
    stored (mean JPEG_TOLERANCE grey levels) and exactly where raw is."""
    from PIL import Image

    from pipeline.config import DataConfig
    from pipeline.data import prepare_dataset
    from pipeline.data.ffcv_loader import TwoViewLoader
    from pipeline.data.sources import load_source
    from pipeline.data.torchvision_loader import TorchvisionTwoViewLoader

    yy, xx = np.mgrid[0:40, 0:48]
    for split in ("train", "val"):
        for label in range(2):
            folder = tmp_path / "src" / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(12):
                image = np.stack([(np.sin(xx / (4 + i)) + 1) * 110, (np.cos(yy / (3 + label)) + 1) * 110,
                                  np.full_like(xx, 20 * i)], -1).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
    config = DataConfig(dataset="imagefolder", root=str(tmp_path / "src"), image_size=24, write_mode=write_mode,
                        max_resolution=48, jpeg_quality=95, compress_probability=0.5, writer_workers=1,
                        val_fraction=0.0)
    files = prepare_dataset(config, tmp_path / "cache", log=lambda *_: None)
    args = dict(batch_size=8, image_size=24, crop_scale_min=0.2, flip=True, distributed=False, seed=1)
    stored = {int(i): v1 for v1, _, _, index in TwoViewLoader(files.train, **args) for i, v1 in zip(index, v1)}
    source = {int(i): v1 for v1, _, _, index in TorchvisionTwoViewLoader(load_source(config)["train"], workers=0,
                                                                           **args) for i, v1 in zip(index, v1)}
    common = sorted(set(stored) & set(source))
    differences = [(stored[i].float() - source[i].float()).abs().mean().item() for i in common]
    mismatched = [(stored[i].float() - source[j].float()).abs().mean().item() for i, j in zip(common, common[1:])]
    assert len(differences) >= 16 and min(mismatched) > 2 * JPEG_TOLERANCE  # the tolerance tells crops apart
    if write_mode == "raw":
        assert max(differences) == 0.0
    else:
        assert 0.0 < float(np.mean(differences)) <= JPEG_TOLERANCE
