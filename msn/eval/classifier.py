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


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _cubic_min(t1: float, f1: float, d1: float, t2: float, f2: float, d2: float, lo: float, hi: float) -> float:
    """Minimiser of the cubic through two points with their slopes, clamped to ``[lo, hi]``."""
    d3 = d1 + d2 - 3 * (f1 - f2) / (t1 - t2)
    disc = d3 * d3 - d1 * d2
    if disc < 0:
        return (lo + hi) / 2
    root = math.sqrt(disc)
    if t1 > t2:  # same formula with the points swapped
        t1, f1, d1, t2, f2, d2 = t2, f2, d2, t1, f1, d1
    denom = d2 - d1 + 2 * root
    if denom == 0:
        return (lo + hi) / 2
    return min(max(t2 - (t2 - t1) * (d2 + root - d3) / denom, lo), hi)


def _line_search(evaluate, weight, f0: float, direction, slope0: float, step: float, budget: int,
                 c1: float = 1e-4, c2: float = 0.9):
    """Strong-Wolfe line search along ``direction`` that tries ``step`` first.

    Returns ``(step, f, grad, evaluations)`` of the best point it evaluated (the accepted one
    when the conditions hold). Extrapolation and zoom use safeguarded cubic interpolation.
    """
    direction_max = float(direction.abs().max())
    prev_t, prev_f, prev_d = 0.0, f0, slope0
    best = (0.0, f0, None)
    used = 0
    bracket = None
    t = step
    while used < budget:
        f, g = evaluate(weight + t * direction)
        used += 1
        d = _dot(g, direction)
        if f < best[1]:
            best = (t, f, g)
        if bracket is None:
            if f > f0 + c1 * t * slope0 or (used > 1 and f >= prev_f):
                bracket = [(prev_t, prev_f, prev_d), (t, f, d)]
            elif abs(d) <= -c2 * slope0:
                return t, f, g, used
            elif d >= 0:
                bracket = [(t, f, d), (prev_t, prev_f, prev_d)]
            else:  # still descending steeply: extrapolate
                new_t = _cubic_min(prev_t, prev_f, prev_d, t, f, d, t + 0.01 * (t - prev_t), 10 * t)
                prev_t, prev_f, prev_d = t, f, d
                t = new_t
                continue
        else:  # zoom: bracket[0] is the low end (Armijo holds, lowest f), bracket[1] the other
            lo, hi = bracket
            if f > f0 + c1 * t * slope0 or f >= lo[1]:
                bracket = [lo, (t, f, d)]
            elif abs(d) <= -c2 * slope0:
                return t, f, g, used
            else:
                bracket = [(t, f, d), hi if d * (hi[0] - lo[0]) < 0 else lo]
        (t_lo, f_lo, d_lo), (t_hi, f_hi, d_hi) = bracket
        width = abs(t_hi - t_lo)
        if width * direction_max < 1e-12:  # the bracket no longer moves any weight
            break
        a, b = min(t_lo, t_hi), max(t_lo, t_hi)
        t = _cubic_min(t_lo, f_lo, d_lo, t_hi, f_hi, d_hi, a + 0.1 * width, b - 0.1 * width)
    if best[2] is None:
        return 0.0, f0, None, used
    return best[0], best[1], best[2], used


def _lbfgs(evaluate, curvature, weight: torch.Tensor, lambd: float, options: SolverOptions) -> LogRegResult:
    """L-BFGS of :func:`fit_logistic_regression` on ``evaluate`` (objective and gradient at W).

    Two-loop recursion over the last ``history_size`` pairs, initial inverse Hessian
    ``(s.y / y.y) I``; the first step is the gradient over its L2 norm, every later line
    search tries the unit step first (docs/eval.md, "Solver at ImageNet's size").
    """
    tol_change = 10 * torch.finfo(options.dtype).eps
    max_eval = int(options.max_iter * 1.25) + 25
    with torch.no_grad():
        f, grad = evaluate(weight)
        evaluations, iterations = 1, 0
        history: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        while float(grad.abs().max()) > options.tol and iterations < options.max_iter and evaluations < max_eval:
            q = grad.neg()
            alphas = []
            for s, y, rho in reversed(history):
                a = rho * _dot(s, q)
                alphas.append(a)
                q.add_(y, alpha=-a)
            if history:
                s, y, rho = history[-1]
                q.mul_(1.0 / (rho * _dot(y, y)))
                for (s, y, rho), a in zip(history, reversed(alphas)):
                    q.add_(s, alpha=a - rho * _dot(y, q))
            slope = _dot(grad, q)
            if slope > -tol_change:  # not a descent direction: restart from the gradient
                history.clear()
                q = grad.neg()
                slope = _dot(grad, q)
            step = 1.0
            if iterations == 0:  # the minimiser of the quadratic model along the gradient
                step = -slope / max(curvature(q), 1e-300)
            t, f_new, g_new, used = _line_search(evaluate, weight, f, q, slope, step, max_eval - evaluations)
            evaluations += used
            iterations += 1
            if g_new is None:
                break
            s = q.mul_(t)
            y = g_new - grad
            ys = _dot(y, s)
            if ys > 1e-10:
                if len(history) == options.history_size:
                    history.pop(0)
                history.append((s, y, 1.0 / ys))
            weight = weight + s
            done = abs(f - f_new) < tol_change or float(s.abs().max()) <= tol_change
            f, grad = f_new, g_new
            if done:
                break
    grad_max = float(grad.abs().max())
    return LogRegResult(
        weight=weight.cpu(),
        lambd=float(lambd),
        objective=f,
        grad_max=grad_max,
        iterations=iterations,
        evaluations=evaluations,
        converged=grad_max <= options.tol,
    )


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
