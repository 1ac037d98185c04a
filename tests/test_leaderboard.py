"""The leaderboard against a hand computation, failures included."""

import numpy as np
import pytest

from core.leaderboard import leaderboard


def test_leaderboard_by_hand():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    #                 model   a     b
    preds = np.array([[1.5, 1.0, np.nan],
                      [np.nan, 2.5, 2.0],
                      [3.0, 5.0, 6.0],
                      [2.0, 4.0, 4.0]])
    t = leaderboard(preds, y, ["model", "a", "b"]).set_index("regressor")
    # model: errors .5, fail, 0, 2
    assert t.loc["model", "mse_mean"] == pytest.approx((0.25 + 0 + 4) / 3)
    assert t.loc["model", "mae_median"] == pytest.approx(0.5)
    assert t.loc["model", "failures"] == 1
    # a: errors 0, .5, 2, 0 -> beats model on seeds 0, 1 (model failed); loses seed 2; wins seed 3
    assert t.loc["a", "mse_mean"] == pytest.approx((0 + 0.25 + 4 + 0) / 4)
    assert t.loc["a", "mae_mean"] == pytest.approx(2.5 / 4)
    assert t.loc["a", "beats_model"] == pytest.approx(3 / 4)
    # b: errors fail, 0, 3, 0 -> wins seeds 1, 3
    assert t.loc["b", "failures"] == 1
    assert t.loc["b", "beats_model"] == pytest.approx(2 / 4)
    assert t.loc["model", "beats_model"] == 0
    # ranks per seed (1 best, failures last, ties averaged):
    # s0: a1 model2 b3 | s1: b1 a2 model3 | s2: model1 a2 b3 | s3: a1.5 b1.5 model3
    assert t.loc["a", "avg_rank"] == pytest.approx((1 + 2 + 2 + 1.5) / 4)
    assert t.loc["b", "avg_rank"] == pytest.approx((3 + 1 + 3 + 1.5) / 4)
    assert t.loc["model", "avg_rank"] == pytest.approx((2 + 3 + 1 + 3) / 4)
    assert list(t.index) == ["a", "model", "b"]  # sorted by mean squared error


# Ties within the tolerance (issue: float noise must not order the ranks).

from scipy.stats import rankdata  # noqa: E402

from core.datasets import DATASETS  # noqa: E402
from core.leaderboard import REL_TOL, beats_all, equivalence_groups, seed_subset  # noqa: E402
from core.regressors import get_regressor  # noqa: E402


def _fits(names, dataset="friedman2", n=12, seeds=range(20)):
    samples = [DATASETS[dataset].sample(s, n) for s in seeds]
    preds = np.array([[get_regressor(r)(s.x_train, s.y_train, s.x_query, s.seed) for r in names] for s in samples])
    return preds, np.array([s.y_true for s in samples])


def test_two_implementations_of_ols_share_their_rank():
    from sklearn.linear_model import LinearRegression

    names = ["linear", "lr-ols", "knn", "mean"]
    preds, y = _fits(names)
    samples = [DATASETS["friedman2"].sample(s, 12) for s in range(20)]
    sk = [LinearRegression().fit(s.x_train, s.y_train).predict(s.x_query[None])[0] for s in samples]
    np.testing.assert_allclose(preds[:, 0], sk, rtol=1e-9)
    # The model: halfway between OLS and kNN, so OLS's rank against it is not decided by noise.
    model = (preds[:, 0] + preds[:, 2]) / 2
    # A third OLS, off by 1e-12 relative on every seed: noise of the size seen between solvers.
    noisy = preds[:, 0] * (1 + 1e-12)
    cols = ["model", *names, "ols-noisy"]
    table = leaderboard(np.column_stack([model, preds, noisy]), y, cols).set_index("regressor")
    assert table.loc["linear", "avg_rank"] == table.loc["lr-ols", "avg_rank"] == table.loc["ols-noisy", "avg_rank"]
    assert table.loc["linear", "beats_model"] == table.loc["ols-noisy", "beats_model"]
    assert table.loc["linear", "equivalent_to"] == "lr-ols, ols-noisy"


def test_a_regressor_equal_to_the_model_neither_beats_nor_loses():
    y = np.array([10.0, 20.0, 30.0, 40.0])
    model = np.array([12.0, 19.0, 33.0, 40.5])
    copy = model * (1 + 3e-13)  # the model's answer up to float noise
    worse = np.array([15.0, 25.0, 35.0, 45.0])
    preds = np.column_stack([model, copy, worse])
    cols = ["model", "copy", "worse"]
    t = leaderboard(preds, y, cols).set_index("regressor")
    assert t.loc["copy", "beats_model"] == 0 and t.loc["model", "beats_model"] == 0
    assert t.loc["copy", "avg_rank"] == t.loc["model", "avg_rank"] == 1.5
    assert not seed_subset(preds, y, cols, "model-better", "copy")[0].any()
    assert not seed_subset(preds, y, cols, "model-worse", "copy")[0].any()
    assert seed_subset(preds, y, cols, "model-better", "worse")[0].all()
    assert beats_all(preds, y, cols) == 0.0  # it never beats its own copy
    assert beats_all(preds[:, [0, 2]], y, ["model", "worse"]) == 1.0
    # The model is never merged with a regressor, even an equal one.
    assert equivalence_groups(preds, cols) == [["model"], ["copy"], ["worse"]]


