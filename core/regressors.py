"""Regressors compared with the model, all fit on exactly the in-context examples.

Every regressor maps (x_train [n, f], y_train [n], x_query [f], seed) to one float.
Random ones are seeded from the run seed, so a run is reproducible. Families:
- `llm4regression`: the scikit-learn suite of Vacareanu et al. 2024;
- `lr_methods`: the original `optim_hunter.LR_methods`, written out in numpy;
- `gd`: k steps of gradient descent from w = 0 (what one linear self-attention
  layer implements per step, von Oswald et al. 2023), see `gradient_descent`;
- `standardized`: GD, kNN and a kernel smoother on standardized features (not in the
  default suite, see `NOT_DEFAULT`);
- `baseline`: mean, last, random.
"""

import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float
from sklearn.ensemble import AdaBoostRegressor, BaggingRegressor, GradientBoostingRegressor, RandomForestRegressor
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import BayesianRidge, Lasso, LinearRegression, Ridge
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, SplineTransformer, StandardScaler
from sklearn.svm import SVR

from core.registry import Registry, UnknownName

X = Float[np.ndarray, "n f"]
Y = Float[np.ndarray, " n"]
Q = Float[np.ndarray, " f"]
FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray, int], float]


@dataclass(frozen=True)
class Regressor:
    name: str
    family: str
    fit_predict: FitPredict
    description: str

    def __call__(self, x_train: X, y_train: Y, x_query: Q, seed: int) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence warnings of tiny fits
            return float(self.fit_predict(x_train, y_train, x_query, seed))


REGRESSORS: Registry[Regressor] = Registry("regressor")
STANDARDIZED = "standardized"


def _register(name: str, family: str, description: str) -> Callable[[FitPredict], FitPredict]:
    def wrap(fn: FitPredict) -> FitPredict:
        REGRESSORS.register(name, Regressor(name, family, fn, description))
        return fn
    return wrap


def _sklearn(name: str, description: str, make: Callable[[int, int], object]) -> None:
    """Registers a scikit-learn estimator built by `make(seed, n_train)`."""
    def fit_predict(x: X, y: Y, q: Q, seed: int) -> float:
        est = make(seed, len(y))
        est.fit(x, y)
        return est.predict(q[None])[0]
    REGRESSORS.register(name, Regressor(name, "llm4regression", fit_predict, description))


def _knn_adaptive_k(n: int) -> int:
    return 1 if n < 3 else 3 if n < 7 else 5


_sklearn("linear", "LinearRegression", lambda s, n: LinearRegression())
_sklearn("ridge", "Ridge(alpha=1)", lambda s, n: Ridge(random_state=s))
_sklearn("lasso", "Lasso(alpha=1)", lambda s, n: Lasso(random_state=s))
for _layers in [(10,), (100,), (1000,), (10, 10), (10, 20, 10), (10, 20, 30, 20, 10)]:
    _sklearn("mlp-" + "-".join(map(str, _layers)), f"MLP {_layers}, lbfgs, relu",
             lambda s, n, h=_layers: MLPRegressor(hidden_layer_sizes=h, activation="relu",
                                                  solver="lbfgs", random_state=s))
_sklearn("random-forest", "RandomForest(max_depth=3)", lambda s, n: RandomForestRegressor(max_depth=3, random_state=s))
_sklearn("bagging", "Bagging", lambda s, n: BaggingRegressor(random_state=s))
_sklearn("gradient-boosting", "GradientBoosting", lambda s, n: GradientBoostingRegressor(random_state=s))
_sklearn("adaboost", "AdaBoost(100)", lambda s, n: AdaBoostRegressor(n_estimators=100, random_state=s))
_sklearn("poly10-bayesian-ridge", "PolynomialFeatures(10) + StandardScaler + BayesianRidge",
         lambda s, n: make_pipeline(PolynomialFeatures(degree=10, include_bias=False), StandardScaler(),
                                    BayesianRidge()))
_sklearn("svr", "SVR", lambda s, n: SVR())
_sklearn("svr-scaled", "StandardScaler + SVR", lambda s, n: make_pipeline(StandardScaler(), SVR()))
_sklearn("knn", "kNN k=5", lambda s, n: KNeighborsRegressor())
_sklearn("knn-distance", "kNN k=5, distance weights", lambda s, n: KNeighborsRegressor(weights="distance"))
_sklearn("knn-3-distance", "kNN k=3, distance weights",
         lambda s, n: KNeighborsRegressor(n_neighbors=3, weights="distance"))
