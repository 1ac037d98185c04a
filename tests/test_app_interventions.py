"""The Interventions page (AppTest) against a real intervention server on a tiny run store.

No mocks: `python -m cache_builder serve` runs tiny-random-llama in a subprocess, the page
sends experiments to it over HTTP with a token, and what the page shows is compared with
the result the server saved in the results store.
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from streamlit.testing.v1 import AppTest

from cache_builder.build import BuildSpec, build
from core.interventions import archive
from support import app_page, free_port, stop

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90
ABLATION = {"mode": "Ablate", "site": "resid_pre", "every_layer": "0", "layers": "0,1", "pos": "final",
            "method": "zero", "seeds": "0,1", "a": "truth", "b": "linear"}
PATCHING = {"mode": "Patch", "site": "resid_pre", "every_layer": "1", "pos": "slot[3],final",
            "pairing": "consecutive", "npairs": "2"}
EDIT = {"mode": "Edit", "ops": "perturb-y,permute", "every_example": "0", "example": "1", "delta": "0.5",
        "seeds": "0,1", "a": "truth", "b": "linear", "regs": "linear,mean", "readout": "greedy"}


@pytest.fixture(scope="module", autouse=True)
def _restore_environment():
    """page() points the app at this module's cache and server through the environment; undo it after."""
    keys = ("WORKBENCH_CACHE", "WORKBENCH_SERVER", "WORKBENCH_TOKEN")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def cache_and_server(tmp_path_factory):
    """(cache directory with a tiny run store, server URL, token): a real intervention server
    over that cache, started first so that it loads its model while the store is built."""
    cache, where = tmp_path_factory.mktemp("ivcache"), tmp_path_factory.mktemp("server")
    token = "test-token-" + os.urandom(8).hex()
    token_file = where / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    port = free_port()
    log_path = where / "server.log"
    log = open(log_path, "w+b")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cache_builder", "serve", "--model", "tiny-random-llama",
                             "--cache", str(cache), "--port", str(port), "--token-file", str(token_file)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        spec = BuildSpec("tiny-random-llama", "friedman2", 4, [0, 1, 2, 3, 4, 5], regressors=["linear", "mean"],
                         batch_size=3)
        build(spec, cache, progress=False)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"the intervention server did not start:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.25)
        yield cache, url, token
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="module")
def cache(cache_and_server):
    return cache_and_server[0]


@pytest.fixture(scope="module")
def server(cache_and_server):
    """(url, token) of the server."""
    return cache_and_server[1:]


@pytest.fixture(scope="module")
def run_name(cache):
    return next(cache.glob("*.zarr")).name.removesuffix(".zarr")


def page(cache, url: str, token: str | None, name: str = "interventions", **params) -> AppTest:
    return app_page(name, {"WORKBENCH_CACHE": str(cache), "WORKBENCH_SERVER": url, "WORKBENCH_TOKEN": token},
                    **params)


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there once the probe socket is closed


def shown_summary(at: AppTest) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if {"label", "n_units", "normalized_low"} <= set(d.value.columns))


def chart_data(at: AppTest, mark: str) -> list[pd.DataFrame]:
    """The data of the page's altair charts whose (first) mark is `mark`, as sent to the browser."""
    import json

    import pyarrow as pa

    out = []
    for c in at.get("vega_lite_chart"):
        spec = json.loads(c.proto.spec)
        first = spec.get("mark") or spec.get("layer", [{}])[0].get("mark") or spec.get("spec", {}).get("mark")
        if (first.get("type") if isinstance(first, dict) else first) == mark:
            out.append(pa.ipc.open_stream(c.proto.datasets[0].data.data).read_all().to_pandas())
    return out


