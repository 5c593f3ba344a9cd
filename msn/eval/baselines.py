"""What is evaluated, by ``baseline=...`` name: the backbone itself or one of its baselines.

One class per value of :data:`msn.eval.baseline_names.BASELINE_NAMES` (docs/method.md Sec. 8),
found through :data:`BASELINES`. Each builds the :class:`~msn.eval.features.Encoder` of the run
with the ``backbone`` description of ``results.json``, names its feature, turns extracted rows
into classifier inputs and scores one labelled subset:

* :class:`Backbone` (``null``): frozen features of the loaded backbone, logistic regression
  (lambda cross-validated on the subset, or fixed) and k-NN.
* :class:`Random` (``random``): the same on a randomly initialised copy of its architecture.
* :class:`Pixels` (``pixels``): the same on flattened normalised pixels (no model code loaded).
* :class:`Supervised` (``supervised``): that architecture trained from scratch on each subset
  (:mod:`msn.eval.supervised`), scored by its own predictions.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from msn.config import ConfigError
from msn.data import eval_transform
from msn.eval.baseline_names import PIXELS, RANDOM, SUPERVISED
from msn.eval.classifier import (
    SolverOptions,
    accuracy,
    fit_logistic_regression,
    knn_predict,
    normalize_rows,
    select_lambda,
)
from msn.eval.config import EvalConfig
from msn.eval.features import Encoder, random_like, weights_identity
from msn.eval.subsets import LabelledSubset
from msn.eval.supervised import SupervisedOptions, predict, total_steps, train_supervised

log = logging.getLogger(__name__)


class Backbone:
    """The loaded backbone's frozen features (``baseline=null``; docs/method.md Sec. 8).

    Args:
        cfg: the run's options.
        device: where the classifiers run.
    """

    name: str | None = None

    def __init__(self, cfg: EvalConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.solver = SolverOptions(tol=cfg.tol, max_iter=cfg.max_iter, device=device,
                                    dtype=torch.float64 if cfg.solver_dtype == "float64" else torch.float32)

    def build_encoder(self) -> tuple[Encoder, dict[str, Any]]:
        """The feature function of the run and the ``backbone`` section of ``results.json``."""
        cfg = self.cfg
        loaded = _load_backbone(cfg)
        model = loaded.backbone
        depth = len(model.vit.blocks)
        if cfg.feature == "cls_concat" and cfg.feature_blocks > depth:
            raise ConfigError(f"feature_blocks: {cfg.feature_blocks} exceeds the backbone's depth ({depth})")
        source = dict(loaded.source)
        path = source.get("path", cfg.backbone)
        identity: dict[str, Any] = {"weights": weights_identity(model), "which": cfg.backbone_which,
                                    "feature": cfg.feature}
        if cfg.feature == "cls_concat":
            identity["blocks"] = cfg.feature_blocks
        model = self.weights(model, identity)
        transform = eval_transform(loaded.image_size, loaded.mean, loaded.std)
        encoder = Encoder(identity["name"], transform, loaded.image_size, identity, model, cfg.feature,
                          cfg.feature_blocks)
        info = {**{k: v for k, v in source.items() if _json_safe(v)}, "path": str(path),
                "which": cfg.backbone_which, **_architecture(loaded, model)}
        return encoder, info

    def weights(self, model, identity: dict[str, Any]):
        """The network whose features are evaluated; names it in the cache ``identity``."""
        identity["name"] = "backbone"
        return model

    def feature_kind(self) -> str:
        """``feature.kind`` of ``results.json``."""
        return self.cfg.feature

    def feature_blocks(self) -> int | None:
        """``feature.blocks`` of ``results.json``: the blocks of ``cls_concat``, else ``None``."""
        return self.cfg.feature_blocks if self.cfg.feature == "cls_concat" else None

    def recipe(self) -> dict[str, Any] | None:
        """The ``supervised`` section of ``results.json``: ``None`` for frozen features."""
        return None

    def inputs(self, rows: torch.Tensor, encoder: Encoder) -> torch.Tensor:
        """Classifier inputs from extracted rows: centred and L2-normalised per row."""
        return normalize_rows(rows)

    def evaluate(self, subset: LabelledSubset, encoder: Encoder, train_x: torch.Tensor, train_y: torch.Tensor,
                 test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int) -> dict[str, Any]:
        """Fit logistic regression and k-NN on one labelled subset; its record for ``results.json``."""
        cfg = self.cfg
        start = time.perf_counter()
        options = self.solver
        if cfg.lambd is not None:
            lambd, method, folds, scores = cfg.lambd, "fixed", 0, {}
        else:
            choice = select_lambda(train_x, train_y, num_classes, cfg.lambd_grid, cfg.cv_folds, cfg.lambd_fallback,
                                   options)
            lambd, method, folds, scores = choice.lambd, choice.method, choice.folds, choice.scores
        fit = fit_logistic_regression(train_x, train_y, num_classes, lambd, options)
        acc = accuracy(fit.predict(test_x), test_y)
        knn = accuracy(knn_predict(train_x, train_y, test_x, num_classes, cfg.knn_k, cfg.knn_temperature,
                                   device=options.resolved_device()), test_y)
        missing = int((torch.bincount(train_y, minlength=num_classes) == 0).sum())
        if missing:
            log.warning("%s, split %d: %d classes have no labelled image", subset.key, subset.split, missing)
        solver = {"objective": fit.objective, "grad_max": fit.grad_max, "iterations": fit.iterations,
                  "evaluations": fit.evaluations, "converged": fit.converged}
        return subset_record(cfg, subset, train_y, num_classes, start, acc, knn,
                             {"lambda": float(lambd), "lambda_selection": method, "cv_folds": folds,
                              "cv_scores": [{"lambda": k, **v} for k, v in scores.items()]},
                             ("solver", solver))


class Random(Backbone):
    """A randomly initialised copy of the backbone's architecture (``baseline=random``)."""

    name = RANDOM

    def build_encoder(self) -> tuple[Encoder, dict[str, Any]]:
        encoder, info = super().build_encoder()
        info["random_seed"] = self.cfg.seed
        return encoder, info

    def weights(self, model, identity: dict[str, Any]):
        identity.update(name="random", seed=self.cfg.seed)
        return random_like(model, self.cfg.seed)

    def feature_blocks(self) -> int | None:
        return None


