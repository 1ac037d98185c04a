"""Datasets against the formulas of DESIGN.md, written out again here."""

import numpy as np
import pytest
from sklearn.datasets import make_friedman1, make_friedman2, make_regression
from sklearn.model_selection import train_test_split

from core.datasets import DATASETS


def split(x, y, seed):
    return train_test_split(x, y, test_size=1, random_state=seed)


def original_x(seed, n, ranges):
    u = np.random.RandomState(seed).uniform(size=(n, len(ranges)))
    lo = np.array([r[0] for r in ranges])
    hi = np.array([r[1] for r in ranges])
    return np.round(lo + u * (hi - lo), 2)


ORIGINALS = {
    "original1": ([(0, 100)], lambda x: x[:, 0] + 10 * np.sin(5 * np.pi * x[:, 0] / 100)
                  + 10 * np.cos(6 * np.pi * x[:, 0] / 100)),
    "original2": ([(0, 3), (4 * np.pi, 56 * np.pi), (0, 2), (1, 11)],
                  lambda x: (x[:, 0] ** 4 + (x[:, 1] * x[:, 2] - 2 / (np.sqrt(x[:, 1]) * np.sqrt(x[:, 3]))) ** 2) ** 0.75),
    "original3": ([(1, 3), (1, 10), (0, 10), (1, 20)],
                  lambda x: np.exp(x[:, 0]) + x[:, 1] * x[:, 2] / np.sqrt(x[:, 3]) + (x[:, 3] * x[:, 0]) ** 1.5),
    "original4": ([(2, 100), (2, 100)],
                  lambda x: (x[:, 1] / 10) * np.sin(x[:, 0]) + (x[:, 0] / 10) * np.cos(x[:, 1])
                  + np.sqrt(x[:, 0]) * np.log(x[:, 1]) / (np.sqrt(x[:, 1]) * np.log(x[:, 0]))),
    "original5": ([(-25, 25)] * 3,
                  lambda x: 100 * np.max(np.exp(x / 10) / np.exp(x / 10).sum(axis=1, keepdims=True), axis=1)),
}


@pytest.mark.parametrize("name", list(ORIGINALS))
@pytest.mark.parametrize("seed", [0, 7, 123])
def test_original_sets_match_formulas(name, seed):
    ranges, f = ORIGINALS[name]
    x = original_x(seed, 21, ranges)
    y = np.round(f(x), 2)
    x_tr, x_te, y_tr, y_te = split(x, y, seed)
    s = DATASETS[name].sample(seed, 20)
    np.testing.assert_allclose(s.x_train, x_tr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.y_train, y_tr, rtol=0, atol=1e-9)
    np.testing.assert_allclose(s.x_query, x_te[0], rtol=0, atol=1e-12)
    assert s.y_true == pytest.approx(y_te[0], abs=1e-9)
    for j, (lo, hi) in enumerate(ranges):
        assert lo <= s.x_train[:, j].min() and s.x_train[:, j].max() <= hi


@pytest.mark.parametrize("seed", [0, 3, 99])
def test_friedman2_and_3_formulas(seed):
    x, _ = make_friedman2(n_samples=26, noise=0, random_state=seed)
    y2 = np.sqrt(x[:, 0] ** 2 + (x[:, 1] * x[:, 2] - 1 / (x[:, 1] * x[:, 3])) ** 2)
    y3 = np.arctan((x[:, 1] * x[:, 2] - 1 / (x[:, 1] * x[:, 3])) / x[:, 0])
    for name, y in (("friedman2", y2), ("friedman3", y3)):
        x_tr, x_te, y_tr, y_te = split(np.round(x, 2), np.round(y, 2), seed)
        s = DATASETS[name].sample(seed, 25)
        np.testing.assert_array_equal(s.x_train, x_tr)
        np.testing.assert_allclose(s.y_train, y_tr, atol=1e-9)
        assert s.y_true == pytest.approx(y_te[0], abs=1e-9)
    assert 0 <= x[:, 0].min() and x[:, 0].max() <= 100
    assert 40 * np.pi <= x[:, 1].min() and x[:, 1].max() <= 560 * np.pi


def test_friedman1_and_linear_use_sklearn():
    x, y = make_friedman1(n_samples=11, n_features=5, noise=0, random_state=4)
    x_tr, _, y_tr, _ = split(np.round(x, 2), np.round(y, 2), 4)
    s = DATASETS["friedman1"].sample(4, 10)
    np.testing.assert_array_equal(s.x_train, x_tr)
    np.testing.assert_allclose(s.y_train, y_tr)
    for i, t in [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]:
        x, y = make_regression(n_samples=11, n_features=t, n_informative=i, noise=0, random_state=5)
        x_tr, x_te, y_tr, y_te = split(np.round(x, 2), np.round(y, 2), 5)
        s = DATASETS[f"linear-ni{i}{t}"].sample(5, 10)
        assert s.x_train.shape == (10, t)
        np.testing.assert_array_equal(s.x_train, x_tr)
        np.testing.assert_allclose(s.y_train, y_tr)


def test_every_dataset_is_deterministic_and_rounded():
    assert len(DATASETS) == 14
    for name in DATASETS:
        a, b = DATASETS[name].sample(11, 9), DATASETS[name].sample(11, 9)
        np.testing.assert_array_equal(a.x_train, b.x_train)
        assert a.y_true == b.y_true
        assert a.x_train.shape == (9, DATASETS[name].n_features)
        np.testing.assert_allclose(a.x_train, np.round(a.x_train, 2))
        np.testing.assert_allclose(a.y_train, np.round(a.y_train, 2))
        c = DATASETS[name].sample(12, 9)
        assert not np.array_equal(a.x_train, c.x_train)


def test_registry_refuses_duplicates_and_unknown_names():
    from core.datasets import Dataset
    from core.registry import UnknownName

    with pytest.raises(ValueError, match="already registered"):
        DATASETS.register("friedman2", Dataset("friedman2", 4, lambda n, s: None, ""))
    with pytest.raises(UnknownName, match="unknown dataset 'nope'"):
        DATASETS["nope"]