def test_ranks_equal_scipy_rankdata_on_errors_rounded_at_the_tolerance():
    rng = np.random.default_rng(0)
    y = rng.uniform(-500, 500, 60)
    # Errors on a grid of 0.01 (as the rounded data gives), several columns on the same
    # grid point up to noise far below the tolerance, some failures.
    grid = rng.integers(0, 8, (60, 9)) * 0.01 + rng.integers(0, 3, (60, 1))
    noise = 1 + rng.uniform(-1, 1, grid.shape) * 1e-12
    preds = y[:, None] + rng.choice([-1, 1], grid.shape) * grid * noise
    preds[rng.uniform(size=preds.shape) < 0.05] = np.nan
    cols = ["model", *[f"r{j}" for j in range(8)]]
    err = np.abs(preds - y[:, None])
    rounded = np.where(np.isnan(err), np.inf, np.round(err, 6))
    expected = np.array([rankdata(row, method="average") for row in rounded]).mean(0)
    got = leaderboard(preds, y, cols).set_index("regressor").loc[cols, "avg_rank"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # Without the tolerance the noise would order the ties: the test data does hold some.
    raw = np.array([rankdata(np.where(np.isnan(r), np.inf, r), method="average") for r in err]).mean(0)
    assert np.abs(raw - expected).max() > 0.01


def test_equivalence_is_agreement_on_every_seed():
    base = np.array([1.0, 2.0, 3.0])
    cols = ["a", "b", "c", "d"]
    near = base * (1 + 0.5 * REL_TOL)
    apart_once = base.copy()
    apart_once[1] += 1e-3
    both_fail = np.array([1.0, np.nan, 3.0])
    preds = np.column_stack([base, near, apart_once, both_fail])
    assert equivalence_groups(preds, cols) == [["a", "b"], ["c"], ["d"]]
    assert equivalence_groups(np.column_stack([both_fail, both_fail]), ["x", "y"]) == [["x", "y"]]
    assert equivalence_groups(preds[:0], cols) == [["a"], ["b"], ["c"], ["d"]]


@pytest.fixture(scope="module")
def ols_store(tmp_path_factory):
    from cache_builder.build import BuildSpec, build
    from core.store import RunStore

    spec = BuildSpec("tiny-random-llama", "friedman2", 15, [0, 1, 2, 3],
                     regressors=["linear", "lr-ols", "lr-normal-equation", "lr-pcr", "knn", "mean"], batch_size=4)
    return RunStore.open(build(spec, tmp_path_factory.mktemp("cache"), progress=False))


def test_equivalent_estimators_are_one_row_of_the_store_leaderboard(ols_store, capsys):
    from cache_builder.cli import main
    from core.leaderboard import store_leaderboard

    preds = ols_store.predictions()
    lin = preds[:, ols_store.columns.index("linear")]
    for name in ("lr-ols", "lr-normal-equation", "lr-pcr"):
        np.testing.assert_allclose(preds[:, ols_store.columns.index(name)], lin, rtol=1e-9)
    short = store_leaderboard(ols_store, collapse=True).set_index("regressor")
    assert "lr-ols" not in short.index and "lr-pcr" not in short.index
    assert short.loc["linear", "equivalent_to"] == "lr-ols, lr-normal-equation, lr-pcr"
    assert short.loc["knn", "equivalent_to"] == ""
    full = store_leaderboard(ols_store).set_index("regressor")
    assert len(full) == len(ols_store.columns)
    assert full.loc["lr-pcr", "equivalent_to"] == "linear, lr-ols, lr-normal-equation"

    assert main(["leaderboard", str(ols_store.path)]) == 0
    out = capsys.readouterr().out
    assert "lr-ols, lr-normal-equation, lr-pcr" in out and "\nlr-pcr " not in out
    assert main(["leaderboard", str(ols_store.path), "--csv"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0].endswith(",equivalent_to") and len(csv) == 1 + len(ols_store.columns)


def test_normal_equation_falls_back_to_minimum_norm_least_squares():
    rng = np.random.default_rng(1)
    reg = get_regressor("lr-normal-equation")
    assert "minimum-norm" in reg.description
    # 4 examples, 4 features + intercept: X^T X of the centred data is singular.
    x, y, q = rng.uniform(0, 100, (4, 4)), rng.uniform(0, 100, 4), rng.uniform(0, 100, 4)
    xc, yc = x - x.mean(0), y - y.mean()
    expected = y.mean() + (q - x.mean(0)) @ (np.linalg.pinv(xc) @ yc)
    assert reg(x, y, q, 0) == pytest.approx(expected, rel=1e-8)
    # Well-posed: the plain normal equation.
    x, y = rng.uniform(0, 10, (30, 3)), rng.uniform(0, 10, 30)
    xc, yc = x - x.mean(0), y - y.mean()
    expected = y.mean() + (q[:3] - x.mean(0)) @ np.linalg.solve(xc.T @ xc, xc.T @ yc)
    assert reg(x, y, q[:3], 0) == pytest.approx(expected, rel=1e-10)
