"""The low-shot evaluation pipeline behind ``eval_lowshot.py`` (docs/method.md Sec. 8).

:func:`run_lowshot` does, in order: build what is evaluated (the encoder, or a baseline:
:data:`msn.eval.baselines.BASELINES`), build the labelled subsets of every split (generated or
read from reference-format files), extract the features of every labelled image and of the
whole test split once (cached on disk), then for every split and subset size score the
labelled subset (logistic regression and k-NN, or the supervised network), and finally write
the document (:mod:`msn.eval.report`): the table, ``results.json``, the chart and the subset
files into ``output_dir``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from msn import runtime
from msn.config import ConfigError
from msn.data import build_dataset
from msn.eval import report
from msn.eval.baselines import BASELINES, Backbone
from msn.eval.config import EvalConfig
from msn.eval.features import Encoder, FeatureSet, data_identity, extract_features
from msn.eval.subsets import (
    LabelledSubset,
    NameIndex,
    SubsetError,
    format_percent,
    generate_split,
    percent_key,
    read_subset_file,
    scan_subset_dir,
    write_split,
)

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """:func:`msn.runtime.resolve_device`, its error as a :class:`ConfigError` (one line, exit 2)."""
    try:
        return runtime.resolve_device(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def autocast_name(device: torch.device, precision: str, encoder: Encoder) -> str:
    """``bf16`` or ``fp32``: the precision the encoder ran in (:func:`msn.runtime.autocast_dtype`)."""
    bf16 = encoder.model is not None and runtime.autocast_dtype(precision, device) == torch.bfloat16
    return "bf16" if bf16 else "fp32"


@dataclass
class Splits:
    """The training split (source of the labelled subsets) and the test split."""

    train: Dataset
    test: Dataset
    train_labels: list[int]
    classes: list[str] | None
    num_classes: int
    names: list[str]


def load_splits(cfg: EvalConfig) -> Splits:
    """Both splits of ``cfg.data``; a missing root or mismatched classes is a :class:`ConfigError`."""
    try:
        train_set = build_dataset(cfg.data, train=True)
        test_set = build_dataset(cfg.data, train=False)
    except FileNotFoundError as error:
        message = str(error)
        raise ConfigError(message if message.startswith("data.") else f"data.root: {message}") from None
    train_classes, test_classes = _class_names(train_set), _class_names(test_set)
    if train_classes is not None and test_classes is not None and train_classes != test_classes:
        raise ConfigError(f"data.root: the training and validation splits have different classes "
                          f"({len(train_classes)} vs {len(test_classes)})")
    train_labels = [int(t) for t in train_set.targets]
    test_labels = [int(t) for t in test_set.targets]
    num_classes = len(train_classes) if train_classes is not None else max(train_labels + test_labels) + 1
    return Splits(train_set, test_set, train_labels, train_classes, num_classes, train_set.image_names())


def _class_names(dataset) -> list[str] | None:
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes is not None else None


def build_subsets(cfg: EvalConfig, labels: list[int], names: list[str], class_names,
                  out_dir: Path) -> list[LabelledSubset]:
    """Labelled subsets of every split (see :mod:`msn.eval.subsets`)."""
    subsets: list[LabelledSubset] = []
    index = None

    def name_index() -> NameIndex:
        nonlocal index
        if index is None:
            index = NameIndex(names, f"the {cfg.data.name} training split")
        return index

    want_generated_percent = cfg.percent is not None and cfg.percent_file is None and not cfg.subset_dirs
    if cfg.subset_dirs:
        if cfg.splits != len(cfg.subset_dirs):
            log.info("splits: using %d splits, one per folder of subset_dirs", len(cfg.subset_dirs))
        found_percent = False
        for split, folder in enumerate(cfg.subset_dirs):
            scan = scan_subset_dir(folder)
            for k in cfg.shots:
                chosen, source = scan.shots(k)
                subsets.append(LabelledSubset(str(k), split, name_index().resolve(chosen, source), shots=k,
                                              source=source, file=source))
            if cfg.percent is not None and cfg.percent_file is None and cfg.percent in scan.percent:
                path, chosen = scan.percent[cfg.percent]
                subsets.append(LabelledSubset(percent_key(cfg.percent), split, name_index().resolve(chosen, str(path)),
                                              percent=cfg.percent, source=str(path), file=str(path)))
                found_percent = True
        if cfg.percent is not None and cfg.percent_file is None and not found_percent:
            raise SubsetError(f"percent: no {format_percent(cfg.percent)}percent.txt in subset_dirs; "
                              f"pass percent_file=PATH")
    else:
        for split in range(cfg.splits):
            generated = generate_split(labels, cfg.shots, cfg.seed, split,
                                       cfg.percent if want_generated_percent else None, class_names)
            write_split(out_dir / "subsets" / f"split{split}", generated, names)
            subsets.extend(generated)
    if cfg.percent_file is not None:
        chosen = read_subset_file(cfg.percent_file)
        subsets.append(LabelledSubset(percent_key(cfg.percent), 0, name_index().resolve(chosen, cfg.percent_file),
                                      percent=cfg.percent, source=cfg.percent_file, file=cfg.percent_file))
    return subsets


@dataclass
class Features:
    """Extracted rows: of the labelled images (``rows``: their dataset indices) and of the test split."""

    train: FeatureSet
    test: FeatureSet
    rows: list[int]
    test_rows: int
    cache_dir: Path | None


def extract(cfg: EvalConfig, encoder: Encoder, splits: Splits, subsets: list[LabelledSubset],
            device: torch.device, timing: dict[str, float]) -> Features:
    """Features of every labelled image and of the (first ``test_limit``) test images, once each."""
    cache_dir = None
    if cfg.cache:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(
            os.environ.get("MSN_CACHE_DIR", Path.home() / ".cache" / "msn")) / "features"
    common = dict(batch_size=cfg.batch_size, num_workers=runtime.loader_workers(cfg.data.num_workers), device=device,
                  precision=cfg.precision, cache_dir=cache_dir, progress=cfg.progress)
    wanted = sorted({i for subset in subsets for i in subset.indices})
    tick = time.perf_counter()
    train = extract_features(encoder, splits.train, wanted, data_key=data_identity(cfg.data, splits.train, True),
                             desc="features (labelled)", **common)
    timing["features_train_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    test_rows = len(splits.test) if cfg.test_limit is None else min(cfg.test_limit, len(splits.test))
    test = extract_features(encoder, splits.test, range(test_rows),
                            data_key=data_identity(cfg.data, splits.test, False), desc="features (test)", **common)
    timing["features_test_s"] = time.perf_counter() - tick
    return Features(train, test, wanted, test_rows, cache_dir)


def score_subsets(baseline: Backbone, encoder: Encoder, features: Features, subsets: list[LabelledSubset],
                  num_classes: int, progress: bool) -> tuple[dict[str, list[dict[str, Any]]], int, int]:
    """Score every labelled subset on the readable test rows.

    Returns:
        The records by subset key, the unreadable labelled images left out, the test rows used.
    """
    row_of = {index: row for row, index in enumerate(features.rows)}
    test_valid = features.test.valid
    test_y = features.test.labels[test_valid]
    train_x_all = baseline.inputs(features.train.features, encoder)
    test_x = baseline.inputs(features.test.features[test_valid], encoder)
    skipped_test = int((~test_valid).sum())
    if skipped_test:
        log.warning("%d unreadable test images left out", skipped_test)
    records: dict[str, list[dict[str, Any]]] = {}
    skipped_train = 0
    for subset in tqdm(subsets, desc="classifiers", disable=not progress, unit="fit", leave=False):
        rows = torch.tensor([row_of[i] for i in subset.indices], dtype=torch.long)
        valid = features.train.valid[rows]
        if not valid.all():
            skipped_train += int((~valid).sum())
            log.warning("%s, split %d: %d unreadable labelled images left out", subset.key, subset.split,
                        int((~valid).sum()))
        rows = rows[valid]
        record = baseline.evaluate(subset, encoder, train_x_all[rows], features.train.labels[rows], test_x, test_y,
                                   num_classes)
        records.setdefault(subset.key, []).append(record)
    return records, skipped_train, int(len(test_y))


def run_lowshot(cfg: EvalConfig) -> dict[str, Any]:
    """Run the whole evaluation of ``cfg`` and return the ``results.json`` content.

    Output files in ``cfg.output_dir``: ``results.json``, ``lowshot.png`` (when ``plot``) and
    ``subsets/split<S>/<k>imgs_class.txt`` / ``<P>percent.txt`` for generated subsets.

    Raises:
        ConfigError: a bad option, backbone, data root or subset file (one line, key first).
    """
    start = time.perf_counter()
    timing: dict[str, float] = {}
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)

    tick = time.perf_counter()
    splits = load_splits(cfg)
    baseline = BASELINES[cfg.baseline](cfg, device)
    encoder, backbone_info = baseline.build_encoder()
    subsets = build_subsets(cfg, splits.train_labels, splits.names, splits.classes, out_dir)
    timing["setup_s"] = time.perf_counter() - tick

    features = extract(cfg, encoder, splits, subsets, device, timing)
    tick = time.perf_counter()
    records, skipped_train, test_used = score_subsets(baseline, encoder, features, subsets, splits.num_classes,
                                                      cfg.progress)
    timing["classifiers_s"] = time.perf_counter() - tick

    results = report.results_document(cfg, report.RunFacts(
        baseline=baseline, backbone=backbone_info, encoder=encoder, feature_dim=features.train.features.shape[1],
        device=device, precision=autocast_name(device, cfg.precision, encoder),
        train_images=len(splits.train), test_images=len(splits.test), test_images_used=test_used,
        classes=splits.num_classes, labelled_images_skipped=skipped_train, records=records,
        train_extracted=features.train.extracted, test_extracted=features.test.extracted,
        train_rows=len(features.rows), test_rows=features.test_rows, cache_dir=features.cache_dir,
        timing=timing, started=start))
    report.publish(results, out_dir, cfg.plot)
    return results
