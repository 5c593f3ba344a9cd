"""Benchmark: the low-shot solver against scikit-learn at ImageNet's real 1% size, over the
evaluator's lambda grid, and the whole 1% evaluation of one split (docs/eval.md).

The problem: 12,811 labelled rows (the 1% split) of 384-d (ViT-S/16) or 768-d (ViT-B/16)
structured random features over 1,000 classes (:func:`benchmarks.bench_logreg.make_features`:
class means, noise, a decaying spectrum; rows centred and L2-normalised like the pipeline).
For every lambda of :data:`msn.eval.config.DEFAULT_LAMBDA_GRID` (or ``--lambdas``) it solves

    J(W) = mean_i CE(W x_i, y_i) + lambda/(2N) ||W||_F^2          (no intercept)

with :func:`msn.eval.classifier.fit_logistic_regression` (cold start) and with
``sklearn.linear_model.LogisticRegression(C=1/lambda, fit_intercept=False)`` to the same
max-abs-gradient tolerance (scikit-learn may stop earlier on its relative-decrease test; the
table says so when our objective is the lower one), ``--repeats`` times in alternated order in one process, and prints
the median times, their ratio and whether both reached the same optimum (relative objective
difference within the 1e-4 of tests/test_eval_classifier.py). The machine may be shared:
read the ratios, not the seconds.

``--protocol`` also times the whole 1% evaluation of one split as the evaluator runs it
(:func:`msn.eval.classifier.select_lambda` over the grid, the final fit, the k-NN over 50,000
test rows).

    .venv/bin/python benchmarks/bench_solver.py                       # CPU, D=384 and 768, whole grid
    .venv/bin/python benchmarks/bench_solver.py --dims 384 --lambdas 0.0001 0.1 100 --repeats 3
    .venv/bin/python benchmarks/bench_solver.py --dims 384 --protocol --skip-sklearn
    .venv/bin/python benchmarks/bench_solver.py --device cuda         # ours on the GPU, sklearn on the CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_logreg import make_features  # one home for the synthetic features (a sibling script)
from msn.eval.classifier import (
    SolverOptions,
    fit_logistic_regression,
    knn_predict,
    lambda_to_sklearn_c,
    logreg_objective,
    normalize_rows,
    select_lambda,
)
from msn.eval.config import DEFAULT_LAMBDA_GRID, EvalConfig

#: Relative objective difference accepted as "the same optimum" (tests/test_eval_classifier.py).
SAME_OPTIMUM = 1e-4


def _verdict(r) -> str:
    if r["same_optimum"]:
        return "yes"
    return "ours lower (sklearn stopped early)" if r["not_worse"] else "NO"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(x, y, classes, lambd, options):
    device = options.resolved_device()
    _sync(device)
    start = time.perf_counter()
    fit = fit_logistic_regression(x, y, classes, lambd, options)
    _sync(device)
    return time.perf_counter() - start, fit


def time_sklearn(x, y, lambd, tol, max_iter):
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=lambda_to_sklearn_c(lambd), fit_intercept=False, tol=tol, max_iter=max_iter)
    start = time.perf_counter()
    model.fit(x.numpy(), y.numpy())
    return time.perf_counter() - start, model


def compare(x, y, classes, lambd, options, repeats, max_iter):
    """Median seconds of both solvers (alternated order) and their objectives."""
    ours_t, sk_t, fit, model = [], [], None, None
    for repeat in range(repeats):
        order = ("ours", "sklearn") if repeat % 2 == 0 else ("sklearn", "ours")
        for who in order:
            if who == "ours":
                seconds, fit = time_ours(x, y, classes, lambd, options)
                ours_t.append(seconds)
            else:
                seconds, model = time_sklearn(x, y, lambd, options.tol, max_iter)
                sk_t.append(seconds)
    j_ours = float(logreg_objective(fit.weight.double(), x, y, lambd))
    j_sk = float(logreg_objective(torch.from_numpy(model.coef_), x, y, lambd))
    return {"ours_s": statistics.median(ours_t), "sklearn_s": statistics.median(sk_t), "j_ours": j_ours,
            "j_sklearn": j_sk, "iterations": fit.iterations, "sklearn_iterations": int(model.n_iter_.max()),
            "converged": fit.converged, "same_optimum": abs(j_ours - j_sk) <= SAME_OPTIMUM * abs(j_sk),
            "not_worse": j_ours <= j_sk * (1 + 1e-9)}


def protocol(x, y, classes, grid, options, test_rows: int, dim: int) -> dict[str, float]:
    """The evaluator's 1% path on one split: lambda by cross-validation, the final fit, k-NN."""
    cfg = EvalConfig()
    start = time.perf_counter()
    choice = select_lambda(x, y, classes, grid, cfg.cv_folds, cfg.lambd_fallback, options)
    cv_s = time.perf_counter() - start
    tick = time.perf_counter()
    fit = fit_logistic_regression(x, y, classes, choice.lambd, options)
    fit_s = time.perf_counter() - tick
    test_x, test_y = make_features(test_rows, dim, classes, seed=1)
    tick = time.perf_counter()
    fit.predict(test_x)
    knn_predict(x.float(), y, test_x.float(), classes, cfg.knn_k, cfg.knn_temperature,
                device=options.resolved_device())
    score_s = time.perf_counter() - tick
    return {"lambda": choice.lambd, "folds": choice.folds, "cv_s": cv_s, "fit_s": fit_s, "score_s": score_s,
            "total_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12811, help="labelled rows (the 1%% split: 12,811)")
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768], help="feature sizes (ViT-S/16, ViT-B/16)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDA_GRID),
                        help="default: the evaluator's grid (msn.eval.config.DEFAULT_LAMBDA_GRID)")
    parser.add_argument("--tol", type=float, default=EvalConfig.tol)
    parser.add_argument("--max-iter", type=int, default=EvalConfig.max_iter)
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs per solver (median)")
    parser.add_argument("--device", default="cpu", help="where our solver runs: cpu or cuda")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--protocol", action="store_true", help="also time the whole 1%% evaluation of one split")
    parser.add_argument("--test-rows", type=int, default=50_000)
    args = parser.parse_args()
    options = SolverOptions(tol=args.tol, max_iter=args.max_iter, device=torch.device(args.device))
    print(f"# N={args.n} C={args.classes} tol={args.tol} device={args.device} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} (median of alternated runs)")
    ok = True
    for dim in args.dims:
        x, y = make_features(args.n, dim, args.classes)
        x = normalize_rows(x)
        if not args.skip_sklearn:
            print(f"\n## D={dim}\n\n| lambda | ours s | sklearn s | sklearn/ours | iterations (ours/sklearn) "
                  f"| J ours | J sklearn | same optimum |\n|---|---|---|---|---|---|---|---|")
            total_ours = total_sk = 0.0
            for lambd in args.lambdas:
                r = compare(x, y, args.classes, lambd, options, args.repeats, args.max_iter)
                total_ours += r["ours_s"]
                total_sk += r["sklearn_s"]
                ok &= r["same_optimum"] or r["not_worse"]
                print(f"| {lambd:g} | {r['ours_s']:.2f} | {r['sklearn_s']:.2f} | {r['sklearn_s'] / r['ours_s']:.2f}x "
                      f"| {r['iterations']}/{r['sklearn_iterations']} | {r['j_ours']:.8f} | {r['j_sklearn']:.8f} "
                      f"| {_verdict(r)} |", flush=True)
            print(f"| all | {total_ours:.2f} | {total_sk:.2f} | {total_sk / total_ours:.2f}x | | | | |")
        if args.protocol:
            p = protocol(x, y, args.classes, args.lambdas, options, args.test_rows, dim)
            print(f"\nwhole 1% evaluation, one split, D={dim}: lambda {p['lambda']:g} by {p['folds']}-fold CV "
                  f"{p['cv_s']:.1f} s, final fit {p['fit_s']:.1f} s, scoring {args.test_rows:,} test rows "
                  f"{p['score_s']:.1f} s, total {p['total_s']:.1f} s", flush=True)
    if not ok:
        raise SystemExit("error: our objective is above scikit-learn's by more than the tested tolerance")


if __name__ == "__main__":
    main()
