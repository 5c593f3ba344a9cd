"""Classifiers of the low-shot protocol on frozen features: logistic regression and k-NN.

Features (docs/method.md Sec. 8): every row is mean-centred over its own dimensions and
L2-normalised (:func:`normalize_rows`) before either classifier sees it.

Logistic regression (docs/method.md Sec. 8; MSN paper Sec. 5): multinomial, L2 penalty, no
intercept. With ``N`` labelled rows ``x_i`` (normalised), labels ``y_i`` in ``0..C-1`` and a
weight matrix ``W`` of shape ``[C, D]``, :func:`fit_logistic_regression` minimises

    J(W) = (1/N) * sum_i [ logsumexp_c (W x_i)_c - (W x_i)_{y_i} ]  +  (lambda / (2N)) * ||W||_F^2

i.e. the mean cross-entropy plus ``lambda/(2N)`` times the squared Frobenius norm. The units of
``lambda`` are the reference's: its evaluator passes ``lambd / N`` to cyanure, which minimises
``mean loss + (lambd/2)||W||^2``, so the reference's ``lambd`` (0.00025 default, 0.075 for 1%
with ViT-S/16) means the same here. It is also scikit-learn's ``1/C``:
``LogisticRegression(C=1/lambda, fit_intercept=False)`` minimises
``C * sum_i CE_i + ||W||^2 / 2 = C * N * J(W)``, the same minimiser.

The solver is full-batch L-BFGS (two-loop recursion, :func:`_lbfgs`) with its own strong-Wolfe
line search on an analytic gradient, in float64 by default, on the GPU when there is one. It
stops when ``max_c,d |dJ/dW_cd| <= tol`` (the same criterion as scikit-learn's ``gtol`` on
the same objective), or after ``max_iter`` iterations. It is deterministic: the start is
``W = 0`` (or a given warm start) and there is no sampling. The first step along ``-g`` has
the length that minimises the quadratic model of ``J`` there (one extra product with the
softmax Hessian); every later line search tries the unit step first. The returned point is
the best one the search evaluated, never evaluated twice (docs/eval.md, "Solver at
ImageNet's size").

Lambda selection (:func:`select_lambda`): cross-validation on the labelled subset only (the
test set is never seen). Within every class the labelled images, in subset order, are dealt
to ``F = min(cv_folds, smallest class size)`` folds (image ``j`` of a class goes to fold
``j mod F``), so each fold holds out about ``1/F`` of every class ("leave-one-out per class"
when a class has ``F`` images). The chosen lambda has the best mean validation accuracy,
ties broken by the lower mean validation cross-entropy, then by the larger lambda. With a
class of a single labelled image (1-shot) no fold can hold an image out without losing
the class; then the documented fallback ``lambd_fallback`` is used and reported as such.

k-NN (:func:`knn_predict`): cosine similarity to the labelled rows, the ``k`` most similar
vote with weight ``exp(sim / T)`` (T = 0.07, k = 20 capped at the labelled set size; the
weighted k-NN of Wu et al. 2018 / DINO), the class with the largest total weight wins.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from msn.eval import lbfgs
from msn.eval.config import EvalConfig  # the solver defaults are the evaluator schema's (one home)
from msn.runtime import resolve_device

#: Rows of the test set scored per chunk (bounds memory of the [chunk, N] similarity matrix).
CHUNK = 4096

#: CPU solves with fewer multiply-adds per iteration (N * D * C) run on one thread: the
#: OpenMP fork/join of tiny matrix products costs more than it saves, and on busy cores
#: it can make a solve 50x slower.
SINGLE_THREAD_WORK = 5e7


@contextlib.contextmanager
def cpu_threads(device: torch.device, work: float):
    """Use one intra-op thread for small CPU problems; restore the setting afterwards."""
    if device.type != "cpu" or work >= SINGLE_THREAD_WORK or torch.get_num_threads() == 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def normalize_rows(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean-centre every row over its own dimensions, then scale it to unit L2 norm.

    A constant row becomes all zeros.
    """
    features = features - features.mean(dim=1, keepdim=True)
    return features / features.norm(dim=1, keepdim=True).clamp_min(eps)


def lambda_to_sklearn_c(lambd: float) -> float:
    """scikit-learn's ``C`` with the same optimum as our ``lambda`` (``C = 1/lambda``)."""
    return 1.0 / lambd


def logreg_objective(weight: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, lambd: float) -> torch.Tensor:
    """``J(W)`` of the module docstring: mean cross-entropy + ``lambda/(2N) ||W||^2``."""
    logits = features @ weight.T
    loss = (torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None]).squeeze(1)).mean()
    return loss + lambd / (2 * features.shape[0]) * weight.pow(2).sum()


