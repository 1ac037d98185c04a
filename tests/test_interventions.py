"""The interventions core: specs, plans, positions, metrics, the results store and the
clean captures, checked against independent computations on a tiny real store."""

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cache_builder.build import BuildSpec, build
from core.interventions import archive
from core.interventions.executor import clean_runs, execute
from core.interventions.metrics import bootstrap_ci, normalized_effect
from core.interventions.plan import plan
from core.interventions.positions import Spans, expand
from core.interventions.result import DENOMINATOR_MIN, Result
from core.interventions.spec import ExperimentRequest, InterventionError, content_hash
from core.store import RunStore


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("icache")
    build(BuildSpec("tiny-random-llama", "friedman2", 4, list(range(5)), regressors=["linear", "mean"],
                    batch_size=5), out, progress=False)
    build(BuildSpec("tiny-random-llama", "linear-ni22", 3, list(range(4)), prompt_format="natural",
                    regressors=["mean"], batch_size=4), out, progress=False)
    return out


@pytest.fixture(scope="module")
def store(cache):
    return RunStore.open(next(cache.glob("*friedman2*.zarr")))


def request(store, **experiment) -> ExperimentRequest:
    return ExperimentRequest.model_validate({"run": store.name.removesuffix(".zarr"), "experiment": experiment})


ABLATION = {"kind": "ablation", "method": "zero", "sites": [{"kind": "resid_pre", "layers": [1]}],
            "positions": ["final"], "seeds": [0, 1], "pair": ["truth", "linear"], "decode": False}


def test_specs_are_strict_data_with_a_stable_hash(store):
    with pytest.raises(ValidationError, match="extra"):
        request(store, **ABLATION, shell="rm -rf /")
    with pytest.raises(ValidationError):
        request(store, **{**ABLATION, "method": "scramble"})
    a = request(store, **ABLATION)
    b = ExperimentRequest.model_validate_json(json.dumps(json.loads(a.model_dump_json()), sort_keys=True))
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash(request(store, **{**ABLATION, "seeds": [0, 2]}))


@pytest.mark.parametrize("change,message", [
    ({"sites": [{"kind": "resid_pre", "layers": [3]}]}, "resid_pre layer 3 is out of range: the model has resid_pre layers 0-2"),
    ({"sites": [{"kind": "mlp_out", "layers": [2]}]}, "mlp_out layer 2 is out of range"),
    ({"sites": [{"kind": "head", "layers": [0], "heads": [4]}]}, "head 4 is out of range: the model has heads 0-3"),
    ({"sites": [{"kind": "attn_out", "heads": [0]}]}, "only kind head has heads"),
    ({"sites": [{"kind": "head", "layers": [0]}]}, "site kind head needs heads"),
    ({"seeds": [0, 17]}, "seed 17 is not in run"),
    ({"positions": ["y[4]"]}, "output values are y[0]-y[3]"),
    ({"positions": ["x[1][7]"]}, "x[k][j] needs k <= 4 and j < 4"),
    ({"positions": ["query"]}, "does not parse"),
    ({"pair": ["truth", "xgboost"]}, "no candidate 'xgboost'"),
    ({"pair": ["truth", "truth"]}, "names one candidate twice"),
])
def test_plan_refuses_what_cannot_run_in_one_line(store, change, message):
    with pytest.raises(InterventionError) as err:
        plan(store, request(store, **{**ABLATION, **change}), store.attrs["model"])
    assert message in str(err.value) and "\n" not in str(err.value)


EDIT = {"kind": "edit", "edits": [{"op": "perturb-y", "example": 1, "value": 0.5}], "seeds": [0, 1]}


@pytest.mark.parametrize("edits,extra,message", [
    ([{"op": "drop", "example": 4}], {}, "drop: example 4 is out of range: the run has examples 0-3"),
    ([{"op": "scale-feature", "feature": 4, "value": 2}], {}, "feature 4 is out of range: the run has features 0-3"),
    ([{"op": "query", "x": [0.5]}], {}, "query: x has 1 values; the run's examples have 4 features"),
    ([{"op": "prefix", "k": 0}], {}, "prefix: k = 0 is out of range: keep 1-4 examples"),
    (EDIT["edits"], {"regressors": ["linear", "xgboost"]}, "unknown regressor 'xgboost'"),
    (EDIT["edits"], {"pair": ["model", "xgboost"]}, "no candidate 'xgboost'"),
    (EDIT["edits"], {"seeds": [9]}, "seed 9 is not in run"),
])
def test_prompt_edits_that_do_not_fit_the_run_are_refused_in_one_line(store, edits, extra, message):
    with pytest.raises(InterventionError) as err:
        plan(store, request(store, **{**EDIT, "edits": edits, **extra}), store.attrs["model"])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("edit,message", [
    ({"op": "drop"}, "edit drop needs example"), ({"op": "shift-y", "example": 1, "value": 2}, "takes no example"),
    ({"op": "scale-x", "value": 0}, "a factor of 0"), ({"op": "query", "x": [float("nan")] * 4}, "must be finite"),
    ({"op": "rotate"}, "perturb-y"),
])
def test_an_edit_names_exactly_what_its_op_reads(store, edit, message):
    with pytest.raises(ValidationError, match=message):
        request(store, **{**EDIT, "edits": [edit]})


