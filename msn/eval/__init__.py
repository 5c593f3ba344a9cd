"""Low-shot evaluation of frozen encoders (MSN paper Sec. 5; docs/method.md Sec. 8).

One concern per module: :mod:`msn.eval.config` (typed options), :mod:`msn.eval.subsets`
(labelled subsets and the reference file format), :mod:`msn.eval.features` (feature
extraction and cache), :mod:`msn.eval.classifier` (logistic regression and k-NN),
:mod:`msn.eval.baselines` (what is evaluated, by ``baseline`` name; the names in
:mod:`msn.eval.baseline_names`), :mod:`msn.eval.report` (the ``results.json`` document,
table, chart), :mod:`msn.eval.lowshot` (the pipeline run by ``eval_lowshot.py``) and
:mod:`msn.eval.finetune` (the fine-tuning comparison behind ``scripts/finetune.py``).
"""

from msn.eval.classifier import (
    LogRegResult,
    SolverOptions,
    fit_logistic_regression,
    knn_predict,
    logreg_objective,
    normalize_rows,
    select_lambda,
)
from msn.eval.config import EvalConfig, load_eval_config
from msn.eval.subsets import SubsetError, generate_split, read_subset_file, scan_subset_dir

__all__ = [
    "EvalConfig",
    "LogRegResult",
    "SolverOptions",
    "SubsetError",
    "fit_logistic_regression",
    "generate_split",
    "knn_predict",
    "load_eval_config",
    "logreg_objective",
    "normalize_rows",
    "read_subset_file",
    "run_lowshot",
    "scan_subset_dir",
    "select_lambda",
]


def run_lowshot(cfg):
    """Run the evaluation (lazy import of :func:`msn.eval.lowshot.run_lowshot`)."""
    from msn.eval.lowshot import run_lowshot as _run

    return _run(cfg)
