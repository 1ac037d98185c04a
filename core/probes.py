"""Linear probes from the residual stream at the final position to regression targets.

Ridge regression with an intercept, scored by held-out R^2 under K-fold
cross-validation over seeds (contiguous folds, no shuffling). Inside each training
fold the penalty is chosen from `alpha_grid(x)` by exact leave-one-out error (closed
form from one SVD), as scikit-learn's `RidgeCV` does. The grid scales with the
residual stream's size at that layer (it grows by orders of magnitude over layers),
from nearly no penalty to one that shrinks the probe to a constant. A probe is never
hidden: its status says when it is no better than a constant, when the chosen penalty
sits at an end of the grid, or why it could not be fitted.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from jaxtyping import Float

RELATIVE_ALPHAS = np.logspace(-6, 2, 17)
N_FOLDS = 5
MIN_SEEDS = 10


def folds(n: int, k: int = N_FOLDS) -> list[np.ndarray]:
    """Returns the test indices of k contiguous folds (sizes as scikit-learn's KFold)."""
    sizes = np.full(k, n // k) + (np.arange(k) < n % k)
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(a, b) for a, b in zip(edges[:-1], edges[1:])]


def alpha_grid(x: Float[np.ndarray, "n d"]) -> Float[np.ndarray, " a"]:
    """Returns the penalties tried: `RELATIVE_ALPHAS` times the mean squared norm of a centred row."""
    scale = float(((x - x.mean(0)) ** 2).sum(1).mean())
    return RELATIVE_ALPHAS * (scale if scale > 0 else 1.0)


def _fit_fold(x: Float[np.ndarray, "n d"], y: Float[np.ndarray, "n m"], alphas: Float[np.ndarray, " a"],
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (coef [d, m], intercept [m], alpha index [m]) with alpha chosen by leave-one-out."""
    n = len(x)
    xm, ym = x.mean(0), y.mean(0)
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (y - ym)  # [r, m]
    shrink = s[None, :] ** 2 / (s[None, :] ** 2 + alphas[:, None])  # [a, r]
    fitted = np.einsum("nr,ar,rm->anm", u, shrink, uty) + ym
    hat = np.einsum("nr,ar->an", u**2, shrink) + 1.0 / n  # the intercept is not penalised
    loo = ((y[None] - fitted) / (1.0 - hat[..., None])) ** 2
    best = loo.mean(1).argmin(0)  # [m]
    coef = np.einsum("rd,mr,rm->dm", vt, (s / (s**2 + alphas[best][:, None])), uty)
    return coef, ym - xm @ coef, best


@dataclass
class ProbeResult:
    """Held-out R^2 of each target's probe, with the constant baseline and a status."""

    r2: Float[np.ndarray, " m"]
    constant_r2: Float[np.ndarray, " m"]
    alpha: Float[np.ndarray, " m"]  # median over folds of the chosen penalty
    n_seeds: np.ndarray
    status: list[str]


def probe(x: Float[np.ndarray, "n d"], y: Float[np.ndarray, "n m"]) -> ProbeResult:
    """Fits and scores one ridge probe per target column (seeds with a NaN target are left out)."""
    m = y.shape[1]
    r2, const, alpha = (np.full(m, np.nan) for _ in range(3))
    used = np.zeros(m, dtype=int)
    status = [""] * m
    valid = np.isfinite(y) & np.isfinite(x).all(1)[:, None]
    # Targets with the same seeds share one SVD per fold.
    for pattern in np.unique(valid, axis=1).T:
        cols = [j for j in range(m) if (valid[:, j] == pattern).all()]
        xs, ys = x[pattern].astype(np.float64), y[pattern][:, cols].astype(np.float64)
        used[cols] = len(ys)
        fit = [j for k, j in enumerate(cols) if len(ys) >= MIN_SEEDS and np.ptp(ys[:, k]) > 0]
        for j in cols:
            if len(ys) < MIN_SEEDS:
                status[j] = f"not fitted: {len(ys)} seeds (needs {MIN_SEEDS})"
            elif j not in fit:
                status[j] = "not fitted: the target is constant"
        if not fit:
            continue
        ys = ys[:, [cols.index(j) for j in fit]]
        alphas = alpha_grid(xs)
        pred, base, chosen = np.empty_like(ys), np.empty_like(ys), []
        for test in folds(len(ys)):
            train = np.setdiff1d(np.arange(len(ys)), test)
            coef, icpt, best = _fit_fold(xs[train], ys[train], alphas)
            pred[test] = xs[test] @ coef + icpt
            base[test] = ys[train].mean(0)
            chosen.append(best)
        chosen = np.stack(chosen)  # [folds, targets]
        sst = ((ys - ys.mean(0)) ** 2).sum(0)
        for k, j in enumerate(fit):
            r2[j] = 1 - ((ys[:, k] - pred[:, k]) ** 2).sum() / sst[k]
            const[j] = 1 - ((ys[:, k] - base[:, k]) ** 2).sum() / sst[k]
            alpha[j] = float(np.median(alphas[chosen[:, k]]))
            low, high = int((chosen[:, k] == 0).sum()), int((chosen[:, k] == len(alphas) - 1).sum())
            if not r2[j] > const[j]:
                status[j] = "no better than a constant"
            elif high:
                status[j] = f"largest penalty chosen in {high}/{len(chosen)} folds (shrunk towards a constant)"
            elif low:
                status[j] = f"smallest penalty chosen in {low}/{len(chosen)} folds (nearly unregularised)"
            else:
                status[j] = "ok"
    return ProbeResult(r2, const, alpha, used, status)


def probe_targets(predictions: Float[np.ndarray, "s R"], columns: list[str], y_true: Float[np.ndarray, " s"],
                  x_train: Float[np.ndarray, "s n f"], y_train: Float[np.ndarray, "s n"]) -> pd.DataFrame:
    """Returns the probe targets per seed: the truth, each column's prediction (the model's,
    each regressor's, gradient descent's) and the in-context least-squares weights and intercept."""
    out = {"truth": y_true, **{f"pred:{c}": predictions[:, j] for j, c in enumerate(columns)}}
    design = np.concatenate([x_train, np.ones((*x_train.shape[:2], 1))], -1)
    weights = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(design, y_train)])
    for k in range(x_train.shape[2]):
        out[f"ls-weight:{k}"] = weights[:, k]
    out["ls-intercept"] = weights[:, -1]
    return pd.DataFrame(out)
