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


# --- the one-pass implementation against the masked one it replaced (bench/augment_before.py, frozen) ---

def _before_module():
    """``bench/augment_before.py`` (today's masked ColorAugment, frozen), loaded by path: ``bench`` is no package."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "augment_before.py"
    spec = importlib.util.spec_from_file_location("augment_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def edge_images(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Random uint8 images whose even rows hold hue edge cases (as many of the 18 as fit): gray pixels (0, 255 and
    between), ties of the largest or smallest channel (every pair), pure and secondary hues on the sextant
    boundaries, and their 1-off neighbours."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    a = torch.randint(1, 256, (n, size), generator=gen, dtype=torch.uint8)
    b = (a.int() * torch.rand(n, size, generator=gen)).to(torch.uint8)  # b <= a
    one = torch.ones_like(a)
    zero = torch.zeros_like(a)
    rows = [(a, a, a), (zero, zero, zero), (255 * one, 255 * one, 255 * one),  # gray
            (a, a, b), (a, b, a), (b, a, a), (b, b, a), (b, a, b), (a, b, b),  # ties at the max / min
            (a, zero, zero), (a, a, zero), (zero, a, zero), (zero, a, a), (zero, zero, a), (a, zero, a),  # sextants
            (a, a - (a > 0).to(torch.uint8), zero), (a, one, zero), (one, a, one)]  # next to them
    for k, (r, g, bl) in enumerate(rows[:size // 2]):
        x[:, :, 2 * k] = torch.stack((r, g, bl), 1)
    return x


@pytest.mark.parametrize("strength, jitter_prob, grayscale_prob", [(0.4, 0.8, 0.2), (1.0, 1.0, 0.5), (0.1, 0.5, 0.0)])
def test_one_pass_eager_equals_the_masked_version(strength, jitter_prob, grayscale_prob):
    """The eager path (6 blend slots around one hue slot) against today's masked version on the same draws, hue
    edge cases included: equal to atol 1e-6 in [0, 1] units (bit-identical on CPU today)."""
    before = _before_module().ColorAugmentBefore([0.0] * 3, [1.0] * 3, strength, jitter_prob, grayscale_prob, seed=4)
    ours = ColorAugment([0.0] * 3, [1.0] * 3, strength, jitter_prob, grayscale_prob, seed=4, compile="off")
    for epoch, view, x in ((1, 0, edge_images(96, 36, seed=1)), (2, 1, images(64, 7, seed=2)),
                           (3, 0, edge_images(48, 12, seed=3).contiguous(memory_format=torch.channels_last))):
        index = torch.arange(x.shape[0]) * 5 + epoch
        torch.testing.assert_close(ours(x, epoch, index, view=view), before(x, epoch, index, view=view),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("step, factors", [(BRIGHTNESS, [0.0, 0.6, 1.0, 1.4, 2.0]),
                                           (CONTRAST, [0.0, 0.6, 1.0, 1.4, 2.0]),
                                           (SATURATION, [0.0, 0.6, 1.0, 1.4, 2.0]),
                                           (HUE, [-0.5, -1 / 6, 0.0, 1 / 12, 1 / 6, 0.25, 0.5])])
def test_each_step_equals_the_masked_version_on_hue_edge_cases(step, factors):
    """Per step, with factors that land hues on sextant boundaries (shifts of 0, 1/12, 1/6 on the pure hues)."""
    x = edge_images(len(factors), 36, seed=5).float() / 255
    reference = _before_module().ColorAugmentBefore._step(x, step, torch.tensor(factors))
    torch.testing.assert_close(ColorAugment._step(x, step, torch.tensor(factors)), reference, atol=1e-6, rtol=0)


def test_compiled_path_equals_the_masked_version_and_never_recompiles():
    """``torch.compile`` of the two-pass plane expression (Inductor's CPU backend here; the CUDA path is the same
    graph): equal to today's masked version to atol 1e-5 in [0, 1] units on edge-case channels-last batches (the
    loader's layout, kept in the output), and new epochs and views reuse the compiled code. Compiles once: ~20 s
    on 2 cores (Inductor's cache makes reruns faster)."""
    import torch._dynamo

    before = _before_module().ColorAugmentBefore([0.0] * 3, [1.0] * 3, 0.4, 0.8, 0.2, seed=6)
    ours = ColorAugment([0.0] * 3, [1.0] * 3, 0.4, 0.8, 0.2, seed=6, compile="on")
    assert ours.compiled(torch.device("cpu")) and not ColorAugment(MEAN, STD, 0.4, 0.8).compiled(torch.device("cpu"))
    x = edge_images(64, 36, seed=7).contiguous(memory_format=torch.channels_last)
    index = torch.arange(64) * 3 + 11
    first = ours(x, 1, index, view=0)
    assert first.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(first, before(x, 1, index, view=0), atol=1e-5, rtol=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for epoch, view in ((2, 1), (7, 0)):
            torch.testing.assert_close(ours(x, epoch, index, view=view), before(x, epoch, index, view=view),
                                       atol=1e-5, rtol=0)


def test_compile_setting_is_checked():
    with pytest.raises(ValueError, match="compile"):
        ColorAugment(MEAN, STD, 0.4, 0.8, 0.2, compile="yes")


def test_draws_are_the_same_numbers_as_before_the_rewrite():
    """``sample_uniform`` (now ``_uniforms`` of ``_seeded``, shared with the compiled path) draws what it drew at
    b02a0f8: these are that version's values, x 2^24."""
    u = sample_uniform(7, 2, torch.tensor([0, 1, 123456789]), 3, stream=1)
    assert (u * 2**24).long().tolist() == [[10386312, 14202174, 2611493], [9914, 11730510, 1058080],
                                           [4414487, 16591308, 273841]]
