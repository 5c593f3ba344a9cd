"""The live monitor's probe: low-shot scores of the encoder being trained (docs/eval.md "Live monitor").

:meth:`LowShotProbe.from_config` (a :data:`msn.train.monitor.ProbeFactory`) draws, ONCE per
run, ``monitor.train_images`` labelled images (the pool) and ``monitor.test_images`` held-out
ones from the training data set (or from ``monitor.root``), balanced over the classes
(:func:`draw_balanced`), and the k-shot subsets of the pool (:func:`msn.eval.subsets.generate_split`,
``monitor.splits`` seeded splits). Each call recomputes the features of those images with the
current encoder, as the evaluator does (docs/eval.md "Protocol"): the evaluation transform at
the training size (:func:`msn.data.eval_transform`), the CLS token before the final LayerNorm
(:func:`msn.eval.features.backbone_features`), rows centred and L2-normalised
(:func:`msn.eval.classifier.normalize_rows`); then it scores the held-out images with

* ``monitor/knn_top1``: the evaluator's k-NN (:func:`msn.eval.classifier.knn_predict`) over the
  whole pool: cosine similarity, the ``monitor.knn_k`` nearest labelled images each voting
  for its class with weight ``exp(sim / 0.07)`` (similarity-weighted, not a majority vote);
* ``monitor/<k>shot``: the evaluator's L-BFGS logistic regression
  (:func:`msn.eval.classifier.fit_logistic_regression`) on ``k`` images per class of the pool,
  top-1 averaged over the splits. Lambda is fixed at the evaluator's ``lambd_fallback`` (no
  cross-validation): a monitor follows a trend cheaply, the reported number is
  ``eval_lowshot.py``'s.

Accuracies are percentages. Nothing here draws from the global generators.
"""

from __future__ import annotations

import logging
from typing import Callable, ContextManager

import torch
from torch import nn

from msn.config import ConfigError, DataConfig, MSNConfig
from msn.data import build_dataset, eval_transform
from msn.eval.classifier import (SolverOptions, accuracy, fit_logistic_regression, knn_predict, normalize_rows,
                                 predict)
from msn.eval.config import EvalConfig
from msn.eval.features import backbone_features
from msn.eval.subsets import SubsetError, generate_split

#: The seed of the image draw and of the k-shot subsets: the same images for every run of a
#: data set, whatever the training ``seed`` (runs compared in ``msn-plot`` share them).
SEED = 0
#: Images per forward pass.
BATCH = 256

log = logging.getLogger(__name__)


