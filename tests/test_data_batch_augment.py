"""msn.data.batch_augment: each batched operation equals torchvision's per-image functional.

Tolerances: the operations are element-wise on values in [0, 1] (plus a 3-term grey sum and
a separable blur of a few dozen taps), so two implementations differ by a few float32 ulps (6e-8)
per operation; the vectorised exp/pow/atan2 kernels that the CPU's instruction set selects
add a few more. 1e-5 is ~170 ulps of 1, comfortably above that and far below any real
difference of a parameter (a factor 1.01 moves pixels by ~5e-3); hue, which goes through
RGB -> HSV -> RGB with divisions by small chroma, gets 1e-4."""

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


def _assert_photometric_distribution(p) -> None:
    """Default ViewsConfig: jitter p 0.8 (factors in [0.6, 1.4], hue in [-0.1, 0.1], a uniform
    order), grayscale p 0.2, blur p 0.5 with sigma uniform in [0.1, 2]; >= 20000 images, so
    0.02 is more than 6 standard deviations of a rate."""
    assert p.jitter.float().mean() == pytest.approx(0.8, abs=0.02)
    assert p.gray.float().mean() == pytest.approx(0.2, abs=0.02)
    assert p.blur.float().mean() == pytest.approx(0.5, abs=0.02)
    assert p.factors[:, :3].min() >= 0.6 and p.factors[:, :3].max() <= 1.4
    assert p.factors[:, 3].abs().max() <= 0.1
    assert p.factors.mean(dim=0).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0], abs=0.01)
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0 and p.sigma.mean() == pytest.approx(1.05, abs=0.02)
    # every image draws its own order of the four jitter operations, each about as often
    assert len({tuple(o.tolist()) for o in p.order[:200]}) == 24
    counts = torch.unique(p.order, dim=0, return_counts=True)[1].float() / len(p.order)
    assert counts.shape == (24,) and (counts - 1 / 24).abs().max() < 0.01


def test_parameters_follow_the_configured_distribution():
    aug = BatchPhotometric(ViewsConfig(), 224)
    _assert_photometric_distribution(aug.sample(20000, torch.Generator().manual_seed(0)))


def test_keyed_uniforms_depend_on_the_image_key_alone():
    """:func:`view_uniforms`: torch.rand's uniforms, one block per image, keyed by
    ``(seed, epoch, index)``: the same block in any batch, at any place."""
    from msn.data.view_params import VIEW_DRAWS, view_uniforms

    keys = [(0, 5), (1, 5), (0, 6), (3, 1_281_166)]
    u = view_uniforms(keys, 7, 4)
    assert u.shape == (4, 4, VIEW_DRAWS) and u.dtype == torch.float32
    for i, key in enumerate(keys):
        assert torch.equal(view_uniforms([key], 7, 4)[0], u[i])
        assert torch.equal(view_uniforms(keys[::-1], 7, 4)[len(keys) - 1 - i], u[i])
    # another seed, epoch or index: another block
    blocks = [u[i].flatten() for i in range(4)] + [view_uniforms([(0, 5)], 8, 4)[0].flatten()]
    assert all(not torch.equal(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1:])
    many = view_uniforms([(e, i) for e in range(3) for i in range(1000)], 0, 12)
    assert many.min() >= 0 and many.max() < 1 and (many * 2**24 == (many * 2**24).round()).all()  # rand's grid
    assert many.mean() == pytest.approx(0.5, abs=0.002) and many.var() == pytest.approx(1 / 12, abs=0.001)
    # no correlation between neighbouring images, nor between the columns of a view
    # a sample correlation of n independent pairs has standard deviation 1/sqrt(n): 0.0009 for
    # the 1.26 M pairs of neighbouring images (bound 0.005), 0.018 for 3000 images' columns (0.08)
    assert torch.corrcoef(torch.stack([many[:-1].flatten(), many[1:].flatten()]))[0, 1].abs() < 0.005
    assert torch.corrcoef(many[:, 0, :].T).fill_diagonal_(0).abs().max() < 0.08


