"""Logistic regression (against scikit-learn), lambda selection and k-NN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msn.eval.classifier import (
    SolverOptions,
    cv_folds,
    fit_logistic_regression,
    knn_predict,
    lambda_to_sklearn_c,
    logreg_objective,
    normalize_rows,
    select_lambda,
)

from sklearn import linear_model as sklearn_linear  # noqa: E402 - a test dependency, never skipped


def make_problem(n: int, dim: int, classes: int, noise: float, seed: int, mean_seed: int | None = None):
    """Gaussian classes (means from ``mean_seed``, default ``seed``), rows normalised."""
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed if mean_seed is None else mean_seed))
    g = torch.Generator().manual_seed(seed + 1000)
    labels = torch.arange(n) % classes
    x = means[labels] + noise * torch.randn(n, dim, generator=g)
    return normalize_rows(x).double(), labels


def test_normalize_rows():
    x = torch.randn(7, 5, dtype=torch.float64) * 3 + 2  # float64: exact claims, 1e-12 bounds the rounding
    z = normalize_rows(x)
    assert torch.allclose(z.mean(1), torch.zeros(7, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(z.norm(dim=1), torch.ones(7, dtype=torch.float64), atol=1e-12)
    assert torch.equal(normalize_rows(torch.ones(1, 4)), torch.zeros(1, 4))


@pytest.mark.parametrize("lambd", [0.03, 3.0])
def test_same_optimum_as_sklearn(lambd):
    x, y = make_problem(900, 24, 6, noise=2.5, seed=0)
    x_test, _ = make_problem(3000, 24, 6, noise=2.5, seed=1, mean_seed=0)  # same classes, new points
    ours = fit_logistic_regression(x, y, 6, lambd, SolverOptions(tol=1e-9, device="cpu"))
    assert ours.converged
    reference = sklearn_linear.LogisticRegression(
        C=lambda_to_sklearn_c(lambd), fit_intercept=False, tol=1e-10, max_iter=5000
    ).fit(x.numpy(), y.numpy())
    w_ref = torch.from_numpy(reference.coef_)
    j_ours = float(logreg_objective(ours.weight, x, y, lambd))
    j_ref = float(logreg_objective(w_ref, x, y, lambd))
    assert abs(ours.objective - j_ours) < 1e-12
    assert abs(j_ours - j_ref) <= 1e-4 * abs(j_ref)
    assert j_ours <= j_ref * (1 + 1e-9)  # never worse than sklearn's optimum
    # sklearn's documented objective is C * N * J (+ constant 0): same minimiser
    for features in (x, x_test):
        ours_pred = ours.predict(features).numpy()
        ref_pred = reference.predict(features.numpy())
        assert (ours_pred == ref_pred).mean() >= 0.999


def test_gradient_vanishes_at_the_solution_and_float32_agrees():
    x, y = make_problem(300, 16, 4, noise=1.5, seed=1)
    fit = fit_logistic_regression(x, y, 4, 0.1, SolverOptions(tol=1e-8, device="cpu"))
    weight = fit.weight.clone().requires_grad_(True)
    logreg_objective(weight, x, y, 0.1).backward()
    assert weight.grad.abs().max() < 1e-7
    single = fit_logistic_regression(x.float(), y, 4, 0.1, SolverOptions(tol=1e-5, dtype=torch.float32, device="cpu"))
    assert abs(single.objective - fit.objective) < 1e-5 * fit.objective
    # a warm start reaches the same optimum
    warm = fit_logistic_regression(x, y, 4, 0.1, SolverOptions(tol=1e-8, device="cpu"), init=fit.weight * 0.5)
    assert abs(warm.objective - fit.objective) < 1e-10


def test_deterministic():
    x, y = make_problem(200, 8, 3, noise=2.0, seed=2)
    a = fit_logistic_regression(x, y, 3, 0.05, SolverOptions(device="cpu"))
    b = fit_logistic_regression(x, y, 3, 0.05, SolverOptions(device="cpu"))
    assert torch.equal(a.weight, b.weight)


def test_cv_folds_hold_out_images_of_every_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    folds, count = cv_folds(labels, 5)
    assert count == 3  # capped at the smallest class
    assert folds.tolist() == [0, 1, 2, 0, 1, 2, 0, 0, 1, 2]
    assert cv_folds(torch.tensor([0, 1, 1]), 5)[1] == 1


def test_lambda_selection_matches_a_manual_cross_validation():
    x, y = make_problem(60, 12, 4, noise=3.0, seed=3)  # 15 per class
    grid = [1e-3, 0.1, 10.0]
    options = SolverOptions(tol=1e-7, device="cpu")
    choice = select_lambda(x, y, 4, grid, folds=3, options=options)
    assert choice.method == "cv" and choice.folds == 3
    folds, _ = cv_folds(y, 3)
    manual = {}
    for lambd in grid:
        accs = []
        for f in range(3):
            fit = fit_logistic_regression(x[folds != f], y[folds != f], 4, lambd, options)
            accs.append(float((fit.predict(x[folds == f]) == y[folds == f]).double().mean()) * 100)
        manual[lambd] = sum(accs) / 3
        assert choice.scores[lambd]["accuracy"] == pytest.approx(manual[lambd], abs=1e-9)
    best = max(manual.values())
    assert manual[choice.lambd] == best


def test_one_shot_uses_the_documented_fallback():
    x, y = make_problem(5, 8, 5, noise=1.0, seed=4)
    choice = select_lambda(x, y, 5, [0.01, 1.0], folds=5, fallback=0.37)
    assert (choice.lambd, choice.method, choice.folds) == (0.37, "fallback", 0)


def brute_force_knn(train, labels, test, classes, k, temperature):
    sims = test @ train.T
    out = []
    for row in sims:
        order = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(classes)
        for j in order:
            votes[labels[j]] += np.exp(row[j] / temperature)
        out.append(int(np.argmax(votes)))
    return np.array(out)


def test_knn_matches_brute_force_and_caps_k():
    x, y = make_problem(80, 10, 4, noise=2.0, seed=5)
    q, _ = make_problem(50, 10, 4, noise=2.0, seed=6)
    x, q = x.float(), q.float()
    for k in (1, 7, 20, 500):  # 500 > 80 labelled rows: capped
        ours = knn_predict(x, y, q, 4, k=k, temperature=0.07).numpy()
        ref = brute_force_knn(x.numpy().astype(np.float64), y.numpy(), q.numpy().astype(np.float64), 4, min(k, 80), 0.07)
        assert (ours == ref).mean() >= 0.98  # float32 vs float64 near-ties only


def test_knn_temperature_weighting():
    # one very close neighbour of class 1 outweighs two distant ones of class 0 at T=0.07,
    # but not with a large temperature (then it is a plain majority vote)
    train = normalize_rows(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    labels = torch.tensor([1, 0, 0])
    query = normalize_rows(torch.tensor([[4.0, 0.5, 0.5, 0.0]]))
    assert knn_predict(train, labels, query, 2, k=3, temperature=0.07).item() == 1
    assert knn_predict(train, labels, query, 2, k=3, temperature=1e3).item() == 0


def test_no_point_is_evaluated_twice(monkeypatch):
    # every objective + gradient evaluation is two matrix products, the first step's quadratic
    # model one more; the solver counts the evaluations of its line search and returns the
    # best point it evaluated without evaluating it again (docs/eval.md, "Solver at ImageNet's size")
    x, y = make_problem(400, 16, 5, noise=2.0, seed=7)
    products = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: products.append(1) or real_mm(a, b))
    fit = fit_logistic_regression(x, y, 5, 0.05, SolverOptions(device="cpu"))
    assert fit.converged
    assert len(products) == 2 * fit.evaluations + 1
    assert fit.evaluations <= fit.iterations + 3  # the unit step is tried first and mostly accepted
    assert abs(fit.objective - float(logreg_objective(fit.weight, x, y, 0.05))) < 1e-12