class Pixels(Backbone):
    """Flattened normalised pixels as features (``baseline=pixels``); no backbone is loaded."""

    name = PIXELS

    def build_encoder(self) -> tuple[Encoder, dict[str, Any]]:
        views = self.cfg.data.views
        size = self.cfg.pixels_size or min(views.rand_size, 32)
        encoder = Encoder("pixels", eval_transform(size, views.mean, views.std), size, {"name": "pixels", "size": size})
        return encoder, {"path": self.cfg.backbone, "which": None, "format": None, "image_size": size}

    def feature_kind(self) -> str:
        return "pixels"

    def feature_blocks(self) -> int | None:
        return None


class Supervised(Backbone):
    """The backbone's architecture trained from scratch on each subset (``baseline=supervised``).

    The extracted rows are the normalised images themselves, the network's inputs.
    """

    name = SUPERVISED

    def build_encoder(self) -> tuple[Encoder, dict[str, Any]]:
        loaded = _load_backbone(self.cfg)
        model = loaded.backbone
        transform = eval_transform(loaded.image_size, loaded.mean, loaded.std)
        encoder = Encoder("pixels", transform, loaded.image_size, {"name": "pixels", "size": loaded.image_size},
                          architecture=model)
        info = {"path": str(loaded.source.get("path", self.cfg.backbone)), "which": None,
                **_architecture(loaded, model)}
        return encoder, info

    def feature_kind(self) -> str:
        return "supervised (end to end)"

    def feature_blocks(self) -> int | None:
        return None

    def options(self) -> SupervisedOptions:
        """The training recipe from the ``supervised_*`` keys."""
        cfg = self.cfg
        return SupervisedOptions(steps=cfg.supervised_steps, min_epochs=cfg.supervised_min_epochs,
                                 batch_size=cfg.supervised_batch_size,
                                 lr=cfg.supervised_lr, weight_decay=cfg.supervised_weight_decay)

    def recipe(self) -> dict[str, Any]:
        return {**vars(self.options()), "model": "backbone architecture, random init, + linear classifier on the "
                "post-LayerNorm CLS token, trained end to end on each labelled subset"}

    def inputs(self, rows: torch.Tensor, encoder: Encoder) -> torch.Tensor:
        return rows.view(-1, 3, encoder.image_size, encoder.image_size)

    def evaluate(self, subset: LabelledSubset, encoder: Encoder, train_x: torch.Tensor, train_y: torch.Tensor,
                 test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int) -> dict[str, Any]:
        """Train a network on one labelled subset and score it.

        ``accuracy`` is the trained network's own prediction; ``knn_accuracy`` is the k-NN
        classifier on its (row-normalised) CLS features, as for the other methods.
        """
        cfg, device = self.cfg, self.device
        start = time.perf_counter()
        seed = cfg.seed * 1_000_003 + subset.split * 1009 + len(train_y)
        model = train_supervised(encoder.architecture, train_x, train_y, num_classes, self.options(), seed, device)
        predictions, test_feats = predict(model, test_x, cfg.batch_size, device)
        _, train_feats = predict(model, train_x, cfg.batch_size, device)
        acc = accuracy(predictions, test_y)
        knn = accuracy(knn_predict(normalize_rows(train_feats), train_y, normalize_rows(test_feats), num_classes,
                                   cfg.knn_k, cfg.knn_temperature, device=device), test_y)
        return subset_record(cfg, subset, train_y, num_classes, start, acc, knn,
                             {"lambda": float("nan"), "lambda_selection": "supervised", "cv_folds": 0,
                              "cv_scores": []},
                             ("supervised", {"steps": total_steps(len(train_y), self.options()), "seed": seed}))