def test_keyed_plans_follow_the_configured_distribution():
    """The loader's plans (keyed draws, :meth:`BatchMultiView.sample`) have the distributions
    of torchvision's per-image pipeline: photometric as above, flips p 0.5, crop areas those
    of ``RandomResizedCrop`` (mean and spread within 0.01 of 4000 torchvision draws)."""
    from torchvision.transforms.v2 import RandomResizedCrop

    from msn.data.batch_augment import BatchMultiView, DeferredPhotometric
    from msn.data.view_params import view_uniforms

    cfg = ViewsConfig()
    views = BatchMultiView(cfg)
    uniforms = view_uniforms([(e, i) for e in range(2) for i in range(5000)], 0, views.num_views)
    plan = views.sample(uniforms, 64, 48)
    assert plan.rand_boxes.shape == (20000, 4) and plan.focal_boxes.shape == (10 * 10000, 4)
    _assert_photometric_distribution(plan.rand_params)
    _assert_photometric_distribution(plan.focal_params)
    assert plan.rand_flip.float().mean() == pytest.approx(0.5, abs=0.02)
    assert plan.focal_flip.float().mean() == pytest.approx(0.5, abs=0.01)
    torch.manual_seed(0)
    for boxes, scale in ((plan.rand_boxes, cfg.rand_scale), (plan.focal_boxes, cfg.focal_scale)):
        rrc = RandomResizedCrop(8, scale=tuple(scale))
        theirs = torch.tensor([(lambda p: p["height"] * p["width"])(rrc.make_params([torch.zeros(3, 64, 48)]))
                               for _ in range(4000)], dtype=torch.float) / (64 * 48)
        ours = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (64 * 48)
        assert ours.mean() == pytest.approx(theirs.mean().item(), abs=0.01)
        assert ours.std() == pytest.approx(theirs.std().item(), abs=0.01)
    # the varying-size path takes the same photometric parameters from the same uniforms
    deferred = DeferredPhotometric.sample(views.rand, views.focal, uniforms[:100])
    same = views.sample(uniforms[:100], 64, 48)
    for a, b in ((deferred.rand_params, same.rand_params), (deferred.focal_params, same.focal_params)):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("jitter", "factors", "order", "gray", "blur", "sigma"))


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


def test_crop_boxes_follow_random_resized_crop():
    from torchvision.transforms.v2 import RandomResizedCrop

    from msn.data.view_params import sample_crop_boxes

    boxes = sample_crop_boxes(20000, 28, 28, (0.3, 1.0), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 28).all() and (boxes[:, 3] <= 28).all()
    assert (w == w.round()).all() and (w > 0).all()
    rrc = RandomResizedCrop(28, scale=(0.3, 1.0))
    torch.manual_seed(0)
    theirs = torch.tensor([(lambda p: p["height"] * p["width"])(rrc.make_params([torch.zeros(3, 28, 28)]))
                           for _ in range(4000)], dtype=torch.float) / 784
    ours = w * h / 784
    assert ours.mean() == pytest.approx(theirs.mean().item(), abs=0.01)
    assert ours.std() == pytest.approx(theirs.std().item(), abs=0.01)


def test_resized_crops_sample_the_box_and_flip():
    from msn.data.batch_augment import resized_crops

    ramp = torch.arange(32.0).expand(1, 3, 32, 32).clone()  # value = column index
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [8.0, 2.0, 16.0, 10.0]])
    out = resized_crops(ramp, boxes, torch.tensor([0, 0]), 8, flip=torch.tensor([False, True]))
    # output column j samples x = x0 + (j + 0.5) * w / 8 in continuous coordinates = pixel value - 0.5
    expected0 = 4 + (torch.arange(8) + 0.5) * 16 / 8 - 0.5
    expected1 = (8 + (torch.arange(8) + 0.5) * 8 / 8 - 0.5).flip(0)
    torch.testing.assert_close(out[0, 0, 3], expected0)
    torch.testing.assert_close(out[1, 2, 5], expected1)


def test_batch_multiview_shapes_order_and_determinism():
    from msn.data.batch_augment import BatchMultiView

    cfg = ViewsConfig(rand_size=28, focal_size=12, num_focal=3)
    make = BatchMultiView(cfg)
    images = (torch.rand(5, 3, 28, 28) * 255).to(torch.uint8)
    images[2] = 0  # a black image stays constant (normalised black) in every view
    target, anchor, focal = make(images, torch.Generator().manual_seed(0))
    assert target.shape == (5, 3, 28, 28) and anchor.shape == (5, 3, 28, 28) and focal.shape == (15, 3, 12, 12)
    black = (0 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    for view in (target[2], anchor[2], focal[2], focal[5 + 2], focal[10 + 2]):  # view-major rows of image 2
        torch.testing.assert_close(view.mean(dim=(1, 2)), black, rtol=1e-4, atol=1e-4)
    again = make(images, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((target, anchor, focal), again))
