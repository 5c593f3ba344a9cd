"""Full-batch L-BFGS with a strong-Wolfe line search that tries the unit step first: the solver
behind the low-shot logistic regression (:mod:`msn.eval.classifier`; docs/eval.md "Solver at
ImageNet's size"). Generic in the objective: it sees only an ``evaluate`` and a ``curvature``
function of the weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Minimum:
    """Where :func:`minimize` stopped: the weights, the objective and max-abs gradient there, and
    the iterations and evaluations (objective + gradient, line searches included) it took."""

    weight: torch.Tensor
    objective: float
    grad_max: float
    iterations: int
    evaluations: int


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


def minimize(evaluate: Callable, curvature: Callable, weight: torch.Tensor, tol: float, max_iter: int,
             history_size: int) -> Minimum:
    """Minimise by L-BFGS from ``weight``: ``evaluate(W)`` gives the objective and its gradient,
    ``curvature(d)`` the second derivative along ``d`` at the point last evaluated.

    Two-loop recursion over the last ``history_size`` pairs, initial inverse Hessian
    ``(s.y / y.y) I``; the first step is the gradient over its L2 norm, every later line
    search tries the unit step first (docs/eval.md, "Solver at ImageNet's size").
    """
    tol_change = 10 * torch.finfo(weight.dtype).eps
    max_eval = int(max_iter * 1.25) + 25
    with torch.no_grad():
        f, grad = evaluate(weight)
        evaluations, iterations = 1, 0
        history: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        while float(grad.abs().max()) > tol and iterations < max_iter and evaluations < max_eval:
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
                if len(history) == history_size:
                    history.pop(0)
                history.append((s, y, 1.0 / ys))
            weight = weight + s
            done = abs(f - f_new) < tol_change or float(s.abs().max()) <= tol_change
            f, grad = f_new, g_new
            if done:
                break
    return Minimum(weight, f, float(grad.abs().max()), iterations, evaluations)