def test_edits_plan_one_row_per_edit_and_seed_and_the_runs_regressors(store):
    p = plan(store, request(store, **{**EDIT, "edits": [*EDIT["edits"], {"op": "permute"}]}), store.attrs["model"])
    assert [(r.cell, r.unit) for r in p.rows] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert p.regressors == ["linear", "mean"] and [u.label for u in p.units] == ["seed 0", "seed 1"]


def test_patching_a_natural_run_with_unequal_lengths_is_refused(cache):
    natural = RunStore.open(next(cache.glob("*natural*.zarr")))
    assert len(set(natural.root["positions/n_tokens"][:].tolist())) > 1
    exp = {"kind": "patching", "sites": [{"kind": "resid_pre", "layers": [0]}], "positions": ["final"],
           "pairs": [[0, 1]]}
    with pytest.raises(InterventionError, match="needs every seed at the same token positions"):
        plan(natural, request(natural, **exp), natural.attrs["model"])
    # Zero ablation needs no other seed: it runs on a natural run, each seed at its own positions.
    ok = plan(natural, request(natural, **{**ABLATION, "pair": ["truth", "mean"]}), natural.attrs["model"])
    assert ok.n_rows == 2


def test_grid_expansion_and_cost(store):
    p = plan(store, request(store, kind="patching", sites=[{"kind": "resid_pre"}, {"kind": "head", "layers": [1],
                                                                                 "heads": "all"}],
                            positions=["stored"], pairs=[[0, 1], [2, 3]]), store.attrs["model"])
    assert len(p.cells) == (3 + 4) * 5 and p.n_rows == 2 * len(p.cells)
    assert [c.positions[0] for c in p.cells[:5]] == expand(["stored"], 4) == ["slot[0]", "slot[1]", "slot[2]",
                                                                               "slot[3]", "final"]
    # Cost: sum over rows of (L - l)/L x (T - p)/T, plus one clean forward per prompt.
    t = p.n_tokens
    slots = store.root["positions/answer_slots"][0]
    expected = 2 * sum((2 - min(l, 2)) / 2 * (t - slots[k]) / t for l in (0, 1, 2) for k in range(5))
    expected += 2 * sum((2 - 1) / 2 * (t - slots[k]) / t for k in range(5)) * 4
    assert p.clean_forwards == pytest.approx(expected + 4)


def test_named_positions_cover_the_values_the_prompt_shows(store, tokenizer):
    spans = Spans(store)
    for row in range(3):
        tokens = store.tokens(row)
        text = lambda name: tokenizer.decode(tokens[spans.resolve(row, name)])  # noqa: E731
        assert float(text("y[2]")) == store.array("y_train")[row, 2]
        assert float(text("x[1][3]")) == store.array("x_train")[row, 1, 3]
        assert float(text("x[4][0]")) == store.array("x_query")[row, 0]
        assert text("slot[1]") == " " and spans.resolve(row, "final")[0] == len(tokens) - 1
        assert len(spans.resolve(row, "all")) == len(tokens)


def test_normalized_effect_flags_near_zero_denominators():
    m = np.array([1.0, 2.0, 0.5, 3.0])
    clean = np.array([2.0, 2.0, 1.0, np.nan])
    corrupt = np.array([0.0, 2.0 - DENOMINATOR_MIN / 2, 0.0, 0.0])
    norm, flagged = normalized_effect(m, clean, corrupt)
    assert flagged.tolist() == [False, True, False, True]
    np.testing.assert_allclose(norm[[0, 2]], [0.5, 0.5])
    assert np.isnan(norm[[1, 3]]).all()


def test_bootstrap_interval_against_numpy():
    v = np.array([0.1, 0.4, np.nan, 0.3, 0.9, 0.2])
    mean, low, high = bootstrap_ci(v, n_boot=4000, seed=3)
    finite = v[np.isfinite(v)]
    assert mean == pytest.approx(finite.mean())
    rng = np.random.default_rng(3)
    boots = finite[rng.integers(0, len(finite), (4000, len(finite)))].mean(1)
    assert (low, high) == pytest.approx((np.quantile(boots, 0.025), np.quantile(boots, 0.975)))
    assert bootstrap_ci(np.array([np.nan])) == (pytest.approx(np.nan, nan_ok=True),) * 3


