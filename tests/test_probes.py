"""Ridge probes against scikit-learn on the same arrays, and their honest statuses."""

import numpy as np
import pytest
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_predict

from core.probes import probe, probe_targets


def grid(x):
    """The penalties, written out: 1e-6 .. 1e2 times the mean squared norm of a centred row."""
    return np.logspace(-6, 2, 17) * ((x - x.mean(0)) ** 2).sum(1).mean()


def test_held_out_r2_equals_sklearn_ridgecv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 200)) * 3
    w = rng.standard_normal(200)
    y = np.stack([x @ w * 0.1 + rng.standard_normal(48) * 2, x[:, 0] + 0.5 * rng.standard_normal(48),
                  rng.standard_normal(48)], 1)
    got = probe(x, y)
    for j in range(3):
        pred = cross_val_predict(RidgeCV(alphas=grid(x)), x, y[:, j], cv=KFold(5))
        assert got.r2[j] == pytest.approx(r2_score(y[:, j], pred), abs=1e-8)
    assert got.status[2] == "no better than a constant"  # noise: never shown as a success


def test_missing_targets_are_left_out_and_counted():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 20))
    y = (x[:, :2].sum(1) + 0.1 * rng.standard_normal(30))[:, None].repeat(2, 1)
    y[:5, 1] = np.nan
    got = probe(x, y)
    pred = cross_val_predict(RidgeCV(alphas=grid(x[5:])), x[5:], y[5:, 1], cv=KFold(5))
    assert got.n_seeds.tolist() == [30, 25]
    assert got.r2[1] == pytest.approx(r2_score(y[5:, 1], pred), abs=1e-8)


def test_unfittable_probes_say_why():
    x = np.random.default_rng(2).standard_normal((12, 5))
    y = np.stack([np.ones(12), np.r_[np.full(8, np.nan), np.arange(4.0)]], 1)
    got = probe(x, y)
    assert got.status[0] == "not fitted: the target is constant"
    assert got.status[1].startswith("not fitted: 4 seeds")
    assert np.isnan(got.r2).all()


def test_least_squares_weight_targets_equal_numpy_lstsq():
    rng = np.random.default_rng(3)
    x_train = rng.uniform(0, 10, (4, 8, 2))
    y_train = x_train @ np.array([2.0, -1.0]) + 3.0
    t = probe_targets(np.zeros((4, 1)), ["model"], np.zeros(4), x_train, y_train)
    np.testing.assert_allclose(t["ls-weight:0"], 2.0)
    np.testing.assert_allclose(t["ls-weight:1"], -1.0)
    np.testing.assert_allclose(t["ls-intercept"], 3.0)
