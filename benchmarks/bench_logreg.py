"""Benchmark: our L-BFGS logistic regression vs scikit-learn on the 1% ImageNet shape.

The 1% ImageNet low-shot problem (MSN paper Sec. 5; docs/method.md Sec. 8) is 12,811 labelled
rows of 384-d ViT-S features over 1000 classes. This script builds random-ish features of
that shape (Gaussian class means plus anisotropic noise, rows centred and L2-normalised like
the real pipeline), solves

    J(W) = mean_i CE(W x_i, y_i) + lambda/(2N) ||W||_F^2          (no intercept)

with :func:`msn.eval.classifier.fit_logistic_regression` and with
``sklearn.linear_model.LogisticRegression(C=1/lambda, fit_intercept=False, solver="lbfgs")``
(same objective up to the factor C*N, same gradient tolerance), and prints times, iterations,
objectives and the time ratio.

    .venv/bin/python benchmarks/bench_logreg.py                 # full shape
    .venv/bin/python benchmarks/bench_logreg.py --sklearn-max-iter 100
    .venv/bin/python benchmarks/bench_logreg.py --n 2000 --classes 100   # quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from msn.eval.classifier import SolverOptions, fit_logistic_regression, lambda_to_sklearn_c, logreg_objective, normalize_rows


def make_features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-ish features with a decaying spectrum, like real ViT features.

    Class means plus isotropic noise, mapped through a random rotation with singular values
    decaying geometrically from 1 to 0.01 (so the problem is ill-conditioned, as real
    features are); balanced labels; rows centred and L2-normalised like the pipeline does.
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(n) % classes
    latent = means[labels] + 1.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -2, dim, dtype=torch.float64)
    return normalize_rows(latent @ (rotation * spectrum)), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12811)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--lambd", type=float, default=0.075, help="reference units (sklearn C = 1/lambd)")
    parser.add_argument("--tol", type=float, default=1e-6, help="max-abs gradient tolerance (both solvers)")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--sklearn-max-iter", type=int, default=1000)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args()

    x, y = make_features(args.n, args.dim, args.classes)
    print(f"problem: N={args.n} D={args.dim} C={args.classes} lambda={args.lambd} tol={args.tol} "
          f"threads={torch.get_num_threads()}")
    options = SolverOptions(tol=args.tol, max_iter=args.max_iter,
                            dtype=torch.float64 if args.dtype == "float64" else torch.float32, device=args.device)
    start = time.perf_counter()
    ours = fit_logistic_regression(x, y, args.classes, args.lambd, options)
    if options.resolved_device().type == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - start
    train_acc = float((ours.predict(x) == y).double().mean()) * 100
    print(f"ours   ({options.resolved_device()}, {args.dtype}): {t_ours:8.2f} s  iterations {ours.iterations:4d} (evals {ours.evaluations:4d})  "
          f"J={ours.objective:.8f}  max|grad|={ours.grad_max:.2e}  converged={ours.converged}  "
          f"train acc {train_acc:.2f}%")
    if args.skip_sklearn:
        return

    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=lambda_to_sklearn_c(args.lambd), fit_intercept=False, solver="lbfgs",
                               tol=args.tol, max_iter=args.sklearn_max_iter)
    start = time.perf_counter()
    model.fit(x.numpy(), y.numpy())
    t_sk = time.perf_counter() - start
    w_sk = torch.from_numpy(model.coef_)
    j_sk = float(logreg_objective(w_sk, x, y, args.lambd))
    agree = float((ours.predict(x).numpy() == model.predict(x.numpy())).mean()) * 100
    n_iter = int(np.max(model.n_iter_))
    # scipy does not expose nfev through sklearn; iterations are comparable (one gradient each
    # plus line-search trials)
    capped = " (hit max_iter)" if n_iter >= args.sklearn_max_iter else ""
    print(f"sklearn (cpu, float64):  {t_sk:8.2f} s  iterations {n_iter:4d}{capped}  J={j_sk:.8f}")
    print(f"ratio sklearn/ours: {t_sk / t_ours:.2f}x   per iteration: "
          f"{(t_sk / max(n_iter, 1)) / (t_ours / max(ours.iterations, 1)):.2f}x   "
          f"objective rel. diff {(ours.objective - j_sk) / j_sk:+.2e}   prediction agreement {agree:.3f}%")


if __name__ == "__main__":
    main()
