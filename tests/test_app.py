"""Every page of the app (AppTest) on a small real store, checked against independent computations."""

import os
import shutil

import numpy as np
import pytest
import torch
import zarr
from sklearn.linear_model import LinearRegression
from streamlit.testing.v1 import AppTest

from cache_builder.build import BuildSpec, build
from core.store import RunStore
from support import MAIN, app_page
REGS = ["mean", "last", "linear", "knn", "gd-k10"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("appcache")
    spec = BuildSpec("tiny-random-llama", "friedman2", 6, list(range(12)), regressors=REGS, batch_size=4)
    build(spec, out, progress=False)
    return out


@pytest.fixture(scope="module")
def store(cache):
    return RunStore.open(next(cache.glob("*.zarr")))


def page(cache, name: str, **params) -> AppTest:
    return app_page(name, {"WORKBENCH_CACHE": str(cache)}, **params)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_runs_page_lists_the_store_and_its_provenance(cache, store):
    at = page(cache, "runs")
    assert at.title[0].value == "Runs"
    table = at.dataframe[0].value
    assert table.run.tolist() == [store.name] and table.seeds_done.tolist() == [12]
    assert metric(at, "Model") == "tiny-random-llama" and metric(at, "Dataset") == "friedman2"
    assert metric(at, "Seeds done") == "12 / 12"
    assert "friedman2" in at.code[0].value  # the store's description


def test_prompt_page_shows_the_seed_and_every_answer(cache, store):
    at = page(cache, "prompt", seed="3")
    i = store.index(3)
    assert metric(at, "Truth") == f"{store.y_true()[i]:.2f}"
    answers = at.dataframe[0].value.set_index("candidate")
    x, y = store.array("x_train")[i], store.array("y_train")[i]
    want = LinearRegression().fit(x, y).predict(store.array("x_query")[i][None])[0]
    assert answers.loc["linear", "value"] == pytest.approx(want, rel=1e-9)
    assert answers.loc["mean", "abs_error"] == pytest.approx(abs(y.mean() - store.y_true()[i]))
    assert repr(store.llm_text()[i]) in at.markdown[0].value
    assert at.query_params["seed"] == "3"


def test_leaderboard_page_matches_numpy(cache, store):
    at = page(cache, "leaderboard")
    table = at.dataframe[0].value.set_index("regressor")
    y_true, y_train = store.y_true(), store.array("y_train")[:]
    assert table.loc["mean", "mse_mean"] == pytest.approx(np.mean((y_train.mean(1) - y_true) ** 2))
    assert table.loc["last", "mae_median"] == pytest.approx(np.median(np.abs(y_train[:, -1] - y_true)))
    failures = int(np.isnan(store.predictions()[:, 0]).sum())
    assert table.loc["model", "failures"] == failures
    assert metric(at, "Seeds") == "12"


def test_leaderboard_subset_by_the_models_error_warns_of_bias(cache):
    at = page(cache, "leaderboard", subset="model-low-error")
    assert any("biased" in w.value for w in at.sidebar.warning)


def test_logit_diff_page_equals_the_raw_model(cache, store, tokenizer):
    from core.models import tiny_random_llama_hf

    at = page(cache, "logit_diff", a="truth", b="linear")
    hf = tiny_random_llama_hf().eval()
    col = store.columns.index("linear")
    diffs = []
    for i in range(12):
        ta = tokenizer.encode(f"{store.y_true()[i]:07.2f}", add_special_tokens=False)
        tb = tokenizer.encode(f"{store.predictions()[i, col]:07.2f}", add_special_tokens=False)
        if ta == tb:
            continue
        k = next(j for j, (p, q) in enumerate(zip(ta, tb)) if p != q)
        with torch.inference_mode():
            logits = hf(torch.tensor([store.tokens(i).tolist() + ta[:k]])).logits[0, -1]
        diffs.append(float(logits[ta[k]] - logits[tb[k]]))
    assert store.attrs["prompt"]["int_digits"][-1] == 4  # the format written above
    assert metric(at, "Seeds compared") == f"{len(diffs)} / 12"
    assert metric(at, "Final logit difference (mean)") == f"{np.mean(diffs):.3f}"
    assert "What is compared" in at.info[0].value


def test_logit_diff_page_says_why_nothing_is_compared(cache, store):
    at = page(cache, "logit_diff", a="truth", b="model")
    if np.isnan(store.predictions()[:, 0]).all():  # the random model never writes a number
        assert any("No seed of this subset can be compared" in w.value for w in at.warning)


def test_attention_page_ranks_heads_from_the_stored_rows(cache, store):
    at = page(cache, "attention")
    top = at.dataframe[0].value.iloc[0]
    n_layers, n_heads = store.attrs["model"]["n_layers"], store.attrs["model"]["n_heads"]
    score = np.zeros((n_layers, n_heads))
    for i in range(12):
        ys = store.array("positions/y")[i]
        xs = store.array("positions/x")[i].reshape(-1, 2)
        for layer in range(n_layers):
            final = store.attn_rows(i, layer)[:, -1]
            score[layer] += (sum(final[:, a + 1:b].sum(-1) for a, b in ys)
                             - sum(final[:, a + 1:b].sum(-1) for a, b in xs)) / 12
    layer, head = np.unravel_index(score.argmax(), score.shape)
    assert (top["layer"], top["head"]) == (layer, head)
    assert top.answer_minus_feature == pytest.approx(score.max(), abs=1e-3)
    assert len(at.get("iframe")) == 1  # the CircuitsVis view


def test_mlp_page_norms_equal_the_stored_mlp_outputs(cache, store):
    at = page(cache, "mlp", a="truth", b="linear")
    table = at.dataframe[0].value
    for layer in range(store.attrs["model"]["n_layers"]):
        final = np.mean([np.linalg.norm(store.mlp_out(i, layer)[-1]) for i in range(12)])
        assert table.loc[layer, "norm_final"] == pytest.approx(final, rel=1e-4)


def test_probes_page_equals_sklearn(cache, store):
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict


    at = page(cache, "probes")
    best = at.dataframe[0].value.set_index("target")
    row = best.loc["truth"]
    x = np.stack([store.resid(i, int(row.layer))[-1] for i in range(12)]).astype(np.float64)
    alphas = np.logspace(-6, 2, 17) * ((x - x.mean(0)) ** 2).sum(1).mean()
    pred = cross_val_predict(RidgeCV(alphas=alphas), x, store.y_true(), cv=KFold(5))
    assert row.r2 == pytest.approx(r2_score(store.y_true(), pred), abs=1e-6)
    assert "pred:model" not in best.index or best.loc["pred:model", "status"] != "ok"


@pytest.mark.parametrize("damage, message", [
    ("schema", "schema version"), ("half", "half-created"), ("none", "No run store")])
def test_bad_stores_get_a_readable_message(cache, tmp_path, damage, message):
    if damage != "none":
        shutil.copytree(next(cache.glob("*.zarr")), tmp_path / "broken.zarr")
        attrs = zarr.open_group(str(tmp_path / "broken.zarr"), mode="r+").attrs
        if damage == "schema":
            attrs["schema_version"] = 99
        else:
            del attrs["params"]
    os.environ["WORKBENCH_CACHE"] = str(tmp_path)
    for name in ("runs", "leaderboard", "probes"):
        at = AppTest.from_file(MAIN, default_timeout=60).run()
        at.switch_page(f"views/{name}.py").run()
        assert not at.exception
        shown = [e.value for e in at.error] + [i.value for i in at.info] + [str(d.value) for d in at.dataframe]
        assert any(message in s for s in shown), shown