_sklearn("knn-1-distance", "kNN k=1, distance weights",
         lambda s, n: KNeighborsRegressor(n_neighbors=1, weights="distance"))
_sklearn("knn-adaptive", "kNN, k by n (1 if n<3, 3 if n<7, else 5), distance weights",
         lambda s, n: KNeighborsRegressor(n_neighbors=_knn_adaptive_k(n), weights="distance"))
_sklearn("kernel-ridge", "KernelRidge", lambda s, n: KernelRidge())
_sklearn("poly2-linear", "PolynomialFeatures(2) + LinearRegression",
         lambda s, n: make_pipeline(PolynomialFeatures(degree=2), LinearRegression()))
_sklearn("spline-linear", "SplineTransformer + LinearRegression",
         lambda s, n: make_pipeline(SplineTransformer(), LinearRegression()))


# The original's LR_methods, in numpy. Linear ones fit an intercept by centering.

def _center(x: X, y: Y) -> tuple[X, Y, np.ndarray, float]:
    mx, my = x.mean(axis=0), y.mean()
    return x - mx, y - my, mx, my


def standardize(x: X) -> tuple[X, np.ndarray, np.ndarray]:
    """Returns x with each feature centred and scaled to unit (population) std, the means and the stds."""
    mu, sd = x.mean(axis=0), x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return (x - mu) / sd, mu, sd


@_register("lr-ols", "lr_methods", "least squares with intercept (numpy lstsq)")
def ols(x: X, y: Y, q: Q, seed: int) -> float:
    xc, yc, mx, my = _center(x, y)
    w = np.linalg.lstsq(xc, yc, rcond=None)[0]
    return my + (q - mx) @ w


# Above this condition number of X^T X, `solve` returns an arbitrary point of a near-flat
# valley (float64 keeps ~16 digits; 1e12 leaves 4 for the answer).
NORMAL_EQUATION_MAX_COND = 1e12


@_register("lr-normal-equation", "lr_methods",
           "solve (X^T X) w = X^T y, intercept by centering; where X^T X is singular or ill-conditioned "
           f"(condition number > {NORMAL_EQUATION_MAX_COND:.0e}, e.g. no more examples than unknowns), "
           "the minimum-norm least-squares solution instead")
def normal_equation(x: X, y: Y, q: Q, seed: int) -> float:
    xc, yc, mx, my = _center(x, y)
    gram = xc.T @ xc
    if np.linalg.cond(gram) > NORMAL_EQUATION_MAX_COND:
        w = np.linalg.lstsq(xc, yc, rcond=None)[0]
    else:
        w = np.linalg.solve(gram, xc.T @ yc)
    return my + (q - mx) @ w


@_register("lr-ridge-closed-form", "lr_methods", "(X^T X + I) w = X^T y, intercept unpenalized")
def ridge_closed_form(x: X, y: Y, q: Q, seed: int, alpha: float = 1.0) -> float:
    xc, yc, mx, my = _center(x, y)
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    return my + (q - mx) @ w


@_register("lr-lasso", "lr_methods", "coordinate descent on 1/(2n)|y - Xw - b|^2 + |w|_1")
def lasso_cd(x: X, y: Y, q: Q, seed: int, alpha: float = 1.0, sweeps: int = 1000) -> float:
    xc, yc, mx, my = _center(x, y)
    n = len(y)
    w = np.zeros(x.shape[1])
    col_sq = (xc**2).sum(axis=0) / n
    for _ in range(sweeps):
        w_old = w.copy()
        for j in range(len(w)):
            if col_sq[j] == 0:
                continue
            r_j = yc - xc @ w + xc[:, j] * w[j]
            rho = xc[:, j] @ r_j / n
            w[j] = np.sign(rho) * max(abs(rho) - alpha, 0.0) / col_sq[j]
        if np.max(np.abs(w - w_old)) < 1e-10:
            break
    return my + (q - mx) @ w


@_register("lr-sgd", "lr_methods", "SGD on squared loss, standardized x and y, 200 epochs, seeded order")
def sgd(x: X, y: Y, q: Q, seed: int, epochs: int = 200, lr: float = 0.01) -> float:
    xs, mu, sd = standardize(x)
    ys_mu, ys_sd = y.mean(), (y.std() or 1.0)
    ys = (y - ys_mu) / ys_sd
    rng = np.random.default_rng(seed)
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(epochs):
        for i in rng.permutation(len(y)):
            err = xs[i] @ w + b - ys[i]
            w -= lr * err * xs[i]
            b -= lr * err
    return ys_mu + ys_sd * (((q - mu) / sd) @ w + b)


