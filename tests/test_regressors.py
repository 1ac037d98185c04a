"""Regressors against direct scikit-learn / numpy fits on the same in-context rows."""

import random

import numpy as np
import pytest
from sklearn.ensemble import AdaBoostRegressor, RandomForestRegressor
from sklearn.linear_model import Lasso, LinearRegression, Ridge
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import SplineTransformer, StandardScaler
from sklearn.svm import SVR

from core.datasets import DATASETS
from core.regressors import REGRESSORS, default_suite, get_regressor, predict_all


@pytest.fixture(params=[("friedman2", 3, 25), ("linear-ni23", 8, 20), ("original1", 5, 15)])
def sample(request):
    name, seed, n = request.param
    return DATASETS[name].sample(seed, n)


def sk(est, s):
    return est.fit(s.x_train, s.y_train).predict(s.x_query[None])[0]


def test_sklearn_suite_matches_direct_fits(sample):
    s, seed = sample, sample.seed
    expected = {
        "linear": sk(LinearRegression(), s),
        "ridge": sk(Ridge(alpha=1.0), s),
        "lasso": sk(Lasso(alpha=1.0), s),
        "mlp-10-20-10": sk(MLPRegressor(hidden_layer_sizes=(10, 20, 10), solver="lbfgs", random_state=seed), s),
        "random-forest": sk(RandomForestRegressor(max_depth=3, random_state=seed), s),
        "adaboost": sk(AdaBoostRegressor(n_estimators=100, random_state=seed), s),
        "svr-scaled": sk(make_pipeline(StandardScaler(), SVR()), s),
        "knn": sk(KNeighborsRegressor(n_neighbors=5), s),
        "knn-3-distance": sk(KNeighborsRegressor(n_neighbors=3, weights="distance"), s),
        "knn-adaptive": sk(KNeighborsRegressor(n_neighbors=5, weights="distance"), s),
        "spline-linear": sk(make_pipeline(SplineTransformer(), LinearRegression()), s),
    }
    for name, value in expected.items():
        got = get_regressor(name)(s.x_train, s.y_train, s.x_query, seed)
        assert got == pytest.approx(value, rel=1e-9, abs=1e-9), name


def test_lr_methods_match_numpy_and_sklearn(sample):
    s, seed = sample, sample.seed
    ols = sk(LinearRegression(), s)
    run = lambda name: get_regressor(name)(s.x_train, s.y_train, s.x_query, seed)  # noqa: E731
    assert run("lr-ols") == pytest.approx(ols, rel=1e-8)
    assert run("lr-normal-equation") == pytest.approx(ols, rel=1e-6)
    assert run("lr-ridge-closed-form") == pytest.approx(sk(Ridge(alpha=1.0), s), rel=1e-8)
    assert run("lr-lasso") == pytest.approx(sk(Lasso(alpha=1.0, tol=1e-12, max_iter=100000), s), rel=1e-5, abs=1e-6)
    assert run("lr-knn") == pytest.approx(sk(KNeighborsRegressor(n_neighbors=5), s), rel=1e-12)
    # PCR keeps >= 95% of variance; with every component kept it is OLS.
    from core.regressors import pcr
    assert pcr(s.x_train, s.y_train, s.x_query, seed, keep=1.0) == pytest.approx(ols, rel=1e-6)


def test_iterative_lr_methods_converge_on_noise_free_linear_data():
    s = DATASETS["linear-ni22"].sample(2, 30)
    exact = sk(LinearRegression(), s)
    scale = np.abs(s.y_train).max()
    for name in ("lr-sgd", "lr-irls", "lr-bayesian", "gd-k1000"):
        got = get_regressor(name)(s.x_train, s.y_train, s.x_query, 2)
        assert abs(got - exact) < 0.01 * scale, name


def test_gradient_descent_against_the_update_rule():
    s = DATASETS["linear-ni12"].sample(1, 10)
    x, y, q, n = s.x_train, s.y_train, s.x_query, len(s.y_train)
    eta = 0.05
    # One step from w = 0 is eta/n * sum_i y_i x_i (the linear self-attention readout).
    one = eta / n * (y[:, None] * x).sum(axis=0) @ q
    assert get_regressor("gd-k1-eta0.05")(x, y, q, 0) == pytest.approx(one, rel=1e-12)
    # k steps: w_k = sum_{j<k} (I - eta A)^j eta b with A = X^T X / n, b = X^T y / n.
    a, b = x.T @ x / n, x.T @ y / n
    w, m = np.zeros(2), np.eye(2)
    for _ in range(7):
        w += m @ (eta * b)
        m = m @ (np.eye(2) - eta * a)
    assert get_regressor("gd-k7-eta0.05")(x, y, q, 0) == pytest.approx(w @ q, rel=1e-10)
    # Many steps with the default step reach least squares without intercept.
    w_ls = np.linalg.lstsq(x, y, rcond=None)[0]
    assert get_regressor("gd-k5000")(x, y, q, 0) == pytest.approx(w_ls @ q, rel=1e-6)


def test_baselines_and_seeding():
    s = DATASETS["friedman1"].sample(9, 12)
    assert get_regressor("mean")(s.x_train, s.y_train, s.x_query, 9) == pytest.approx(s.y_train.mean())
    assert get_regressor("last")(s.x_train, s.y_train, s.x_query, 9) == s.y_train[-1]
    assert get_regressor("random")(s.x_train, s.y_train, s.x_query, 9) == random.Random(9).choice(list(s.y_train))
    mlp = get_regressor("mlp-10")
    assert mlp(s.x_train, s.y_train, s.x_query, 9) == mlp(s.x_train, s.y_train, s.x_query, 9)
    assert mlp(s.x_train, s.y_train, s.x_query, 9) != mlp(s.x_train, s.y_train, s.x_query, 10)


def test_whole_suite_gives_finite_numbers_on_every_dataset():
    names = default_suite()
    assert len(names) >= 39 and set(REGRESSORS) - set(names) == {"gd-std-k1", "gd-std-k10", "knn-std", "kernel-std"}
    regs = [get_regressor(n) for n in names]
    for ds in DATASETS:
        s = DATASETS[ds].sample(0, 20)
        preds = predict_all(regs, s.x_train, s.y_train, s.x_query, 0)
        assert np.isfinite(preds).all(), (ds, [n for n, p in zip(names, preds) if not np.isfinite(p)])


def test_unknown_regressor_is_one_clear_line():
    from core.registry import UnknownName

    with pytest.raises(UnknownName) as err:
        get_regressor("xgboost")
    assert "unknown regressor 'xgboost'" in str(err.value) and "\n" not in str(err.value)
