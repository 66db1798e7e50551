"""Seeded crops against torchvision's RandomResizedCrop: the sampler's distribution, the rendered pixels."""
import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipeline.data import crops

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
PIXEL_TOLERANCE = 1  # grey levels, max over pixels, against torchvision's antialiased bilinear resized_crop


def test_crop_boxes_follow_torchvisions_sampler():
    """~1e4 draws on a 97x131 image: area shares, aspect ratios and offsets have torchvision's distribution."""
    height, width, n = 97, 131, 10000
    ours = np.array([crops.crop_box(3, 1, index, 0, height, width, *SCALE, *RATIO)
                     for index in range(n)], dtype=float)
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array([v2.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(n)],
                      dtype=float) if hasattr(v2.RandomResizedCrop, "get_params") else None
    if theirs is None:
        from torchvision.transforms import RandomResizedCrop
        theirs = np.array([RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(n)], float)
    def features(boxes):  # area, log aspect ratio, offsets as shares of their ranges
        top, left, h, w = boxes.T
        return {"area": h * w, "log ratio": np.log(w / h), "top share": top / (height - h + 1),
                "left share": left / (width - w + 1)}

    for name, a in features(ours).items():
        assert ks_2samp(a, features(theirs)[name]).pvalue > 1e-3, name
    assert ((ours[:, 0] + ours[:, 2] <= height) & (ours[:, 1] + ours[:, 3] <= width)).all()


def test_draws_depend_on_seed_epoch_index_and_view_only():
    box = crops.crop_box(7, 2, 12345, 1, 64, 64, *SCALE, *RATIO)
    assert crops.crop_box(7, 2, 12345, 1, 64, 64, *SCALE, *RATIO) == box
    others = {crops.crop_box(*args, 64, 64, *SCALE, *RATIO)
              for args in ((8, 2, 12345, 1), (7, 3, 12345, 1), (7, 2, 12346, 1), (7, 2, 12345, 0))}
    assert box not in others
    flipped = [crops.flips(0, 1, i, 0) for i in range(4000)]
    assert abs(np.mean(flipped) - 0.5) < 0.03


@pytest.mark.parametrize("box, size", [((3, 5, 40, 60), 96), ((0, 0, 97, 131), 32), ((10, 20, 50, 50), 50),
                                       ((2, 7, 90, 120), 64), ((0, 0, 20, 20), 224)])
def test_rendered_crops_match_torchvision_resized_crop(box, size):
    """Enlarging (bilinear) and shrinking (antialiased) within PIXEL_TOLERANCE; the flip mirrors."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:97, 0:131]
    image = np.stack([(np.sin(xx / 7) + 1) * 120, (np.cos(yy / 5) + 1) * 120,
                      rng.integers(0, 256, (97, 131))], -1).astype(np.uint8)
    out = np.zeros((size, size, 3), np.uint8)
    crops.resize_crop(image, *box, False, out)
    expected = TF.resized_crop(torch.from_numpy(image).permute(2, 0, 1), *box, [size, size], antialias=True)
    expected = expected.permute(1, 2, 0).numpy().astype(int)
    assert np.abs(out.astype(int) - expected).max() <= PIXEL_TOLERANCE
    mirrored = np.zeros_like(out)
    crops.resize_crop(image, *box, True, mirrored)
    assert np.array_equal(mirrored, out[:, ::-1])
