"""Shared fixtures: tiny configs that build and train in seconds on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# as train.py does, before torch is imported: idle OpenMP threads sleep instead of spinning, so
# the runs made inside this process (tests/cli_in_process.py) leave the other cores alone
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from msn.config import load_config  # noqa: E402
from msn.config_files import CONFIG_DIR  # noqa: E402
from msn.dataset_roots import FASHION_MNIST_ROOT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The standard ImageNet low-shot split files: ``../shared/data/imagenet_subsets`` beside the
#: repository root, or ``MSN_IMAGENET_SUBSETS``.
IMAGENET_SUBSETS = Path(os.environ.get("MSN_IMAGENET_SUBSETS", ROOT.parent / "shared" / "data" / "imagenet_subsets"))
#: Where the Debian package ``dataset-fashion-mnist`` installs (``make setup`` installs it).
FASHION_MNIST = Path(FASHION_MNIST_ROOT)


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory; otherwise skip the test, or fail it under ``CI=true``
    (CI must run every test: a missing input there is a broken set-up, not a reason to skip)."""
    if not Path(path).is_dir():
        message = f"{what} not found at {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: required)")
        pytest.skip(message)
    return Path(path)


def compose_config(*overrides: str, hydra_config: bool = False):
    """``configs/config.yaml`` composed by Hydra with ``overrides`` (not yet validated)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def first_batch(trainer):
    """The first batch of a trainer's loader (epoch 0, batch 0)."""
    trainer.sampler.set_position(0, 0)
    return next(iter(trainer.loader))


def jpeg_folder(root, count: int = 12, smallest: tuple[int, int] = (40, 48)):
    """An :class:`msn.data.ImageFolderDataset` of ``count`` random-pixel JPEGs in two classes,
    of several sizes from ``smallest`` up (so the per-image crop path runs, not the
    fixed-size batched one)."""
    import torch
    from PIL import Image

    from msn.data import ImageFolderDataset

    g = torch.Generator().manual_seed(0)
    for i in range(count):
        size = (smallest[0] + 8 * (i % 3), smallest[1] + 4 * (i % 4))
        pixels = (torch.rand(*size, 3, generator=g) * 255).to(torch.uint8).numpy()
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:02d}.jpg", quality=90)
    return ImageFolderDataset(str(root))


#: Overrides that make a run of a few steps take about a second.
TINY_OVERRIDES = [
    "data=synthetic",
    "model=vit_mini_4",
    "model.depth=2",
    "model.embed_dim=32",
    "model.num_heads=2",
    "model.patch_size=8",
    "head.hidden_dim=32",
    "head.output_dim=16",
    "loss.num_prototypes=8",
    "optim.batch_size=8",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "mask.ratio=0.5",
    "train.log_every=2",
    "train.progress=false",
    "device=cpu",
]


def tiny_config_dict(output_dir: str | os.PathLike, **sections) -> dict:
    """The plain-dict equivalent of :data:`TINY_OVERRIDES` (merged with ``sections``)."""
    cfg = {
        "output_dir": str(output_dir),
        "device": "cpu",
        "data": {"name": "synthetic", "num_workers": 0, "synthetic_size": 32, "synthetic_classes": 4,
                 "synthetic_image_size": 32, "views": {"rand_size": 32, "focal_size": 16, "num_focal": 2}},
        "model": {"name": "tiny", "arch": "vit_mini", "depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
        "head": {"hidden_dim": 32, "output_dim": 16},
        "loss": {"num_prototypes": 8},
        "mask": {"ratio": 0.5},
        "optim": {"batch_size": 8, "epochs": 2, "warmup_epochs": 1},
        "train": {"log_every": 2, "progress": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: ``tiny_config(**sections)`` -> validated MSNConfig writing under tmp_path."""

    def make(output_dir=None, **sections):
        return load_config(tiny_config_dict(output_dir or tmp_path / "run", **sections))

    return make


def run_script(script: str, *overrides: str, cwd: Path = ROOT, timeout: int = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python <script> overrides...`` from the repo root and capture its output
    (``env`` adds to or replaces variables of the environment)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def pytest_configure(config):  # noqa: ARG001 - pytest hook signature
    """``MSN_TEST_DETERMINISTIC=1``: run the suite under ``torch.use_deterministic_algorithms``."""
    if os.environ.get("MSN_TEST_DETERMINISTIC") == "1":
        import torch

        torch.use_deterministic_algorithms(True)


def pytest_collection_modifyitems(config, items):  # noqa: ARG001 - pytest hook signature
    """Tests marked ``cuda`` are skipped ("needs a CUDA device") where CUDA is not available,
    CI included (CI has no GPU); nothing else is skipped here."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in marked:
        item.add_marker(skip)


#: Checkpoint entries allowed to differ between an interrupted and an uninterrupted run: the
#: config (``train.max_steps``, ``resume``, ``output_dir``) and the wall time.
RUN_SPECIFIC = {("config",), ("extra", "train_seconds")}


def assert_same_state(a, b, path: tuple = ()) -> int:
    """Assert two checkpoint trees are equal to the bit, RNG states included (tensors with
    ``torch.equal``, numpy arrays element-wise, everything else ``==``), except
    :data:`RUN_SPECIFIC`; returns the number of leaves compared."""
    import numpy as np
    import torch

    if path in RUN_SPECIFIC:
        return 0
    where = "/".join(map(str, path)) or "<root>"
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        return sum(assert_same_state(a[k], b[k], path + (k,)) for k in a)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        return sum(assert_same_state(x, y, path + (i,)) for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: dtype/shape"
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{where}: arrays differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
    return 1