@_register("lr-bayesian", "lr_methods",
           "Bayesian linear regression posterior mean: standardized x and y, prior N(0, I), "
           "noise variance from the least-squares residuals")
def bayesian_linear(x: X, y: Y, q: Q, seed: int) -> float:
    xs, mu, sd = standardize(x)
    y_mu, y_sd = y.mean(), (y.std() or 1.0)
    ys = (y - y_mu) / y_sd
    xc, yc, mx, my = _center(xs, ys)
    resid = yc - xc @ np.linalg.lstsq(xc, yc, rcond=None)[0]
    noise = max(resid.var(), 1e-6)
    w = np.linalg.solve(xc.T @ xc / noise + np.eye(x.shape[1]), xc.T @ yc / noise)
    return y_mu + y_sd * (my + ((q - mu) / sd - mx) @ w)


@_register("lr-irls", "lr_methods", "least absolute deviations by iteratively reweighted least squares")
def irls(x: X, y: Y, q: Q, seed: int, iters: int = 50) -> float:
    a = np.column_stack([np.ones(len(y)), x])
    beta = np.linalg.lstsq(a, y, rcond=None)[0]
    for _ in range(iters):
        wts = 1.0 / np.maximum(np.abs(y - a @ beta), 1e-6)
        sw = np.sqrt(wts)
        beta = np.linalg.lstsq(a * sw[:, None], y * sw, rcond=None)[0]
    return beta[0] + q @ beta[1:]


@_register("lr-pcr", "lr_methods", "principal component regression, components for 95% of variance")
def pcr(x: X, y: Y, q: Q, seed: int, keep: float = 0.95) -> float:
    xs, mu, sd = standardize(x)
    xc, yc, mx, my = _center(xs, y)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ratio = np.cumsum(s**2) / max((s**2).sum(), 1e-300)
    k = int(np.searchsorted(ratio, keep) + 1)
    z = xc @ vt[:k].T
    g = np.linalg.lstsq(z, yc, rcond=None)[0]
    return my + (((q - mu) / sd - mx) @ vt[:k].T) @ g


@_register("lr-knn", "lr_methods", "k nearest neighbours, k=5, euclidean, uniform mean")
def knn_numpy(x: X, y: Y, q: Q, seed: int, k: int = 5) -> float:
    order = np.argsort(np.linalg.norm(x - q, axis=1), kind="stable")
    return y[order[:k]].mean()


def gradient_descent(x: X, y: Y, q: Q, k: int, eta: float | None = None) -> float:
    """Returns q @ w_k after k steps of w <- w - eta/n X^T (X w - y) from w = 0.

    No bias and no scaling, as in the linear self-attention construction. `eta=None`
    uses 1 / lambda_max(X^T X / n), the largest step that never diverges.
    """
    n = len(y)
    if eta is None:
        eta = 1.0 / max(np.linalg.eigvalsh(x.T @ x / n)[-1], 1e-300)
    w = np.zeros(x.shape[1])
    for _ in range(k):
        w = w - eta / n * (x.T @ (x @ w - y))
    return q @ w


_GD = re.compile(r"gd-k(\d+)(?:-eta([0-9.eE+-]+))?")


def _gd_regressor(name: str) -> Regressor:
    m = _GD.fullmatch(name)
    assert m is not None
    k, eta = int(m.group(1)), (float(m.group(2)) if m.group(2) else None)
    step = f"eta={eta}" if eta is not None else "eta=1/lambda_max(X^T X/n)"
    return Regressor(name, "gd", lambda x, y, q, s: gradient_descent(x, y, q, k, eta),
                     f"{k} steps of gradient descent from w=0, {step}, no bias")


for _k in (1, 10, 100):
    REGRESSORS.register(f"gd-k{_k}", _gd_regressor(f"gd-k{_k}"))


# Standardized variants: each feature centred and scaled to unit variance over the
# in-context examples (population std, as StandardScaler). On Friedman #2 the features
# span 0..1760, so raw GD from zero and raw kNN / kernels see only the largest one.

