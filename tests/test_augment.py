"""The device-side colour augmentation against torchvision: the same operations, the same distribution of
outputs, and draws that depend only on (seed, epoch, sample index)."""
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipeline.data.augment import BRIGHTNESS, CONTRAST, HUE, SATURATION, ColorAugment, sample_uniform

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def images(n: int, size: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("step, reference, factors", [
    (BRIGHTNESS, TF.adjust_brightness, [0.6, 1.0, 1.4]),
    (CONTRAST, TF.adjust_contrast, [0.6, 1.0, 1.4]),
    (SATURATION, TF.adjust_saturation, [0.6, 1.0, 1.4]),
    (HUE, TF.adjust_hue, [-0.1, 0.03, 0.1]),
])
def test_each_colour_step_is_torchvision_s(step, reference, factors):
    x = images(3, 9).float() / 255
    ours = ColorAugment._step(x, step, torch.tensor(factors))
    theirs = torch.stack([reference(x[i], f) for i, f in enumerate(factors)])
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)


def summary(x: torch.Tensor) -> torch.Tensor:
    """Per image: mean of each channel, spread across channels (saturation), spread across pixels (contrast)."""
    return torch.cat([x.mean((2, 3)), x.std(1).mean((1, 2))[:, None], x.mean(1).std((1, 2))[:, None]], 1)


def test_outputs_follow_torchvision_s_distribution():
    """ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 then RandomGrayscale(0.2), image by image in torchvision, against
    ours on the same 8 images repeated: means and quartiles of each summary agree within sampling error."""
    n, base = 4000, images(8, 6, seed=3)
    batch = base.repeat(n // 8, 1, 1, 1)
    ours = ColorAugment([0.0] * 3, [1.0] * 3, 0.4, 0.8, 0.2, seed=1)(batch, epoch=1, index=torch.arange(n))
    torch.manual_seed(0)
    reference = v2.Compose([v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2)])
    theirs = torch.stack([reference(image.float() / 255) for image in batch])
    a, b = summary(ours), summary(theirs)
    assert (a.mean(0) - b.mean(0)).abs().max() < 0.01
    for q in (0.25, 0.5, 0.75):
        assert (a.quantile(q, 0) - b.quantile(q, 0)).abs().max() < 0.02, q
    gray = lambda x: ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(1).float().mean()
    assert gray(ours) == pytest.approx(0.2, abs=0.02) and gray(theirs) == pytest.approx(0.2, abs=0.02)


def test_an_image_is_augmented_by_its_index_whatever_its_batch():
    """Resume, loader threads and worker count change which batch and rank an image lands in, never its draws."""
    augment = ColorAugment(MEAN, STD, 0.4, 0.8, 0.2, seed=7)
    x, index = images(16), torch.arange(100, 116)
    whole = augment(x, epoch=3, index=index)
    halves = torch.cat([augment(x[:8], epoch=3, index=index[:8]), augment(x[8:], epoch=3, index=index[8:])])
    shuffled = torch.randperm(16)
    torch.testing.assert_close(whole, halves, rtol=0, atol=0)
    torch.testing.assert_close(augment(x[shuffled], epoch=3, index=index[shuffled]), whole[shuffled], rtol=0, atol=0)
    assert not torch.equal(augment(x, epoch=4, index=index), whole)  # a new epoch, new draws
    assert not torch.equal(augment(x, epoch=3, index=index, view=1), whole)  # the second view, its own draws
    other_rank = augment(x, epoch=3, index=index + 16)  # the same pixels at other indices: other draws
    assert not torch.equal(other_rank, whole)


def test_draws_are_uniform_and_independent():
    u = sample_uniform(0, 1, torch.arange(200_000), 4)
    assert u.min() >= 0 and u.max() < 1
    torch.testing.assert_close(u.mean(0), torch.full((4,), 0.5), atol=3e-3, rtol=0)
    torch.testing.assert_close(u.var(0), torch.full((4,), 1 / 12), atol=2e-3, rtol=0)
    assert torch.corrcoef(u.T).sub(torch.eye(4)).abs().max() < 0.01


def test_evaluation_normalises_only():
    x = images(4)
    torch.testing.assert_close(ColorAugment(MEAN, STD)(x), TF.normalize(x.float() / 255, MEAN, STD))


def test_each_image_is_torchvision_s_functional_steps_in_its_own_drawn_order():
    """Image by image: our output equals torchvision's functional ops applied in the order, with the factors and
    the grayscale choice our draws give that image; and the orders are drawn uniformly from the 24."""
    from pipeline.data.augment import ORDERS

    n, seed, epoch = 64, 5, 2
    x, index = images(n, 5, seed=9), torch.arange(n) * 3 + 1
    augment = ColorAugment([0.0] * 3, [1.0] * 3, 0.4, 0.8, 0.2, seed=seed)
    ours = augment(x, epoch=epoch, index=index)
    u = sample_uniform(seed, epoch, index, 8)
    steps = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast, SATURATION: TF.adjust_saturation,
             HUE: TF.adjust_hue}
    low, high = torch.tensor([0.6, 0.6, 0.6, -0.1]), torch.tensor([1.4, 1.4, 1.4, 0.1])
    for i in range(n):
        image = x[i].float() / 255
        if u[i, 0] < 0.8:
            factors = low + u[i, 1:5] * (high - low)
            for step in ORDERS[int(u[i, 5] * 24)].tolist():
                image = steps[step](image, float(factors[step]))
        if u[i, 6] < 0.2:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        torch.testing.assert_close(ours[i], image, atol=3e-6, rtol=0, msg=f"image {i}")
    drawn = (sample_uniform(0, 0, torch.arange(48_000), 8)[:, 5] * 24).long().bincount(minlength=24)
    assert drawn.min() > 1700 and drawn.max() < 2300  # 2000 expected each