def test_clean_captures_equal_the_stored_activations(store, tiny):
    rows = list(range(len(store.seeds)))
    at = store.act_positions(0)
    runs = clean_runs(tiny, [store.tokens(r) for r in rows], [None] * len(rows), at,
                      {"resid_pre", "attn_out", "mlp_out"})
    for r, run in zip(rows, runs):
        for layer in range(3):
            np.testing.assert_allclose(run.vals["resid_pre"][layer].numpy(), store.resid(r, layer), atol=2e-3, rtol=2e-3)
        for layer in range(2):
            np.testing.assert_allclose(run.vals["attn_out"][layer].numpy(), store.attn_out(r, layer), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(run.vals["mlp_out"][layer].numpy(), store.mlp_out(r, layer), atol=2e-3, rtol=2e-3)


def test_results_store_round_trip_and_no_half_result(store, cache, tiny, monkeypatch):
    req = request(store, **ABLATION)
    result = execute(tiny, store, req)
    assert result.hash == content_hash(req) and len(result.table["cell"]) == 2
    path = archive.save(result, cache)
    again = archive.load(cache, req.run, result.hash)
    assert again is not None and again.model_dump_json() == Result.model_validate_json(
        result.model_dump_json()).model_dump_json()
    listed = archive.list_results(cache, req.run)
    assert [r["hash"] for r in listed] == [result.hash] and listed[0]["kind"] == "ablation"
    assert not (path.parent.parent.parent / store.name / "experiments").exists()  # never inside the run store
    # A job killed while writing leaves no directory that looks finished.
    other = request(store, **{**ABLATION, "seeds": [2]})
    res2 = execute(tiny, store, other)

    def killed(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(Result, "summary", killed)
    with pytest.raises(OSError):
        archive.save(res2, cache)
    assert archive.load(cache, other.run, res2.hash) is None
    assert [p.name for p in archive.result_dir(cache, other.run, "x").parent.iterdir()] == [result.hash]


def test_out_of_memory_retries_with_half_the_rows_then_fails_alone(store, tiny, monkeypatch):
    from core.interventions import executor

    exp = {"kind": "patching", "answers": "truth", "decode": False, "sites": [{"kind": "head", "heads": "all"}],
           "positions": ["final"], "pairs": [[0, 1], [2, 3]]}
    reference = execute(tiny, store, request(store, **exp))
    real = executor.run_chunk
    sizes = []

    def limited(model, jobs, *args):  # a simulated allocation limit: at most 3 rows at once
        sizes.append(len(jobs))
        if len(jobs) > 3:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(model, jobs, *args)

    monkeypatch.setattr(executor, "run_chunk", limited)
    halved = execute(tiny, store, request(store, **exp))
    assert max(sizes) > 3 and any(n <= 3 for n in sizes)
    np.testing.assert_allclose(halved.table["logprob_diff"], reference.table["logprob_diff"], atol=1e-5)

    def always(model, jobs, *args):
        raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    monkeypatch.setattr(executor, "run_chunk", always)
    with pytest.raises(torch.OutOfMemoryError):
        execute(tiny, store, request(store, **{**exp, "pairs": [[1, 2]]}))


@pytest.mark.parametrize("exp", [
    {"kind": "patching", "answers": "truth", "decode": True, "sites": [{"kind": "head", "layers": [1], "heads": "all"},
                                                                      {"kind": "resid_pre", "layers": [1]}],
     "positions": ["final", "y[2]"], "pairs": [[0, 1], [2, 3], [1, 4]]},
    {"kind": "ablation", "method": "resample", "n_resamples": 2, "pair": ["truth", "linear"], "decode": False,
     "sites": [{"kind": "mlp_out", "layers": [0]}], "positions": ["x[4][1]"], "seeds": [0, 1, 2]},
])
def test_units_in_groups_of_bounded_memory_give_the_same_result(store, tiny, monkeypatch, exp):
    from core.interventions import executor

    whole = execute(tiny, store, request(store, **exp))
    monkeypatch.setattr(executor, "CLEAN_KV_BYTES", 1)  # one unit per group
    monkeypatch.setattr(executor, "CLEAN_BATCH", {"cpu": 1})
    grouped = execute(tiny, store, request(store, **exp))
    for column in ("logprob_diff", "logit_diff"):
        np.testing.assert_allclose(grouped.table[column], whole.table[column], atol=1e-5, err_msg=column)
    # A ratio of differences: float32 noise of other batch shapes, divided by m_clean - m_corrupt.
    np.testing.assert_allclose(grouped.table["normalized"], whole.table["normalized"], atol=1e-4)
    assert grouped.table["decoded_text"] == whole.table["decoded_text"]
    assert grouped.baselines["m_clean"] == pytest.approx(whole.baselines["m_clean"], abs=1e-5)
