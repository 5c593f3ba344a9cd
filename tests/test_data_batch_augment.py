"""msn.data.batch_augment: each batched operation equals torchvision's per-image functional."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from msn.config import ViewsConfig
from msn.data.batch_augment import (
    BatchPhotometric,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    grayscale,
)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 20, 20)
    x[0] = x[0, :1]  # a grey image (hue undefined)
    x[1, :, :5] = 0.0  # black pixels
    return x


FACTORS = torch.tensor([0.6, 1.0, 1.4, 0.0, 1.2, 0.9])
SHIFTS = torch.tensor([-0.1, 0.05, 0.0, 0.1, -0.07, 0.5])


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
def test_jitter_ops_match_torchvision(images, ours, theirs):
    batched = ours(images.clone(), FACTORS)
    for i in range(len(images)):
        torch.testing.assert_close(batched[i], theirs(images[i], float(FACTORS[i])), rtol=1e-5, atol=1e-5)


def test_hue_matches_torchvision(images):
    batched = adjust_hue(images.clone(), SHIFTS)
    for i in range(len(images)):
        torch.testing.assert_close(batched[i], TF.adjust_hue(images[i], float(SHIFTS[i])), rtol=1e-4, atol=1e-4)


def test_grayscale_matches_torchvision(images):
    torch.testing.assert_close(grayscale(images).expand(-1, 3, -1, -1), TF.rgb_to_grayscale(images, 3))


def test_blur_matches_torchvision_with_per_image_sigma(images):
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    batched = gaussian_blur(images, sigma, 7)
    for i in range(len(images)):
        expected = TF.gaussian_blur(images[i], [7, 7], [float(sigma[i])] * 2)
        torch.testing.assert_close(batched[i], expected, rtol=1e-5, atol=1e-5)


def test_parameters_follow_the_configured_distribution():
    aug = BatchPhotometric(ViewsConfig(), 224)
    p = aug.sample(20000, torch.Generator().manual_seed(0))
    assert p.jitter.float().mean() == pytest.approx(0.8, abs=0.02)
    assert p.gray.float().mean() == pytest.approx(0.2, abs=0.02)
    assert p.blur.float().mean() == pytest.approx(0.5, abs=0.02)
    assert p.factors[:, :3].min() >= 0.6 and p.factors[:, :3].max() <= 1.4
    assert p.factors[:, 3].abs().max() <= 0.1
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    # every image draws its own order of the four jitter operations
    assert len({tuple(o.tolist()) for o in p.order[:200]}) == 24


def test_apply_follows_parameters_and_normalises():
    cfg = ViewsConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    aug = BatchPhotometric(cfg, 16)
    images = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    params = aug.sample(4, torch.Generator().manual_seed(1))
    params.jitter[:] = False
    params.blur[:] = False
    params.gray[:] = torch.tensor([True, False, True, False])
    out = aug.apply(images, params)
    x = images.float() / 255
    torch.testing.assert_close(out[1], (x[1] - 0.5) / 0.25)
    gray = (TF.rgb_to_grayscale(x[0], 3) - 0.5) / 0.25
    torch.testing.assert_close(out[0], gray, rtol=1e-5, atol=1e-5)
    again = aug(images, torch.Generator().manual_seed(5))
    torch.testing.assert_close(again, aug(images, torch.Generator().manual_seed(5)))