def run_experiment(cache, server, run_name, params: dict) -> tuple[AppTest, object, str]:
    """Sets up an experiment by its URL, clicks Run; returns the page, the saved result and the cost shown."""
    at = page(cache, *server, **params)
    assert "exp" not in at.query_params  # not run yet
    cost = next(m.value for m in at.markdown if m.value.startswith("**Cost**"))
    at.button(key="w:go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    hash_ = at.query_params["exp"]
    saved = archive.load(cache, run_name, hash_)
    assert saved is not None
    return at, saved, cost


@pytest.fixture(scope="module")
def ablation(cache, server, run_name):
    return run_experiment(cache, server, run_name, ABLATION)


@pytest.fixture(scope="module")
def patching(cache, server, run_name):
    return run_experiment(cache, server, run_name, PATCHING)


def test_ablation_runs_on_the_server_and_shows_its_stored_summary(cache, run_name, ablation):
    at, saved, cost = ablation
    assert "4 rows (2 cells x 2 units)" in cost and "clean forward passes" in cost
    pd.testing.assert_frame_equal(shown_summary(at).reset_index(drop=True), saved.summary(), check_dtype=False)
    assert saved.request.experiment.root.method == "zero" and saved.request.experiment.root.seeds == [0, 1]
    assert saved.summary().logprob_diff.notna().all()  # truth versus linear: both are numbers
    assert any("off-distribution" in i.value for i in at.info)
    (heat,), (bars,) = chart_data(at, "rect"), chart_data(at, "bar")
    pd.testing.assert_frame_equal(heat, saved.summary(), check_dtype=False)
    pd.testing.assert_frame_equal(bars, saved.summary(), check_dtype=False)
    # before/after: the clean answers and the decoded ones of the chosen cell, one row per seed
    table = next(d.value for d in at.dataframe if "decoded_text" in d.value.columns and "truth" in d.value.columns)
    assert sorted(table.unit) == ["seed 0", "seed 1"]
    y_true = zarr.open_group(str(cache / f"{run_name}.zarr"), mode="r")["y_true"][:]
    assert table.truth.tolist() == pytest.approx([y_true[int(u.split()[1])] for u in table.unit])
    assert any(b.label == "Download summary" for b in at.get("download_button"))


def test_patching_grid_heatmap_equals_the_stored_result(patching):
    at, saved, cost = patching
    summary = saved.summary()
    assert len(summary) == 3 * 2  # resid_pre 0-2 x (slot[3], final)
    assert "12 rows (6 cells x 2 units)" in cost
    pd.testing.assert_frame_equal(shown_summary(at).reset_index(drop=True), summary, check_dtype=False)
    assert [tuple(p) for p in saved.request.experiment.root.pairs] == [(0, 1), (2, 3)]
    per_unit = next(d.value for d in at.dataframe if "unit" in d.value.columns and len(d.value.columns) == 7)
    assert per_unit.unit.tolist() == ["0->1", "2->3"]
    (heat,) = chart_data(at, "rect")
    pd.testing.assert_frame_equal(heat, summary, check_dtype=False)
    assert not chart_data(at, "bar")  # bars are for ablations


def test_a_link_reopens_a_result_without_a_server(cache, ablation):
    saved = ablation[1]
    at = page(cache, closed_port_url(), None, exp=saved.hash)
    assert at.query_params["exp"] == saved.hash
    pd.testing.assert_frame_equal(shown_summary(at).reset_index(drop=True), saved.summary(), check_dtype=False)
    assert not at.error
    assert not [b for b in at.button if b.key == "w:go"]  # nothing to run: it is already there
    assert any(f"Already run: result `{saved.hash}`" in c.value for c in at.caption)
    # the form shows the experiment's settings
    assert at.multiselect(key="w:layers").value == [0, 1] and at.multiselect(key="w:pos").value == ["final"]
    assert at.multiselect(key="w:seeds").value == [0, 1]
    # a changed setting is another experiment: not run yet, so the link loses its hash
    at.multiselect(key="w:seeds").set_value([0, 1, 2]).run()
    assert not at.exception and "exp" not in at.query_params


def test_prompt_edits_run_on_the_server_beside_the_refit_regressors(cache, server, run_name):
    at, saved, cost = run_experiment(cache, server, run_name, EDIT)
    assert "4 rows (2 cells x 2 units)" in cost
    exp = saved.request.experiment.root
    assert [e.label for e in exp.edits] == ["y[1] +0.5", "permute (draw 0)"] and exp.regressors == ["linear", "mean"]
    rows = saved.frame()
    # The refits, against what each edit does to them: the mean of 4 y's moves by 0.5 / 4 when
    # one y moves by 0.5, and neither mean nor least squares move when the examples are reordered.
    perturb, permute = rows[rows.cell == 0], rows[rows.cell == 1]
    assert perturb["shift:mean"].to_numpy() == pytest.approx([0.125, 0.125])
    assert permute["shift:mean"].to_numpy() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert permute["shift:linear"].to_numpy() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert not perturb.changed_length.any()
    # The closest regressor per edit: the one whose mean shift is nearest the model's.
    shown = next(d.value for d in at.dataframe if "closest_regressor" in d.value.columns)
    means = rows.groupby("cell")[["shift", "shift:linear", "shift:mean"]].mean()
    for c, got in enumerate(shown.closest_regressor):
        gaps = {r: abs(means.at[c, f"shift:{r}"] - means.at[c, "shift"]) for r in ("linear", "mean")}
        assert got == (min(gaps, key=gaps.get) if np.isfinite(list(gaps.values())).any() else None)
    pd.testing.assert_frame_equal(shown_summary(at).reset_index(drop=True), saved.summary(), check_dtype=False)
    (bars,) = chart_data(at, "bar")
    pd.testing.assert_frame_equal(bars, saved.summary(), check_dtype=False)
    diff = next(c.value for c in at.code if c.value.startswith("---"))
    assert "-Output: " in diff and "+Output: " in diff  # the perturbed example's y, before and after
    # A link reopens it with the form as it was.
    again = page(cache, closed_port_url(), None, exp=saved.hash)
    assert not again.exception and again.radio(key="w:mode").value == "Edit"
    assert again.multiselect(key="w:ops").value == ["perturb-y", "permute"]
    assert not any("only part of it" in i.value for i in again.info)  # the form shows it whole
    assert any(f"Already run: result `{saved.hash}`" in c.value for c in again.caption)


def test_a_query_grid_draws_the_answer_as_the_query_moves(tiny, tmp_path):
    """A 1-feature run's query edits, run in process and reopened by link without a server:
    the curve is the model's answers and the regressors refit on the seed's examples."""
    import pyarrow as pa
    from sklearn.linear_model import LinearRegression

    from core.interventions.backend import LocalBackend
    from core.interventions.spec import ExperimentRequest

    store = Path(build(BuildSpec("tiny-random-llama", "linear-ni11", 4, [0, 1], regressors=["linear", "mean"],
                                 batch_size=2, acts="none"), tmp_path, progress=False))
    run = store.name.removesuffix(".zarr")
    grid = [-1.0, 0.0, 1.5]
    request = ExperimentRequest.model_validate({"run": run, "experiment": {
        "kind": "edit", "edits": [{"op": "query", "x": [v]} for v in grid], "seeds": [1]}})
    result = LocalBackend(tiny, tmp_path).run(request)
    at = page(tmp_path, closed_port_url(), None, run=run, exp=result.hash)
    assert not at.exception, [e.value for e in at.exception]
    frames = [pa.ipc.open_stream(d.data.data).read_all().to_pandas()
              for c in at.get("vega_lite_chart") for d in c.proto.datasets]
    curve = next(f for f in frames if {"x", "answer", "subject"} <= set(f.columns))
    z = zarr.open_group(str(store), mode="r")
    x, y = np.round(z["x_train"][1], 2), np.round(z["y_train"][1], 2)
    by = {name: part.sort_values("x") for name, part in curve.groupby("subject")}
    assert by["linear"]["answer"].to_numpy() == pytest.approx(
        LinearRegression().fit(x, y).predict(np.array(grid)[:, None]), abs=1e-6)
    assert by["mean"]["answer"].to_numpy() == pytest.approx([y.mean()] * 3, abs=1e-9)
    np.testing.assert_array_equal(by["model"]["answer"].to_numpy(), np.array(result.table["decoded"]))


def test_typed_queries_parse_to_the_edits_they_name():
    from app.prompt_edits import build_edits, parse_vectors

    assert parse_vectors("-1:1:5", 1) == [[-1.0], [-0.5], [0.0], [0.5], [1.0]]
    assert parse_vectors("0.5, 1; 2, 3", 2) == [[0.5, 1.0], [2.0, 3.0]]
    for typed, n, message in [("1, 2", 1, "has 2 values"), ("a:b:3", 1, "lo:hi:m"), ("0:1:500", 1, "1-200"),
                              (" ; ", 1, "no value")]:
        with pytest.raises(ValueError, match=message):
            parse_vectors(typed, n)
    edits = build_edits(["perturb-y", "permute", "query"], [0, 2], 0.5, 10.0, 0, 3, [[0.0], [1.0]], [], 0.0, 2)
    assert [e.label for e in edits] == ["y[0] +0.5", "y[2] +0.5", "permute (draw 0)", "permute (draw 1)",
                                        "query := (0)", "query := (1)"]


def test_earlier_experiments_are_listed_and_reopen(cache, run_name, ablation, patching):
    rows = archive.list_results(cache, run_name)
    at = page(cache, closed_port_url(), None)
    listed = next(d.value for d in at.dataframe if "finished" in d.value.columns and "hash" in d.value.columns)
    assert listed.hash.tolist() == [r["hash"] for r in rows]
    assert {ablation[1].hash, patching[1].hash} <= set(listed.hash)
    at.selectbox(key="w:reopen:None").set_value(patching[1].hash).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["exp"] == patching[1].hash and at.radio(key="w:mode").value == "Patch"
    pd.testing.assert_frame_equal(shown_summary(at).reset_index(drop=True), patching[1].summary(),
                                  check_dtype=False)


@pytest.mark.parametrize("where, message", [("closed", "python -m cache_builder serve --model tiny-random-llama"),
                                            ("bad-token", "refused the token")])
def test_a_server_that_cannot_run_gives_a_readable_error(cache, server, where, message):
    url, token = (closed_port_url(), None) if where == "closed" else (server[0], "not-the-token")
    at = page(cache, url, token, **{**ABLATION, "seeds": "4,5"})
    at.button(key="w:go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert any(message in e for e in errors), errors
    assert "exp" not in at.query_params


def test_bad_input_is_a_readable_message(cache):
    at = page(cache, closed_port_url(), None, **ABLATION)
    at.multiselect(key="w:seeds").set_value([]).run()
    assert any("Choose at least one seed" in w.value for w in at.warning)
    assert not [b for b in at.button if b.key == "w:go"]
    at.multiselect(key="w:seeds").set_value([0])
    at.multiselect(key="w:pos").set_value([]).run()
    assert any("Choose at least one position" in w.value for w in at.warning)
    at = page(cache, closed_port_url(), None, mode="Patch", pairing="typed", pairs="0:0")
    assert any("pairs a seed with itself" in w.value for w in at.warning)


def test_runs_page_shows_a_partial_builds_progress(cache, tmp_path):
    store = next(cache.glob("*.zarr"))
    shutil.copytree(store, tmp_path / store.name)
    done = zarr.open_group(str(tmp_path / store.name), mode="r+")["done"]
    done[4:] = False
    for chunk in (tmp_path / store.name / "done" / "c").iterdir():
        os.utime(chunk, (time.time() - 3600, time.time() - 3600))
    at = page(tmp_path, closed_port_url(), None, name="runs")
    texts = [p.proto.text for p in at.get("progress")]
    assert any("4 / 6 seeds" in t and "stopped" in t for t in texts), texts
    assert at.get("progress")[0].proto.value == 66