@_register("gd-std-k1", STANDARDIZED,
           "1 step of gradient descent from w=0 on standardized x and centred y, eta=1/lambda_max, "
           "prediction = mean y + the step's prediction at the standardized query")
def gd_std_k1(x: X, y: Y, q: Q, seed: int) -> float:
    return gd_standardized(x, y, q, 1)


@_register("gd-std-k10", STANDARDIZED,
           "10 steps of gradient descent from w=0 on standardized x and centred y, eta=1/lambda_max, "
           "prediction = mean y + the steps' prediction at the standardized query")
def gd_std_k10(x: X, y: Y, q: Q, seed: int) -> float:
    return gd_standardized(x, y, q, 10)


def gd_standardized(x: X, y: Y, q: Q, k: int, eta: float | None = None) -> float:
    """Returns mean(y) + `gradient_descent` on standardized x and centred y, at the standardized query."""
    xs, mu, sd = standardize(x)
    return y.mean() + gradient_descent(xs, y - y.mean(), (q - mu) / sd, k, eta)


@_register("knn-std", STANDARDIZED, "kNN k=5 (fewer if n<5), uniform mean, on standardized features")
def knn_standardized(x: X, y: Y, q: Q, seed: int, k: int = 5) -> float:
    xs, mu, sd = standardize(x)
    order = np.argsort(np.linalg.norm(xs - (q - mu) / sd, axis=1), kind="stable")
    return y[order[:k]].mean()


@_register("kernel-std", STANDARDIZED,
           "Nadaraya-Watson, Gaussian kernel exp(-d^2 / (2 h^2)) on standardized features, "
           "bandwidth h = median pairwise distance of the examples (the mean if they coincide)")
def kernel_standardized(x: X, y: Y, q: Q, seed: int, scale: float = 1.0) -> float:
    xs, mu, sd = standardize(x)
    pair = np.linalg.norm(xs[:, None] - xs[None], axis=-1)[np.triu_indices(len(y), 1)]
    h = scale * np.median(pair) if pair.size else 0.0
    if not h > 0:
        return y.mean()
    log_k = -((xs - (q - mu) / sd) ** 2).sum(axis=1) / (2 * h**2)
    k = np.exp(log_k - log_k.max())
    return k @ y / k.sum()


@_register("mean", "baseline", "mean of the in-context outputs")
def baseline_mean(x: X, y: Y, q: Q, seed: int) -> float:
    return y.mean()


@_register("last", "baseline", "the last in-context output")
def baseline_last(x: X, y: Y, q: Q, seed: int) -> float:
    return y[-1]


@_register("random", "baseline", "an in-context output drawn at random (seeded)")
def baseline_random(x: X, y: Y, q: Q, seed: int) -> float:
    return random.Random(seed).choice(list(y))


def get_regressor(name: str) -> Regressor:
    """Returns a registered regressor, or a `gd-k{K}[-eta{ETA}]` gradient-descent one."""
    if name in REGRESSORS:
        return REGRESSORS[name]
    if _GD.fullmatch(name):
        return _gd_regressor(name)
    raise UnknownName(f"unknown regressor {name!r}; known: {', '.join(REGRESSORS)}, gd-k<K>[-eta<ETA>]")


# Families registered but left out of the builder's default suite: adding columns to
# the default would make `make run` refuse the run stores already built with it
# ("built with other parameters"). Ask for them with --regressors.
NOT_DEFAULT = (STANDARDIZED,)


def default_suite() -> list[str]:
    """Returns the names of every registered regressor outside `NOT_DEFAULT`'s families,
    in registration order."""
    return [n for n in REGRESSORS if REGRESSORS[n].family not in NOT_DEFAULT]


def predict_named(names: list[str], x_train: X, y_train: Y, x_query: Q, seed: int) -> Float[np.ndarray, " R"]:
    """Returns `predict_all` of the named regressors (what a build's regressor process runs:
    names travel, the regressors are looked up there)."""
    return predict_all([get_regressor(n) for n in names], x_train, y_train, x_query, seed)


def predict_all(regressors: list[Regressor], x_train: X, y_train: Y, x_query: Q,
                seed: int) -> Float[np.ndarray, " R"]:
    """Returns every regressor's prediction of the query; NaN where a fit fails."""
    out = np.full(len(regressors), np.nan)
    for i, reg in enumerate(regressors):
        try:
            out[i] = reg(x_train, y_train, x_query, seed)
        except (np.linalg.LinAlgError, ValueError):
            pass
    return out
