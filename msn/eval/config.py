"""Typed configuration of the low-shot evaluation (``configs/eval_lowshot.yaml``).

The entry point hands the composed Hydra object to :func:`load_eval_config`, which merges it
into :class:`EvalConfig` (unknown keys and wrong types are rejected) and checks the values;
every problem is raised as one :class:`msn.config.ConfigError` whose message starts with the
offending key. The protocol the defaults implement is the MSN reference's low-shot evaluation
(Assran et al., 2022, Sec. 5; docs/method.md Sec. 8).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from msn.config import DATA_SETS, ConfigError, DataConfig, plain_dict
from msn.dataset_roots import FASHION_MNIST_ROOT
from msn.eval.baseline_names import BASELINE_NAMES, PIXELS

#: Feature kinds (docs/method.md Sec. 8; the default is the reference's).
#:
#: * ``cls_pre_ln``: CLS token of the last block, BEFORE the final LayerNorm (reference).
#: * ``cls_post_ln``: CLS token after the final LayerNorm (transformers ``ViTMSNModel``).
#: * ``cls_concat``: the CLS tokens of the last ``feature_blocks`` blocks, each passed
#:   through the final LayerNorm, concatenated (DINO's ``n_last_blocks`` recipe).
#: * ``patch_mean``: mean of the patch tokens (CLS excluded) after the final LayerNorm.
FEATURE_KINDS = ("cls_pre_ln", "cls_post_ln", "cls_concat", "patch_mean")

#: Default lambda grid of the cross-validated sweep: 10^-4 ... 10^2 in half decades.
#: Lambda is in the reference's units (see :mod:`msn.eval.classifier`): sklearn's ``C = 1/lambda``.
DEFAULT_LAMBDA_GRID = [round(10.0 ** (e / 2), 10) for e in range(-8, 5)]


@dataclass
class EvalConfig:
    """The whole low-shot evaluation configuration.

    Attributes:
        backbone: a backbone file or run directory understood by
            :func:`msn.export.load_backbone`; optional only for ``baseline=pixels``
            (for ``random`` and ``supervised`` it gives the architecture).
        backbone_which: ``target`` (EMA encoder, the reference's choice) or ``online``.
        trust_pickle: unpickle a torch ``backbone`` file in full, which runs any code it carries;
            only for a file you trust (default: tensors and plain data only; docs/security.md).
        baseline: ``null`` (evaluate the backbone); ``pixels`` (flattened normalised pixels as features) or
            ``random`` (a randomly initialised copy of the backbone's architecture) or
            ``supervised`` (that architecture trained from scratch, end to end, on each labelled
            subset: :mod:`msn.eval.supervised`).
        feature: one of :data:`FEATURE_KINDS`.
        feature_blocks: number of blocks for ``feature=cls_concat``.
        pixels_size: image side of the ``pixels`` baseline; ``None`` = min(image size, 32).
        shots: labelled images per class, one evaluation per value.
        splits: independent labelled subsets (seeds ``seed .. seed+splits-1``); ignored when
            ``subset_dirs`` is given (one split per folder).
        seed: base seed of the generated subsets (and of the ``random`` baseline's weights).
        percent: also evaluate on ``percent`` % of each class's images (e.g. ``1``).
        subset_dirs: folders of reference-format files, one folder per split, instead of
            generated subsets.
        percent_file: a reference-format file (e.g. SimCLR's ``1percent.txt``) used for
            ``percent`` instead of a generated subset.
        lambd: fixed L2 strength (disables the sweep).
        lambd_grid: candidate strengths of the cross-validated sweep.
        lambd_fallback: strength used where cross-validation is impossible (a class with one
            labelled image, i.e. 1-shot).
        cv_folds: folds of the per-class cross-validation (capped at the smallest class size).
        tol: solver stops when the max-abs gradient of the objective is <= ``tol``.
        max_iter: solver iteration cap.
        solver_dtype: ``float64`` or ``float32``.
        knn_k: neighbours of the k-NN classifier (capped at the labelled set size).
        knn_temperature: temperature T of the k-NN vote weights ``exp(sim / T)``.
        supervised_steps, supervised_min_epochs, supervised_batch_size, supervised_lr,
            supervised_weight_decay: the
            recipe of ``baseline=supervised`` (:class:`msn.eval.supervised.SupervisedOptions`).
        test_limit: score on the first ``test_limit`` test images only (smoke tests); ``None`` = all.
        batch_size: images per forward pass during feature extraction.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
        cache: reuse extracted features across runs.
        cache_dir: feature cache folder; ``None`` = ``$MSN_CACHE_DIR/features`` (default
            ``~/.cache/msn/features``).
        output_dir: where ``results.json``, the chart and the subset files go.
        progress: show tqdm progress bars.
        plot: write the PNG chart.
        data: the data set (``configs/data``); the train split provides the labelled
            subsets, the validation split is the test set.
    """

    backbone: Optional[str] = None
    backbone_which: str = "target"
    trust_pickle: bool = False
    baseline: Optional[str] = None
    feature: str = "cls_pre_ln"
    feature_blocks: int = 4
    pixels_size: Optional[int] = None
    shots: list[int] = field(default_factory=lambda: [1, 2, 5])
    splits: int = 3
    seed: int = 0
    percent: Optional[float] = None
    subset_dirs: list[str] = field(default_factory=list)
    percent_file: Optional[str] = None
    lambd: Optional[float] = None
    lambd_grid: list[float] = field(default_factory=lambda: list(DEFAULT_LAMBDA_GRID))
    lambd_fallback: float = 0.1
    cv_folds: int = 5
    tol: float = 1e-6
    max_iter: int = 1000
    solver_dtype: str = "float64"
    knn_k: int = 20
    knn_temperature: float = 0.07
    supervised_steps: int = 200
    supervised_min_epochs: float = 30.0
    supervised_batch_size: int = 32
    supervised_lr: float = 1e-3
    supervised_weight_decay: float = 0.05
    test_limit: Optional[int] = None
    batch_size: int = 128
    device: str = "auto"
    precision: str = "auto"
    cache: bool = True
    cache_dir: Optional[str] = None
    output_dir: str = "outputs/eval_lowshot"
    progress: bool = True
    plot: bool = True
    data: DataConfig = field(default_factory=DataConfig)


def register_schema() -> None:
    """Register :class:`EvalConfig` as ``eval_schema`` in Hydra's ConfigStore, the base of
    ``configs/eval_lowshot.yaml``, so every key exists (and is typed) at composition time."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


register_schema()


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def validate_eval(cfg: EvalConfig) -> EvalConfig:
    """Check values that the schema's types cannot; raise :class:`ConfigError` naming the key."""
    if cfg.baseline in ("none", "null", ""):
        cfg.baseline = None
    choices = ["null" if name is None else name for name in BASELINE_NAMES]
    _check(cfg.baseline in BASELINE_NAMES, "baseline",
           f"must be {', '.join(choices[:-1])} or {choices[-1]}, got {cfg.baseline!r}")
    if cfg.baseline != PIXELS:
        _check(cfg.backbone is not None, "backbone",
               "is required (a checkpoint file or run directory); only baseline=pixels runs without one")
    if cfg.backbone is not None:
        _check(os.path.exists(cfg.backbone), "backbone", f"file or directory not found: {cfg.backbone}")
    _check(cfg.backbone_which in ("target", "online"), "backbone_which",
           f"must be target or online, got {cfg.backbone_which!r}")
    _check(cfg.feature in FEATURE_KINDS, "feature", f"must be one of {list(FEATURE_KINDS)}, got {cfg.feature!r}")
    _check(cfg.feature_blocks >= 1, "feature_blocks", f"must be >= 1, got {cfg.feature_blocks}")
    _check(cfg.pixels_size is None or cfg.pixels_size > 0, "pixels_size", f"must be positive, got {cfg.pixels_size}")
    _check(len(cfg.shots) > 0 or cfg.percent is not None, "shots", "is empty and no percent is asked for")
    _check(all(k >= 1 for k in cfg.shots), "shots", f"every value must be >= 1, got {list(cfg.shots)}")
    _check(len(set(cfg.shots)) == len(cfg.shots), "shots", f"has duplicates: {list(cfg.shots)}")
    cfg.shots = sorted(cfg.shots)
    _check(cfg.splits >= 1, "splits", f"must be >= 1, got {cfg.splits}")
    _check(cfg.percent is None or 0 < cfg.percent <= 100, "percent", f"must be in (0, 100], got {cfg.percent}")
    for folder in cfg.subset_dirs:
        _check(os.path.isdir(folder), "subset_dirs", f"directory not found: {folder}")
    if cfg.percent_file is not None:
        _check(cfg.percent is not None, "percent_file", "needs percent=P (the percentage the file holds)")
        _check(os.path.isfile(cfg.percent_file), "percent_file", f"file not found: {cfg.percent_file}")
    _check(cfg.lambd is None or (math.isfinite(cfg.lambd) and cfg.lambd > 0), "lambd", f"must be positive, got {cfg.lambd}")
    _check(len(cfg.lambd_grid) > 0, "lambd_grid", "is empty")
    _check(all(math.isfinite(v) and v > 0 for v in cfg.lambd_grid), "lambd_grid", f"values must be positive, got {list(cfg.lambd_grid)}")
    _check(cfg.lambd_fallback > 0, "lambd_fallback", f"must be positive, got {cfg.lambd_fallback}")
    _check(cfg.cv_folds >= 2, "cv_folds", f"must be >= 2, got {cfg.cv_folds}")
    _check(cfg.tol > 0, "tol", f"must be positive, got {cfg.tol}")
    _check(cfg.max_iter >= 1, "max_iter", f"must be >= 1, got {cfg.max_iter}")
    _check(cfg.solver_dtype in ("float32", "float64"), "solver_dtype", f"must be float32 or float64, got {cfg.solver_dtype!r}")
    _check(cfg.knn_k >= 1, "knn_k", f"must be >= 1, got {cfg.knn_k}")
    _check(cfg.knn_temperature > 0, "knn_temperature", f"must be positive, got {cfg.knn_temperature}")
    _check(cfg.supervised_steps >= 1, "supervised_steps", f"must be >= 1, got {cfg.supervised_steps}")
    _check(cfg.supervised_min_epochs >= 0, "supervised_min_epochs", f"must be >= 0, got {cfg.supervised_min_epochs}")
    _check(cfg.supervised_batch_size >= 1, "supervised_batch_size", f"must be >= 1, got {cfg.supervised_batch_size}")
    _check(cfg.supervised_lr > 0, "supervised_lr", f"must be positive, got {cfg.supervised_lr}")
    _check(cfg.supervised_weight_decay >= 0, "supervised_weight_decay",
           f"must be >= 0, got {cfg.supervised_weight_decay}")
    _check(cfg.test_limit is None or cfg.test_limit >= 1, "test_limit", f"must be >= 1, got {cfg.test_limit}")
    _check(cfg.batch_size >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
    _check(cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"), "device", f"must be auto, cpu or cuda[:N], got {cfg.device!r}")
    _check(cfg.precision in ("auto", "fp32", "bf16"), "precision", f"must be auto, fp32 or bf16, got {cfg.precision!r}")
    d = cfg.data
    _check(d.name in DATA_SETS, "data.name", f"unknown data set {d.name!r}; choose from {list(DATA_SETS)}")
    _check(d.num_workers is None or d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _check(d.on_bad_image in ("skip", "error"), "data.on_bad_image", f"must be skip or error, got {d.on_bad_image!r}")
    if d.name in ("imagenet", "folder"):
        _check(d.root is not None, "data.root", f"is required for data={d.name} (an ImageFolder root)")
    _check(d.name != "shards" or d.root is not None, "data.root", "is required for data=shards (a folder written by msn-shards)")
    if d.name != "synthetic" and d.root not in (None, FASHION_MNIST_ROOT):  # the default one is fetched when missing
        _check(os.path.isdir(d.root), "data.root", f"directory not found: {d.root}")
    return cfg


def load_eval_config(raw: DictConfig | dict[str, Any]) -> EvalConfig:
    """Merge a composed config into :class:`EvalConfig` and validate it.

    Raises:
        ConfigError: one line naming the offending key.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        message = str(error).splitlines()[0]
        raise ConfigError(f"{key}: {message}" if key else message) from None
    return validate_eval(cfg)


def eval_config_to_dict(cfg: EvalConfig) -> dict[str, Any]:
    """Plain-container form of a typed eval config (for ``results.json``; nothing resolved again)."""
    return plain_dict(cfg)
