"""The low-shot evaluation pipeline behind ``eval_lowshot.py`` (docs/method.md Sec. 8).

:func:`run_lowshot` does, in order: load the encoder (or build a baseline), build the
labelled subsets of every split (generated or read from reference-format files), extract the
features of every labelled image and of the whole test split once (cached on disk),
then for every split and subset size fit the logistic regression (lambda cross-validated on
the labelled subset, or fixed) and the k-NN classifier, and finally print the table and
write ``results.json``, the chart and the subset files into ``output_dir``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from msn import runtime
from msn.config import ConfigError
from msn.data import build_dataset, eval_transform
from msn.eval import report
from msn.eval.classifier import (
    SolverOptions,
    accuracy,
    fit_logistic_regression,
    knn_predict,
    normalize_rows,
    select_lambda,
)
from msn.eval.config import EvalConfig, eval_config_to_dict
from msn.eval.features import Encoder, data_identity, extract_features, file_identity, random_like
from msn.eval.supervised import SupervisedOptions, predict, total_steps, train_supervised
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

OBJECTIVE = "mean_i CE(W x_i, y_i) + lambda/(2N) ||W||_F^2 (no intercept; sklearn C = 1/lambda)"


def resolve_device(name: str) -> torch.device:
    """:func:`msn.runtime.resolve_device`, its error as a :class:`ConfigError` (one line, exit 2)."""
    try:
        return runtime.resolve_device(name)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_encoder(cfg: EvalConfig) -> tuple[Encoder, dict[str, Any]]:
    """The feature function of the run and a description of the backbone for ``results.json``."""
    if cfg.baseline == "pixels":
        views = cfg.data.views
        size = cfg.pixels_size or min(views.rand_size, 32)
        transform = eval_transform(size, views.mean, views.std)
        encoder = Encoder("pixels", transform, size, {"name": "pixels", "size": size})
        return encoder, {"path": cfg.backbone, "which": None, "format": None, "image_size": size}

    from msn.export import load_backbone  # imported here: the pixels baseline needs no model code

    try:
        loaded = load_backbone(cfg.backbone, cfg.backbone_which)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ConfigError(f"backbone: cannot load {cfg.backbone}: {error}") from None
    model = loaded.backbone
    depth = len(model.vit.blocks)
    if cfg.baseline == "supervised":
        # The inputs are the normalised images themselves; the network is trained per subset.
        transform = eval_transform(loaded.image_size, loaded.mean, loaded.std)
        encoder = Encoder("pixels", transform, loaded.image_size, {"name": "pixels", "size": loaded.image_size},
                          architecture=model)
        info = {"path": str(loaded.source.get("path", cfg.backbone)), "which": None,
                "image_size": loaded.image_size, "mean": list(loaded.mean), "std": list(loaded.std),
                "embed_dim": model.embed_dim, "depth": depth, "patch_size": model.patch_size}
        return encoder, info
    if cfg.feature == "cls_concat" and cfg.feature_blocks > depth:
        raise ConfigError(f"feature_blocks: {cfg.feature_blocks} exceeds the backbone's depth ({depth})")
    source = dict(loaded.source)
    path = source.get("path", cfg.backbone)
    identity: dict[str, Any] = {"file": file_identity(path) if os.path.exists(path) else str(path),
                                "which": cfg.backbone_which, "feature": cfg.feature}
    if cfg.feature == "cls_concat":
        identity["blocks"] = cfg.feature_blocks
    name = "backbone"
    if cfg.baseline == "random":
        model = random_like(model, cfg.seed)
        identity.update(name="random", seed=cfg.seed)
        name = "random"
    else:
        identity["name"] = "backbone"
    transform = eval_transform(loaded.image_size, loaded.mean, loaded.std)
    encoder = Encoder(name, transform, loaded.image_size, identity, model, cfg.feature, cfg.feature_blocks)
    info = {
        **{k: v for k, v in source.items() if _json_safe(v)},
        "path": str(path),
        "which": cfg.backbone_which,
        "image_size": loaded.image_size,
        "mean": list(loaded.mean),
        "std": list(loaded.std),
        "embed_dim": model.embed_dim,
        "depth": depth,
        "patch_size": model.patch_size,
    }
    if cfg.baseline == "random":
        info["random_seed"] = cfg.seed
    return encoder, info


def build_subsets(cfg: EvalConfig, labels: list[int], names: list[str], class_names, out_dir: Path) -> list[LabelledSubset]:
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


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _class_names(dataset) -> list[str] | None:
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes is not None else None


def evaluate_subset(
    cfg: EvalConfig,
    subset: LabelledSubset,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    options: SolverOptions,
) -> dict[str, Any]:
    """Fit both classifiers on one labelled subset and score them on the test rows."""
    start = time.perf_counter()
    if cfg.lambd is not None:
        lambd, method, folds, scores = cfg.lambd, "fixed", 0, {}
    else:
        choice = select_lambda(train_x, train_y, num_classes, cfg.lambd_grid, cfg.cv_folds, cfg.lambd_fallback, options)
        lambd, method, folds, scores = choice.lambd, choice.method, choice.folds, choice.scores
    fit = fit_logistic_regression(train_x, train_y, num_classes, lambd, options)
    acc = accuracy(fit.predict(test_x), test_y)
    knn = accuracy(knn_predict(train_x, train_y, test_x, num_classes, cfg.knn_k, cfg.knn_temperature,
                               device=options.resolved_device()), test_y)
    counts = torch.bincount(train_y, minlength=num_classes)
    present = counts[counts > 0].double()
    if (counts == 0).any():
        log.warning("%s, split %d: %d classes have no labelled image", subset.key, subset.split, int((counts == 0).sum()))
    return {
        "split": subset.split,
        "accuracy": acc,
        "knn_accuracy": knn,
        "lambda": float(lambd),
        "lambda_selection": method,
        "cv_folds": folds,
        "cv_scores": [{"lambda": k, **v} for k, v in scores.items()],
        "train_size": int(len(train_y)),
        "images_per_class": {"min": int(present.min()), "max": int(present.max()), "mean": float(present.mean())},
        "classes_without_images": int((counts == 0).sum()),
        "solver": {"objective": fit.objective, "grad_max": fit.grad_max, "iterations": fit.iterations,
                   "evaluations": fit.evaluations,
                   "converged": fit.converged},
        "knn_k_used": int(min(cfg.knn_k, len(train_y))),
        "source": subset.source,
        "file": subset.file,
        "seconds": time.perf_counter() - start,
    }


def supervised_options(cfg: EvalConfig) -> SupervisedOptions:
    """The recipe of ``baseline=supervised`` from the ``supervised_*`` keys."""
    return SupervisedOptions(steps=cfg.supervised_steps, min_epochs=cfg.supervised_min_epochs,
                             batch_size=cfg.supervised_batch_size,
                             lr=cfg.supervised_lr, weight_decay=cfg.supervised_weight_decay)


def evaluate_supervised_subset(
    cfg: EvalConfig,
    subset: LabelledSubset,
    encoder: Encoder,
    train_images: torch.Tensor,
    train_y: torch.Tensor,
    test_images: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    device: torch.device,
) -> dict[str, Any]:
    """Train the supervised from-scratch baseline on one labelled subset and score it.

    ``accuracy`` is the trained network's own prediction; ``knn_accuracy`` is the k-NN
    classifier on its (row-normalised) CLS features, as for the other methods.
    """
    start = time.perf_counter()
    seed = cfg.seed * 1_000_003 + subset.split * 1009 + len(train_y)
    model = train_supervised(encoder.architecture, train_images, train_y, num_classes, supervised_options(cfg),
                             seed, device)
    predictions, test_feats = predict(model, test_images, cfg.batch_size, device)
    _, train_feats = predict(model, train_images, cfg.batch_size, device)
    acc = accuracy(predictions, test_y)
    knn = accuracy(knn_predict(normalize_rows(train_feats), train_y, normalize_rows(test_feats), num_classes,
                               cfg.knn_k, cfg.knn_temperature, device=device), test_y)
    counts = torch.bincount(train_y, minlength=num_classes)
    present = counts[counts > 0].double()
    return {
        "split": subset.split,
        "accuracy": acc,
        "knn_accuracy": knn,
        "lambda": float("nan"),
        "lambda_selection": "supervised",
        "cv_folds": 0,
        "cv_scores": [],
        "train_size": int(len(train_y)),
        "images_per_class": {"min": int(present.min()), "max": int(present.max()), "mean": float(present.mean())},
        "classes_without_images": int((counts == 0).sum()),
        "supervised": {"steps": total_steps(len(train_y), supervised_options(cfg)), "seed": seed},
        "knn_k_used": int(min(cfg.knn_k, len(train_y))),
        "source": subset.source,
        "file": subset.file,
        "seconds": time.perf_counter() - start,
    }


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
    names = train_set.image_names()
    encoder, backbone_info = build_encoder(cfg)
    subsets = build_subsets(cfg, train_labels, names, train_classes, out_dir)
    timing["setup_s"] = time.perf_counter() - tick

    cache_dir = None
    if cfg.cache:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(
            os.environ.get("MSN_CACHE_DIR", Path.home() / ".cache" / "msn")) / "features"
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.data.num_workers, device=device,
                  precision=cfg.precision, cache_dir=cache_dir, progress=cfg.progress)
    wanted = sorted({i for subset in subsets for i in subset.indices})
    tick = time.perf_counter()
    train_feats = extract_features(encoder, train_set, wanted, data_key=data_identity(cfg.data, train_set, True),
                                   desc="features (labelled)", **common)
    timing["features_train_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    test_rows = len(test_set) if cfg.test_limit is None else min(cfg.test_limit, len(test_set))
    test_feats = extract_features(encoder, test_set, range(test_rows),
                                  data_key=data_identity(cfg.data, test_set, False), desc="features (test)", **common)
    timing["features_test_s"] = time.perf_counter() - tick

    row_of = {index: row for row, index in enumerate(wanted)}
    supervised = cfg.baseline == "supervised"
    test_valid = test_feats.valid
    test_y = test_feats.labels[test_valid]
    if supervised:  # rows are flattened normalised images: the inputs of the networks trained below
        shape = (3, encoder.image_size, encoder.image_size)
        train_x_all = train_feats.features.view(-1, *shape)
        test_x = test_feats.features[test_valid].view(-1, *shape)
    else:
        train_x_all = normalize_rows(train_feats.features)
        test_x = normalize_rows(test_feats.features[test_valid])
    skipped_test = int((~test_valid).sum())
    if skipped_test:
        log.warning("%d unreadable test images left out", skipped_test)

    options = SolverOptions(tol=cfg.tol, max_iter=cfg.max_iter,
                            dtype=torch.float64 if cfg.solver_dtype == "float64" else torch.float32, device=device)
    tick = time.perf_counter()
    records: dict[str, list[dict[str, Any]]] = {}
    skipped_train = 0
    for subset in tqdm(subsets, desc="classifiers", disable=not cfg.progress, unit="fit", leave=False):
        rows = torch.tensor([row_of[i] for i in subset.indices], dtype=torch.long)
        valid = train_feats.valid[rows]
        if not valid.all():
            skipped_train += int((~valid).sum())
            log.warning("%s, split %d: %d unreadable labelled images left out", subset.key, subset.split,
                        int((~valid).sum()))
        rows = rows[valid]
        if supervised:
            record = evaluate_supervised_subset(cfg, subset, encoder, train_x_all[rows], train_feats.labels[rows],
                                                test_x, test_y, num_classes, device)
        else:
            record = evaluate_subset(cfg, subset, train_x_all[rows], train_feats.labels[rows], test_x, test_y,
                                     num_classes, options)
        records.setdefault(subset.key, []).append(record)
    timing["classifiers_s"] = time.perf_counter() - tick

    shots = {str(k): report.summarise(records[str(k)]) for k in cfg.shots}
    percent = {}
    if cfg.percent is not None:
        key = percent_key(cfg.percent)
        percent[format_percent(cfg.percent)] = {"percent": cfg.percent, **report.summarise(records[key])}
    wall = time.perf_counter() - start
    timing["total_s"] = wall
    results: dict[str, Any] = {
        "schema": report.SCHEMA,
        "schema_version": report.SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "backbone": backbone_info,
        "baseline": cfg.baseline,
        "feature": {
            "kind": {"pixels": "pixels", "supervised": "supervised (end to end)"}.get(cfg.baseline, cfg.feature),
            "blocks": cfg.feature_blocks if cfg.feature == "cls_concat" and cfg.baseline is None else None,
            "dim": int(train_feats.features.shape[1]),
            "image_size": encoder.image_size,
            "transform": repr(encoder.transform),
            "normalisation": "per row: subtract the row mean, divide by the L2 norm",
            "device": str(device),
            "precision": str(autocast_name(device, cfg.precision, encoder)),
        },
        "data": {
            "name": cfg.data.name,
            "root": cfg.data.root,
            "train_images": len(train_set),
            "test_images": len(test_set),
            "test_images_used": int(len(test_y)),
            "classes": num_classes,
            "labelled_images_skipped": skipped_train,
        },
        "classifier": {
            "type": "multinomial logistic regression, L2 penalty, no intercept",
            "objective": OBJECTIVE,
            "solver": "L-BFGS (strong Wolfe), full batch",
            "lambda_fixed": cfg.lambd,
            "lambda_grid": sorted(cfg.lambd_grid),
            "lambda_fallback": cfg.lambd_fallback,
            "cv_folds": cfg.cv_folds,
            "tol": cfg.tol,
            "max_iter": cfg.max_iter,
            "dtype": cfg.solver_dtype,
        },
        "supervised": ({**vars(supervised_options(cfg)), "model": "backbone architecture, random init, + linear "
                        "classifier on the post-LayerNorm CLS token, trained end to end on each labelled subset"}
                       if supervised else None),
        "knn": {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "similarity": "cosine"},
        "subsets": {
            "generated": not cfg.subset_dirs,
            "seed": cfg.seed,
            "splits": len(cfg.subset_dirs) or cfg.splits,
            "folder": str(out_dir / "subsets") if not cfg.subset_dirs else None,
            "subset_dirs": list(cfg.subset_dirs),
            "percent_file": cfg.percent_file,
        },
        "shots": shots,
        "percent": percent,
        "features_extracted": {"train": train_feats.extracted, "test": test_feats.extracted,
                               "train_rows": len(wanted), "test_rows": test_rows,
                               "cache_dir": str(cache_dir) if cache_dir else None},
        "timing": timing,
        "wall_time_s": wall,
        "config": eval_config_to_dict(cfg),
    }
    print(report.format_table(results), flush=True)
    json_path = report.write_json(results, out_dir / "results.json")
    if cfg.plot:
        png = report.plot(results, out_dir / "lowshot.png")
        log.info("chart: %s", png)
    log.info("results: %s", json_path)
    return results


def autocast_name(device: torch.device, precision: str, encoder: Encoder) -> str:
    """``bf16`` or ``fp32``: the precision the encoder ran in."""
    if encoder.model is None:
        return "fp32"
    return "bf16" if runtime.autocast_dtype(precision, device) == torch.bfloat16 else "fp32"