#: ``baseline`` value -> what is evaluated; the keys are exactly ``BASELINE_NAMES``.
BASELINES: dict[str | None, type[Backbone]] = {cls.name: cls for cls in (Backbone, Pixels, Random, Supervised)}


def subset_record(cfg: EvalConfig, subset: LabelledSubset, train_y: torch.Tensor, num_classes: int, start: float,
                  acc: float, knn: float, selection: dict[str, Any], detail: tuple[str, dict[str, Any]]
                  ) -> dict[str, Any]:
    """One split's record in ``results.json``: scores, how lambda was chosen, the labelled set.

    Args:
        selection: the ``lambda``, ``lambda_selection``, ``cv_folds`` and ``cv_scores`` entries.
        detail: the method's own entry, ``(key, value)``: the solver's or the training's.
    """
    counts = torch.bincount(train_y, minlength=num_classes)
    present = counts[counts > 0].double()
    return {
        "split": subset.split,
        "accuracy": acc,
        "knn_accuracy": knn,
        **selection,
        "train_size": int(len(train_y)),
        "images_per_class": {"min": int(present.min()), "max": int(present.max()), "mean": float(present.mean())},
        "classes_without_images": int((counts == 0).sum()),
        detail[0]: detail[1],
        "knn_k_used": int(min(cfg.knn_k, len(train_y))),
        "source": subset.source,
        "file": subset.file,
        "seconds": time.perf_counter() - start,
    }


def _load_backbone(cfg: EvalConfig):
    """:func:`msn.export.load_backbone` of ``cfg.backbone``, its errors as :class:`ConfigError`."""
    from msn.export import load_backbone  # imported here: the pixels baseline needs no model code

    try:
        return load_backbone(cfg.backbone, cfg.backbone_which, trust_pickle=cfg.trust_pickle)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ConfigError(f"backbone: cannot load {cfg.backbone}: {error}") from None


def _architecture(loaded, model) -> dict[str, Any]:
    """The input and architecture entries of the ``backbone`` section."""
    return {"image_size": loaded.image_size, "mean": list(loaded.mean), "std": list(loaded.std),
            "embed_dim": model.embed_dim, "depth": len(model.vit.blocks), "patch_size": model.patch_size}


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
