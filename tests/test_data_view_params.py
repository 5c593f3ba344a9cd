"""msn.data.view_params, the one source of every random choice of the views, and the per-image
path (msn.data.transforms) that applies them with torchvision's functionals."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from msn.config import ViewsConfig
from msn.data import MultiViewDataset, MultiViewTransform, SyntheticImages, build_multiview_data, collate_views
from msn.data.batch_augment import BatchPhotometric
from msn.data.transforms import JITTER_FUNCTIONALS
from msn.data.view_params import (
    CROP_DRAWS,
    FLIP_COLUMN,
    PHOTOMETRIC_COLUMNS,
    blur_kernel_size,
    crop_boxes,
    group_params,
    view_uniforms,
)

from conftest import ROOT, jpeg_folder

VIEWS = ViewsConfig(rand_size=24, focal_size=12, num_focal=2)
#: no colour, grey or blur: a view is its crop, flipped and normalised
PLAIN = replace(VIEWS, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def _image(height=37, width=53):
    return (torch.rand(3, height, width, generator=torch.Generator().manual_seed(4)) * 255).to(torch.uint8)


def test_each_view_is_the_torchvision_resized_crop_of_its_drawn_box():
    image, uniforms = _image(), view_uniforms([(2, 9)], 11, 4)[0]
    crops = MultiViewTransform(PLAIN, photometric=False)(image, uniforms)
    assert [tuple(crop.shape) for crop in crops] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 2
    for view, crop in enumerate(crops):
        size, scale = (24, PLAIN.rand_scale) if view < 2 else (12, PLAIN.focal_scale)
        left, top, right, bottom = crop_boxes(uniforms[view:view + 1, :CROP_DRAWS], 37, 53, scale)[0].int().tolist()
        expected = TF.resized_crop(image, top, left, bottom - top, right - left, [size, size], antialias=True)
        if uniforms[view, FLIP_COLUMN] < PLAIN.hflip:
            expected = TF.horizontal_flip(expected)
        assert crop.dtype == torch.uint8 and torch.equal(crop, expected)


def test_per_sample_and_batched_take_the_same_crops_and_flips_from_the_same_uniforms(tmp_path, tiny_config):
    """``per_sample`` (torchvision per image) and ``batched`` (uint8 crops per image, colour
    per batch) of a folder of varying sizes: with colour, grey and blur off, the two differ
    only by where the normalisation runs (float rounding), so every crop box and flip came
    from the same draw of the same key."""
    folder = jpeg_folder(tmp_path, 6, (30, 36))
    batches = {}
    for augment in ("per_sample", "batched"):
        data_cfg = tiny_config(data={"augment": augment, "views": {"rand_size": 24, "focal_size": 16, "num_focal": 2,
                                                                    "color_jitter_prob": 0.0, "grayscale_prob": 0.0,
                                                                    "blur_prob": 0.0}}).data
        data, collate = build_multiview_data(folder, data_cfg, seed=7)
        batches[augment] = collate([data[(1, index)] for index in range(6)])
    for name in ("target", "anchor", "focal"):
        ours, theirs = getattr(batches["per_sample"], name), getattr(batches["batched"], name)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.equal(batches["per_sample"].target, batches["per_sample"].anchor)


def test_the_per_image_colour_follows_the_drawn_order_factors_grey_and_blur():
    """The per-image path applies each view's own photometric parameters (those
    :class:`BatchPhotometric` applies to a batch): the jitter operations in their drawn order
    with their factors, then grey and blur, then normalisation."""
    image = _image(40, 40)
    keys = [(0, index) for index in range(40)]
    uniforms = view_uniforms(keys, 3, 4)
    transform = MultiViewTransform(VIEWS)
    seen = set()
    for row in uniforms:
        views = transform(image, row)
        crops = MultiViewTransform(VIEWS, photometric=False)(image, row)
        _, _, params = group_params(row[:2], 40, 40, VIEWS.rand_scale, VIEWS)
        for view in range(2):
            expected = crops[view]
            if params.jitter[view]:
                for operation in params.order[view].tolist():
                    expected = JITTER_FUNCTIONALS[operation](expected, float(params.factors[view, operation]))
            if params.gray[view]:
                expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
            if params.blur[view]:
                sigma, kernel = float(params.sigma[view]), blur_kernel_size(VIEWS.blur_sigma[1], 24)
                expected = TF.gaussian_blur(expected, [kernel, kernel], [sigma, sigma])
            expected = TF.normalize(TF.to_dtype(expected, torch.float32, scale=True), list(VIEWS.mean), list(VIEWS.std))
            torch.testing.assert_close(views[view], expected, rtol=0, atol=1e-6)
            seen.add((bool(params.jitter[view]), bool(params.gray[view]), bool(params.blur[view])))
    assert len(seen) >= 6  # jitter, grey and blur each drawn and not drawn, in several combinations


def test_per_sample_views_depend_on_the_key_alone():
    dataset = MultiViewDataset(SyntheticImages(8, 4, 30), MultiViewTransform(VIEWS), seed=2)
    alone = dataset[(3, 5)]
    batch = collate_views([dataset[(3, index)] for index in (7, 5, 1)])
    assert torch.equal(batch.target[1], alone[0][0]) and torch.equal(batch.focal[3 + 1], alone[0][3])
    assert not torch.equal(dataset[(4, 5)][0][0], alone[0][0])


def test_photometric_parameters_of_both_paths_are_one_function():
    uniforms = view_uniforms([(0, index) for index in range(16)], 0, 4).flatten(0, 1)
    boxes, flips, params = group_params(uniforms, 50, 60, VIEWS.rand_scale, VIEWS)
    batched = BatchPhotometric(VIEWS, 24).params(uniforms[:, PHOTOMETRIC_COLUMNS])
    for field in ("jitter", "factors", "order", "gray", "blur", "sigma"):
        assert torch.equal(getattr(params, field), getattr(batched, field)), field
    assert boxes.shape == (64, 4) and flips.dtype == torch.bool


# ------------------------------------------------------------------------- the package's layout
#: msn.data's modules from the bottom up; a module imports only modules on lower floors
#: (msn/data/__init__.py lists them).
FLOORS = {"seeds": 0, "view_params": 1, "decode": 1, "datasets": 2, "fashion_mnist": 2, "shard_index": 2,
          "shard_reader": 3, "shard_writer": 3, "samplers": 3, "batch_augment": 3, "transforms": 3,
          "loader": 4, "build": 5, "shards_cli": 5}
DATA = ROOT / "msn" / "data"


def _data_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("msn.data."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.ImportFrom) and node.module == "msn.data":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[2] for alias in node.names if alias.name.startswith("msn.data."))
    return found


@pytest.mark.parametrize("module", sorted(FLOORS))
def test_each_module_imports_only_lower_floors_and_stays_small(module):
    path = DATA / f"{module}.py"
    upward = sorted(name for name in _data_imports(path) if FLOORS.get(name, 99) >= FLOORS[module])
    assert not upward, f"msn.data.{module} imports {upward}"
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 400


def test_every_module_has_a_floor():
    assert {path.stem for path in DATA.glob("*.py")} - {"__init__"} == set(FLOORS)