@dataclass
class SolverOptions:
    """Settings of :func:`fit_logistic_regression`.

    Attributes:
        tol: stop when the max-abs gradient of ``J`` is at most ``tol``.
        max_iter: L-BFGS iteration cap.
        dtype: ``torch.float64`` (default) or ``torch.float32``.
        device: where the solve runs (``None``: CUDA when available, else CPU).
        history_size: L-BFGS memory (pairs of vectors kept).
    """

    tol: float = EvalConfig.tol
    max_iter: int = EvalConfig.max_iter
    dtype: torch.dtype = torch.float64
    device: Optional[torch.device] = None
    history_size: int = 20

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return resolve_device("auto")


@dataclass
class LogRegResult:
    """A fitted classifier and how the solve went.

    Attributes:
        weight: ``[C, D]`` weights (solver dtype, on CPU).
        lambd: the L2 strength used.
        objective: final ``J(W)``.
        grad_max: final max-abs gradient.
        iterations: L-BFGS iterations done.
        evaluations: objective + gradient evaluations (line search included).
        converged: ``grad_max <= tol``.
    """

    weight: torch.Tensor
    lambd: float
    objective: float
    grad_max: float
    iterations: int
    evaluations: int
    converged: bool

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Class indices for (already normalised) rows: ``argmax_c (W x)_c``."""
        return predict(self.weight, features)


def predict(weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``argmax_c (W x)_c`` for every row, computed in chunks on ``weight``'s device."""
    out = []
    for start in range(0, features.shape[0], CHUNK):
        rows = features[start : start + CHUNK].to(weight.device, weight.dtype)
        out.append((rows @ weight.T).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lambd: float,
    options: SolverOptions | None = None,
    init: torch.Tensor | None = None,
) -> LogRegResult:
    """Minimise ``J(W)`` (module docstring) by full-batch L-BFGS with a strong-Wolfe line search.

    Args:
        features: ``[N, D]`` rows (normalise them first with :func:`normalize_rows`).
        labels: ``[N]`` class indices in ``0 .. num_classes-1``.
        num_classes: ``C``; classes without a labelled row get weights too.
        lambd: L2 strength (> 0), see the module docstring for units.
        options: solver settings.
        init: optional ``[C, D]`` warm start (default zeros).
    """
    if lambd <= 0:
        raise ValueError(f"lambd must be positive, got {lambd}")
    options = options or SolverOptions()
    device = options.resolved_device()
    x = features.to(device, options.dtype)
    y = labels.to(device, torch.long)
    n = x.shape[0]
    rows = torch.arange(n, device=device)
    weight = torch.zeros(num_classes, x.shape[1], dtype=options.dtype, device=device)
    if init is not None:
        weight.copy_(init)
    state: dict = {}

    def evaluate(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        state["residual"] = None
        # one matmul for the logits, softmax in place (one pass of exp), one for the gradient
        logits = torch.mm(x, w.T)
        logits.sub_(logits.amax(dim=1, keepdim=True))
        picked = logits[rows, y].sum()
        logits.exp_()
        norm = logits.sum(dim=1, keepdim=True)
        loss = (torch.log(norm).sum() - picked) / n + lambd / (2 * n) * w.pow(2).sum()
        logits.div_(norm)
        logits[rows, y] -= 1.0
        grad = torch.mm(logits.T, x)
        grad.div_(n).add_(w, alpha=lambd / n)
        state["residual"] = logits  # softmax minus one-hot at w, until the next evaluation
        return float(loss), grad

    def curvature(direction: torch.Tensor) -> float:
        """``d' H d`` at the point last evaluated (softmax Hessian from its probabilities)."""
        probs = state["residual"]
        probs[rows, y] += 1.0
        z = torch.mm(x, direction.T)
        pz = (probs * z).sum(dim=1)
        return float(((probs * z).mul_(z).sum() - pz.pow(2).sum()) / n + lambd / n * direction.pow(2).sum())

    with cpu_threads(device, float(n) * x.shape[1] * num_classes):
        return _lbfgs(evaluate, curvature, weight, float(lambd), options)


def _lbfgs(evaluate, curvature, weight: torch.Tensor, lambd: float, options: SolverOptions) -> LogRegResult:
    """:func:`msn.eval.lbfgs.minimize` with the options' limits, as a :class:`LogRegResult`."""
    found = lbfgs.minimize(evaluate, curvature, weight, options.tol, options.max_iter, options.history_size)
    return LogRegResult(weight=found.weight.cpu(), lambd=float(lambd), objective=found.objective,
                        grad_max=found.grad_max, iterations=found.iterations, evaluations=found.evaluations,
                        converged=found.grad_max <= options.tol)


def cv_folds(labels: torch.Tensor, folds: int) -> tuple[torch.Tensor, int]:
    """Per-class fold assignment: image ``j`` (in row order) of every class -> fold ``j mod F``.

    Returns:
        (fold index per row, F) with ``F = min(folds, smallest class size)``; ``F < 2``
        means cross-validation is impossible.
    """
    labels = labels.cpu()
    classes, counts = torch.unique(labels, return_counts=True)
    num_folds = min(int(folds), int(counts.min())) if len(classes) else 0
    assignment = torch.empty_like(labels)
    for cls in classes:
        rows = torch.nonzero(labels == cls).squeeze(1)
        assignment[rows] = torch.arange(len(rows)) % max(num_folds, 1)
    return assignment, num_folds


@dataclass
class LambdaChoice:
    """The outcome of :func:`select_lambda`.

    Attributes:
        lambd: the chosen L2 strength.
        method: ``fixed`` (given), ``cv`` (cross-validated) or ``fallback`` (1-shot).
        folds: number of folds used (0 unless ``cv``).
        scores: per candidate lambda, mean validation accuracy (%) and cross-entropy.
    """

    lambd: float
    method: str
    folds: int = 0
    scores: dict[float, dict[str, float]] = field(default_factory=dict)


def select_lambda(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    grid: Sequence[float],
    folds: int = 5,
    fallback: float = 0.1,
    options: SolverOptions | None = None,
) -> LambdaChoice:
    """Choose lambda by per-class cross-validation on the labelled rows only.

    See the module docstring for the folds, the score and the 1-shot fallback. Within a fold
    the grid is solved from the largest lambda to the smallest, each solve warm-started from
    the previous one (same optimum, fewer iterations).

    Args:
        features: ``[N, D]`` normalised labelled rows, in subset order.
        labels: ``[N]`` their classes.
        num_classes: ``C``.
        grid: candidate lambdas.
        folds: requested number of folds.
        fallback: lambda used when cross-validation is impossible.
        options: solver settings.
    """
    assignment, num_folds = cv_folds(labels, folds)
    if num_folds < 2:
        return LambdaChoice(float(fallback), "fallback")
    options = options or SolverOptions()
    candidates = sorted({float(v) for v in grid}, reverse=True)
    accuracy = {lambd: 0.0 for lambd in candidates}
    cross_entropy = {lambd: 0.0 for lambd in candidates}
    for fold in range(num_folds):
        train, valid = assignment != fold, assignment == fold
        x_val = features[valid].to(options.resolved_device(), options.dtype)
        y_val = labels[valid].to(x_val.device)
        warm = None
        for lambd in candidates:
            result = fit_logistic_regression(features[train], labels[train], num_classes, lambd, options, init=warm)
            warm = result.weight
            logits = x_val @ result.weight.to(x_val.device).T
            accuracy[lambd] += float((logits.argmax(1) == y_val).double().mean()) * 100 / num_folds
            cross_entropy[lambd] += float(torch.nn.functional.cross_entropy(logits, y_val)) / num_folds
    best = max(candidates, key=lambda v: (round(accuracy[v], 9), -cross_entropy[v], v))
    scores = {v: {"accuracy": accuracy[v], "cross_entropy": cross_entropy[v]} for v in sorted(candidates)}
    return LambdaChoice(best, "cv", num_folds, scores)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Weighted k-NN on cosine similarity (rows must already be L2-normalised).

    Each test row takes the ``min(k, N_train)`` most similar labelled rows; neighbour ``j``
    votes for its class with weight ``exp(sim_j / temperature)``; the heaviest class wins
    (ties: the lower class index).
    """
    device = torch.device(device) if device is not None else train_features.device
    train = train_features.to(device, torch.float32)
    labels = train_labels.to(device, torch.long)
    k = max(1, min(int(k), train.shape[0]))
    out = []
    for start in range(0, test_features.shape[0], CHUNK):
        rows = test_features[start : start + CHUNK].to(device, torch.float32)
        sims, neighbours = (rows @ train.T).topk(k, dim=1)
        weights = torch.exp(sims / temperature)
        votes = torch.zeros(rows.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels[neighbours], weights)
        out.append(votes.argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if len(labels) == 0:
        return math.nan
    return float((predictions.cpu() == labels.cpu()).double().mean()) * 100
