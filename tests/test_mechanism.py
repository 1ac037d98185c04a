"""The mechanism lab on known answers: toys whose algorithm is known, estimators whose
weights are known in closed form, and agreement on columns built to be equal."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.datasets import DATASETS
from core.mechanism.agreement import (best_match, disagreement, indistinguishable, model_agreement, pairwise,
                                      y_scale)
from core.mechanism.toys import (GDConstruction, best_eta, best_eta_exact, eval_set, gd_one_step, lookup_toy,
                                 one_step_risk, prediction_gradient, sample_tasks, softmax_kernel_head, task_loss,
                                 train_lsa)
from core.mechanism.weights import (WeightSummary, cosine, effective_weights, gd_weights, kernel_weights,
                                    knn_weights, ols_weights, regressor_predict, ridge_weights, weight_summary)
from core.regressors import REGRESSORS, default_suite, get_regressor, predict_all
from core.store import MODEL_COLUMN


def numpy_tasks(n_tasks: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    t = sample_tasks(n_tasks, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [(t.x[i].numpy(), t.y[i].numpy(), t.x_query[i].numpy()) for i in range(n_tasks)]


@pytest.fixture(scope="module")
def trained():
    return train_lsa(seed=0)


# --- toys -----------------------------------------------------------------------------

def test_best_step_and_its_loss_closed_form_against_sampled_tasks():
    eta = best_eta_exact()
    assert eta == pytest.approx(best_eta(n_tasks=200_000, seed=1), rel=0.01)
    ev = eval_set(0)
    sampled = task_loss(gd_one_step(ev.x, ev.y, ev.x_query, eta), ev.y_query)
    assert sampled == pytest.approx(one_step_risk(eta), rel=0.02)
    assert 0.19 < one_step_risk(eta) < 0.22  # "about 0.2" (von Oswald et al.)
    assert one_step_risk(eta) < min(one_step_risk(0.9 * eta), one_step_risk(1.1 * eta))


def test_gd_construction_is_one_numpy_gd_step():
    model = GDConstruction(eta=0.7)
    for x, y, q in numpy_tasks(20, seed=5):
        plain = 0.7 / len(y) * sum(y[i] * (x[i] @ q) for i in range(len(y)))
        assert model.predict(x, y, q) == pytest.approx(plain, rel=1e-12, abs=1e-14)
        assert model.predict(x, y, q) == pytest.approx(get_regressor("gd-k1-eta0.7")(x, y, q, 0), rel=1e-12)
    t = sample_tasks(256, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(t.x, t.y, t.x_query), gd_one_step(t.x, t.y, t.x_query, 0.7))
    assert np.allclose(model.effective_matrix(), 0.7 * np.eye(10)) and max(model.stray_terms().values()) == 0


def test_trained_lsa_matches_one_gd_step(trained):
    gd = GDConstruction()
    ev = eval_set(0)
    with torch.no_grad():
        gd_loss = task_loss(gd(ev.x, ev.y, ev.x_query), ev.y_query)
    print(f"LSA loss {trained.eval_loss:.5f}, GD construction {gd_loss:.5f}, "
          f"closed form {one_step_risk(gd.eta):.5f}; trained in {trained.seconds:.1f} s")
    assert abs(trained.eval_loss / gd_loss - 1) < 0.02
    # The prediction as a function of x_q: d y_hat / d x_q over a batch of tasks.
    tasks = sample_tasks(4096, generator=torch.Generator().manual_seed(7))
    g_lsa, g_gd = prediction_gradient(trained.model, tasks), prediction_gradient(gd, tasks)
    assert cosine(g_lsa.numpy(), g_gd.numpy()) > 0.99
    # Its weights: the matrix multiplying y_i x_i^T x_q is the construction's eta I up to a scale.
    a = trained.model.effective_matrix()
    assert cosine(a, gd.effective_matrix()) > 0.99
    assert np.trace(a) / 10 == pytest.approx(gd.eta, rel=0.05)
    assert max(trained.model.stray_terms().values()) < 0.05


# --- effective weights ------------------------------------------------------------------

@pytest.fixture(params=[("friedman2", 3, 25), ("linear-ni23", 8, 20), ("original1", 5, 15)])
def sample(request):
    name, seed, n = request.param
    return DATASETS[name].sample(seed, n)


def standardized(s):
    sc = StandardScaler().fit(s.x_train)
    return sc.transform(s.x_train), sc.transform(s.x_query[None])[0]


def test_measured_weights_of_regressors_equal_their_closed_forms(sample):
    x, y, q = sample.x_train, sample.y_train, sample.x_query
    xs, qs = standardized(sample)
    expected = {
        "lr-ols": ols_weights(x, q),
        "linear": ols_weights(x, q),
        "lr-ridge-closed-form": ridge_weights(x, q, alpha=1.0),
        "gd-k1": gd_weights(x, q, k=1),
        "gd-k10": gd_weights(x, q, k=10),
        "gd-k3-eta0.001": gd_weights(x, q, k=3, eta=0.001),
        "lr-knn": knn_weights(x, q, k=5),
        # Standardized columns are centred, so a GD step on centred y adds nothing to the 1/n of the mean.
        "gd-std-k1": 1 / len(y) + gd_weights(xs, qs, k=1),
        "knn-std": knn_weights(xs, qs, k=5),
        "kernel-std": kernel_weights(xs, qs, bandwidth=float(np.median(pdist(xs)))),
        "mean": np.full(len(y), 1 / len(y)),
    }
    scale = max(1.0, float(np.abs(y).max()) / 100)
    for name, closed in expected.items():
        measured = effective_weights(regressor_predict(name), x, y, q, delta=1e-3 * scale)
        np.testing.assert_allclose(measured, closed, atol=1e-6, rtol=1e-6, err_msg=name)
    # Least squares sums to 1 with an intercept; one GD step from zero does not.
    assert ols_weights(x, q).sum() == pytest.approx(1.0)


def test_gd_weights_sum_of_steps_against_the_update_rule():
    s = DATASETS["linear-ni22"].sample(4, 12)
    x, q, n = s.x_train, s.x_query, len(s.y_train)
    a, eta = x.T @ x / n, 0.3
    for k in (1, 2, 7):
        # w_k = (I - (I - eta A)^k) A^-1 b, b = X^T y / n: linear in y with weights X (..)^T q / n.
        m = (np.eye(2) - np.linalg.matrix_power(np.eye(2) - eta * a, k)) @ np.linalg.inv(a)
        np.testing.assert_allclose(gd_weights(x, q, k, eta), x @ m.T @ q / n, rtol=1e-10)


def summary_kind(s: WeightSummary) -> str:
    if s.abs_total < 1e-9:
        return "ignores-y"
    if s.negative_share == 0 and abs(s.total - 1) < 1e-6 and s.rank_distance < -0.9:
        return "local-average"
    if s.rank_dot > 0.95:
        return "dot-product"
    return "other"


def test_weight_summary_classifies_the_toys(trained):
    toys = {"gd": GDConstruction(), "lsa": trained.model, "kernel": softmax_kernel_head(0.2), "lookup": lookup_toy()}
    want = {"gd": "dot-product", "lsa": "dot-product", "kernel": "local-average", "lookup": "ignores-y"}
    for x, y, q in numpy_tasks(8, seed=11):
        for name, toy in toys.items():
            w = effective_weights(toy.predict, x, y, q, delta=1e-3)
            s = weight_summary(w, x, q)
            assert summary_kind(s) == want[name], (name, s)
            if name in ("gd", "lsa"):
                assert cosine(w, x @ q) > (0.999999 if name == "gd" else 0.99), name
            if name == "gd":
                assert s.rank_dot == pytest.approx(1.0)
            if name == "kernel":
                assert s.total == pytest.approx(1.0, abs=1e-9) and s.rank_distance == pytest.approx(-1.0)
                np.testing.assert_allclose(w, kernel_weights(x, q, bandwidth=np.sqrt(0.2 / 2)), atol=1e-8)
    # Position: weights growing along the prompt rank +1 with position.
    x, _, q = numpy_tasks(1, seed=12)[0]
    assert weight_summary(np.linspace(0.1, 1, len(x)), x, q).rank_position == pytest.approx(1.0)
    assert np.isnan(weight_summary(np.zeros(len(x)), x, q).rank_dot)


# --- agreement --------------------------------------------------------------------------

COLUMNS = [MODEL_COLUMN, "linear", "lr-ols", "lr-ridge-closed-form", "gd-k1", "knn", "mean"]


@pytest.fixture(scope="module")
def run():
    samples = [DATASETS["linear-ni23"].sample(seed, 20) for seed in range(30)]
    regs = [get_regressor(n) for n in COLUMNS[1:]]
    preds = np.array([predict_all(regs, s.x_train, s.y_train, s.x_query, s.seed) for s in samples])
    y_train = np.array([s.y_train for s in samples])
    return preds, y_train


def test_model_equal_to_linear_is_matched_and_indistinguishable_from_ols(run):
    preds, y_train = run
    full = np.column_stack([preds[:, 0] * (1 + 1e-12), preds])
    assert best_match(full, COLUMNS, y_train) == "linear"
    table = model_agreement(full, COLUMNS, y_train)
    assert table["candidate"].iloc[0] == "linear" and table["equal"].iloc[0]
    assert set(table.loc[table["equal"], "candidate"]) >= {"linear", "lr-ols"}
    assert (table["low"] <= table["mean"]).all() and (table["mean"] <= table["high"]).all()
    groups = indistinguishable(full, COLUMNS, y_train)
    for exact in (True, False):
        group = groups.group_of(MODEL_COLUMN, exact=exact)
        assert {"linear", "lr-ols"} <= set(group) and not {"knn", "mean"} & set(group), group
    # The normaliser and the measure, by hand.
    scale = np.mean([np.var(y) for y in y_train])
    assert y_scale(y_train) == pytest.approx(scale)
    knn_row = table.set_index("candidate").loc["knn"]
    assert knn_row["mean"] == pytest.approx(np.mean((full[:, 0] - full[:, 5]) ** 2) / scale)
    m = pairwise(full, COLUMNS, y_train)
    assert np.allclose(m.to_numpy(), m.to_numpy().T) and np.allclose(np.diag(m), 0)
    assert m.loc["knn", "mean"] == pytest.approx(np.mean(disagreement(full[:, 5], full[:, 6], scale)))


def test_model_near_knn_is_matched_to_knn_and_grouping_does_not_chain(run):
    preds, y_train = run
    rng = np.random.default_rng(0)
    scale = y_scale(y_train)
    noisy_knn = preds[:, 4] + rng.normal(0, 0.01 * np.sqrt(scale), len(preds))
    full = np.column_stack([noisy_knn, preds])
    assert best_match(full, COLUMNS, y_train) == "knn"
    assert not model_agreement(full, COLUMNS, y_train)["equal"].any()
    # a, a + e, a + 2e: neighbours within the threshold, the ends not: no group of three.
    base = preds[:, 0]
    step = np.sqrt(0.6 * 0.01 * scale)
    chain = np.column_stack([base, base + step, base + 2 * step])
    groups = indistinguishable(chain, ["a", "b", "c"], y_train, threshold=0.01)
    assert max(len(g) for g in groups.close) == 2 and groups.equal == [["a"], ["b"], ["c"]]
    assert len(indistinguishable(chain, ["a", "b", "c"], y_train, threshold=0.03).close) == 1


# --- standardized regressors --------------------------------------------------------------

def test_standardized_regressors_against_sklearn(sample):
    s, seed = sample, sample.seed
    xs, qs = standardized(s)
    y, n = s.y_train, len(s.y_train)
    run = lambda name: get_regressor(name)(s.x_train, y, s.x_query, seed)  # noqa: E731
    knn = make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=5)).fit(s.x_train, y)
    assert run("knn-std") == pytest.approx(knn.predict(s.x_query[None])[0], rel=1e-12)
    h = np.median(pdist(xs))
    k = rbf_kernel(xs, qs[None], gamma=1 / (2 * h**2))[:, 0]
    assert run("kernel-std") == pytest.approx(k @ y / k.sum(), rel=1e-10)
    a, b = xs.T @ xs / n, xs.T @ (y - y.mean()) / n
    eta = 1 / np.linalg.eigvalsh(a).max()
    assert run("gd-std-k1") == pytest.approx(y.mean() + eta * b @ qs, rel=1e-10)
    w10 = (np.eye(len(a)) - np.linalg.matrix_power(np.eye(len(a)) - eta * a, 10)) @ np.linalg.solve(a, b)
    assert run("gd-std-k10") == pytest.approx(y.mean() + w10 @ qs, rel=1e-8)


def test_standardized_regressors_are_registered_outside_the_default_suite():
    new = ["gd-std-k1", "gd-std-k10", "knn-std", "kernel-std"]
    assert all(n in REGRESSORS and REGRESSORS[n].description for n in new)
    assert not set(new) & set(default_suite())
    regs = [get_regressor(n) for n in new]
    for ds in DATASETS:
        for n_examples in (1, 3, 20):
            s = DATASETS[ds].sample(0, n_examples)
            preds = predict_all(regs, s.x_train, s.y_train, s.x_query, 0)
            assert np.isfinite(preds).all(), (ds, n_examples, preds)