def dataset_labels(dataset) -> list[int]:
    """The labels of every image of ``dataset`` without reading an image (``targets``, through
    any ``torch.utils.data.Subset``).

    Raises:
        ConfigError: the data set has no labels.
    """
    if hasattr(dataset, "targets"):
        return [int(t) for t in dataset.targets]
    if isinstance(dataset, torch.utils.data.Subset):
        labels = dataset_labels(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    raise ConfigError(f"monitor.root: the training data set ({type(dataset).__name__}) has no labels; "
                      f"set monitor.root to a labelled ImageFolder")


def draw_balanced(labels: list[int], counts: tuple[int, ...], seed: int = SEED) -> list[list[int]]:
    """Disjoint draws of ``counts`` images, each as balanced over the classes as the data allow.

    The images of every class are put in one random order (a ``torch.Generator`` seeded with
    ``seed``); the classes are then dealt round-robin (rank 0 of every class, in class order,
    then rank 1, ...), a class that runs out dropping out of the deal. The first ``counts[0]``
    dealt images are the first draw, the next ``counts[1]`` the second, and so on.

    Raises:
        ConfigError: ``sum(counts)`` exceeds the number of images.
    """
    if sum(counts) > len(labels):
        raise ConfigError(f"monitor.train_images: {' + '.join(map(str, counts))} monitor images exceed the "
                          f"{len(labels)} labelled images available; lower monitor.train_images or monitor.test_images")
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    by_class = shuffled[torch.argsort(labels_t[shuffled], stable=True)]  # grouped by class, random within
    grouped = labels_t[by_class]
    first = torch.searchsorted(grouped, grouped, side="left")  # position of each class's first image
    rank = torch.arange(len(labels)) - first  # rank of each image within its class
    dealt = by_class[torch.argsort(rank * (int(grouped.max()) + 1) + grouped, stable=True)]
    draws, start = [], 0
    for count in counts:
        draws.append(dealt[start : start + count].tolist())
        start += count
    return draws


def fitted_counts(available: int, train_images: int, test_images: int) -> tuple[int, int]:
    """``(train_images, test_images)``, or, when the data set holds fewer images than both
    together (a small ``data.subset``), the same proportions of what it holds, with a
    warning: a preset's monitor still runs on a subset."""
    if train_images + test_images <= available:
        return train_images, test_images
    pool = available * train_images // (train_images + test_images)
    log.warning("monitor: %d + %d images requested but the data set holds %d; using %d + %d",
                train_images, test_images, available, pool, available - pool)
    return pool, available - pool


def knn_top1(pool: torch.Tensor, pool_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
             num_classes: int, k: int, temperature: float = EvalConfig.knn_temperature) -> float:
    """Top-1 accuracy (%) of the evaluator's similarity-weighted k-NN on raw feature rows
    (normalised here with :func:`normalize_rows`)."""
    predictions = knn_predict(normalize_rows(pool), pool_labels, normalize_rows(test), num_classes, k, temperature)
    return accuracy(predictions, test_labels)


class LowShotProbe:
    """The images of the monitor, drawn once, and their scoring (module docstring).

    Args:
        dataset: labelled images yielding ``(uint8 [3, H, W] or None, label)``.
        cfg: the run's config (``monitor``, and ``data.views`` for the transform).
    """

    def __init__(self, dataset, cfg: MSNConfig):
        mon = cfg.monitor
        self.dataset, self.knn_k, self.shots = dataset, mon.knn_k, list(mon.shots)
        labels = dataset_labels(dataset)
        counts = fitted_counts(len(labels), mon.train_images, mon.test_images)
        self.pool, self.test = draw_balanced(labels, counts)
        self.pool_labels = torch.tensor([labels[i] for i in self.pool])
        self.test_labels = torch.tensor([labels[i] for i in self.test])
        self.num_classes = max(labels) + 1
        self.shots = self.servable_shots(mon.shots, len(self.pool))
        # positions in the pool of the labelled images of every split and k
        self.subsets = [(subset.shots, subset.indices) for split in range(mon.splits)
                        for subset in generate_split(self.pool_labels.tolist(), self.shots, SEED, split)] if self.shots else []
        views = cfg.data.views
        self.transform = eval_transform(views.rand_size, views.mean, views.std)
        self.image_size = views.rand_size
        self.lambd = EvalConfig.lambd_fallback

    def servable_shots(self, shots: list[int], pool_size: int) -> list[int]:
        """The shot counts the pool has images for in every class. The monitor is an aid, never
        a reason a run cannot start: the others are left out, with one warning (the k-NN score
        needs no shot count and is always there)."""
        servable, left_out = [], []
        for k in shots:
            try:
                generate_split(self.pool_labels.tolist(), [k], SEED, 0)
                servable.append(k)
            except SubsetError:
                left_out.append(k)
        if left_out:
            log.warning("monitor: a pool of %d images has too few images of some class for %s per class; scoring "
                        "k-NN and monitor.shots=%s only (raise monitor.train_images for more)", pool_size,
                        ", ".join(map(str, left_out)), servable)
        return servable

    @classmethod
    def from_config(cls, cfg: MSNConfig, train_dataset) -> "LowShotProbe":
        """The probe of a run (a :data:`msn.train.monitor.ProbeFactory`): images of
        ``monitor.root`` when set, else of the training data set."""
        if cfg.monitor.root is None:
            return cls(train_dataset, cfg)
        folder = DataConfig(name="folder", root=cfg.monitor.root, on_bad_image="skip", views=cfg.data.views)
        return cls(build_dataset(folder, train=True), cfg)

    def features(self, backbone: nn.Module, indices: list[int], device: torch.device, dtype: torch.dtype,
                 autocast: Callable[[], ContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 CPU features ``[n, D]`` of ``dataset[indices]`` and which images were readable."""
        rows, valid = [], []
        for start in range(0, len(indices), BATCH):
            images = []
            for index in indices[start : start + BATCH]:
                image = self.dataset[index][0]
                valid.append(image is not None)
                images.append(self.transform(image) if image is not None
                              else torch.zeros(3, self.image_size, self.image_size))
            with autocast():
                out = backbone_features(backbone, torch.stack(images).to(device, dtype))
            rows.append(out.float().cpu())
        return torch.cat(rows), torch.tensor(valid)

    def __call__(self, backbone: nn.Module, device: torch.device, dtype: torch.dtype,
                 autocast: Callable[[], ContextManager]) -> dict[str, float]:
        """``monitor/knn_top1`` and ``monitor/<k>shot`` (%) of ``backbone`` (a :class:`msn.train.monitor.Probe`)."""
        pool_x, pool_ok = self.features(backbone, self.pool, device, dtype, autocast)
        test_x, test_ok = self.features(backbone, self.test, device, dtype, autocast)
        test_x, test_y = test_x[test_ok], self.test_labels[test_ok]
        values = {"monitor/knn_top1": knn_top1(pool_x[pool_ok], self.pool_labels[pool_ok], test_x, test_y,
                                               self.num_classes, self.knn_k)}
        pool_x, test_x = normalize_rows(pool_x), normalize_rows(test_x)
        options = SolverOptions(device=device if device.type == "cuda" else torch.device("cpu"))
        scores: dict[int, list[float]] = {k: [] for k in self.shots}
        for k, positions in self.subsets:
            rows = torch.tensor(positions)[pool_ok[positions]]
            fit = fit_logistic_regression(pool_x[rows], self.pool_labels[rows], self.num_classes, self.lambd, options)
            scores[k].append(accuracy(predict(fit.weight, test_x), test_y))
        values.update({f"monitor/{k}shot": sum(v) / len(v) for k, v in scores.items()})
        return values
