"""The decode-once two-view FFCV operation: seeded, thread-count independent, equal to the reference render."""
import numpy as np
import torch

from pipeline.data import crops
from pipeline.data.ffcv_two_view import two_view_decoder
from pipeline.data.sources import digits


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
