"""A small Python API for notebooks and other tools (also ``msn.pretrain`` etc.).

Example::

    import msn

    run = msn.pretrain(["experiment=fmnist_demo", "train.max_steps=50"])
    backbone = msn.load_backbone(run["checkpoint"])        # any format msn reads
    features = backbone.features(images)                   # uint8 [B, 3, H, W] -> [B, D]
    results = msn.lowshot(run["checkpoint"], data="fashion_mnist", shots=[1, 5])

Each function composes the same Hydra configs as the command lines (:mod:`msn.config_files`), so
``overrides`` are exactly what ``train.py`` / ``eval_lowshot.py`` accept, and every bad value
raises :class:`msn.config.ConfigError` with the one-line message the command line prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from msn import checkpoint
from msn.config import literal, load_config
from msn.config_files import CONFIG_DIR


def _compose(config_name: str, overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or a notebook that ran one
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def pretrain(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """MSN pre-training in this process, as ``python train.py OVERRIDES`` would run it.

    Returns:
        ``{"record": last logged metrics, "output_dir": ..., "checkpoint": latest.pt path}``.

    Raises:
        ConfigError: a bad override (one line naming the key).
    """
    from msn.cli import init_state
    from msn.eval.monitor import LowShotProbe
    from msn.train import Trainer

    cfg = load_config(_compose("config", overrides))
    record = Trainer(cfg, init_state=init_state(cfg.init_from, cfg.trust_pickle), probe=LowShotProbe.from_config).fit()
    return {"record": record, "output_dir": Path(cfg.output_dir), "checkpoint": checkpoint.find_latest(cfg.output_dir)}


@dataclass
class Backbone:
    """A loaded encoder with its preprocessing.

    Attributes:
        module: the :class:`msn.models.MSNViT` (eval mode, CPU).
        preprocess: uint8 ``[3, H, W]`` image -> normalised float tensor (the evaluation
            transform: resize, centre crop, normalise).
        info: what the source recorded (path, format, step, architecture, ...).
    """

    module: torch.nn.Module
    preprocess: Any
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """CLS features before the final LayerNorm (the paper's low-shot feature) of uint8
        images ``[B, 3, H, W]`` (or one ``[3, H, W]``)."""
        from msn.eval.features import backbone_features

        batch = images[None] if images.ndim == 3 else images
        pixels = torch.stack([self.preprocess(image) for image in batch])
        return backbone_features(self.module, pixels)


def load_backbone(path: str | os.PathLike, which: str = "target", trust_pickle: bool = False) -> Backbone:
    """Any weights msn reads (our checkpoints and exports, transformers, timm, the reference's
    files) as a :class:`Backbone`. Torch files are read as tensors and plain data only;
    ``trust_pickle=True`` unpickles them in full, which runs any code they carry: only for a
    file you trust (docs/security.md)."""
    from msn.data import eval_transform
    from msn.export import load_backbone as load

    loaded = load(path, which, trust_pickle=trust_pickle)
    return Backbone(loaded.backbone.eval(), eval_transform(loaded.image_size, loaded.mean, loaded.std),
                    dict(loaded.source))


def lowshot(backbone: str | os.PathLike | None, data: str = "fashion_mnist", shots: Sequence[int] = (1, 2, 5),
            overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The low-shot evaluation of ``eval_lowshot.py``; returns the ``results.json`` document.

    Args:
        backbone: weights of any format msn reads (``None`` with ``baseline=...`` overrides).
        data: a ``configs/data`` entry (``fashion_mnist``, ``imagenet``, ``folder``, ``synthetic``).
        shots: labelled images per class.
        overrides: any other ``eval_lowshot.py`` key (``splits=2``, ``data.root=...``).
    """
    from msn.eval.config import load_eval_config
    from msn.eval.lowshot import run_lowshot

    base = [f"data={data}", f"shots=[{','.join(str(int(k)) for k in shots)}]"]
    raw = _compose("eval_lowshot", [*base, *overrides])
    if backbone is not None:  # set after composing, as text: a path is never parsed as an override or interpolation
        raw.backbone = literal(os.fspath(backbone))
    return run_lowshot(load_eval_config(raw))
