"""Interventions: ablate or patch the model's activations, or edit the prompt's in-context
data (`app.prompt_edits`), live, on an intervention server, and read the effect per site
and position, or per edit, with its bootstrap interval.

The app never loads a model: experiments go to the server at $WORKBENCH_SERVER
(`python -m cache_builder serve ...`), and finished ones are read from the results
store under the cache directory, so a link with `?exp=<hash>` reopens one without a server.
"""

import os

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from pydantic import ValidationError

from app import prompt_edits
from app.common import cache_dir, chart, choose, download, header, param, pick_run, set_param
from app.widgets import candidate_pair, check, integer, many, radio, text, unusable
from core.interventions import archive
from core.interventions.backend import fingerprint
from core.interventions.client import HttpBackend, ServerError
from core.interventions.plan import Plan, plan
from core.interventions.result import DENOMINATOR_MIN, Result
from core.interventions.spec import (SITE_KINDS, Ablation, ExperimentRequest, InterventionError, Patching,
                                     PromptEdit, content_hash)
from core.store import RunStore

DEFAULT_SERVER = "http://127.0.0.1:8765"
SITE_LABELS = {"resid_pre": "residual stream (before the layer)", "attn_out": "attention output",
               "mlp_out": "MLP output", "head": "one attention head's output"}
METHODS = {"zero": "zero: the activation set to 0 (off-distribution)",
           "mean": "mean: its mean over the run's finished seeds, same position",
           "resample": "resample: another seed's activation, same position"}
METRICS = {"normalized": "normalised effect", "logprob_diff": "log-probability difference (nats)",
           "logit_diff": "logit difference at the first differing token", "abs_error": "absolute error of the answer"}
EDIT_METRICS = {"shift": "shift of the answer (edited - unedited)", **METRICS}
MODES = {"Ablate": "Ablate", "Patch": "Patch", "Edit": "Edit the prompt"}
DIRECTIONS = {"denoising": "denoising: the corrupt prompt, the clean seed's activation patched in",
              "noising": "noising: the clean prompt, the corrupt seed's activation patched in"}
PAIRINGS = {"consecutive": "consecutive finished seeds", "typed": "typed"}
# The URL keys of the form: a link or a reopened experiment sets them, and their widgets restart from them.
FORM_KEYS = ("mode", "site", "every_layer", "layers", "every_head", "heads", "pos", "method", "seeds", "a", "b",
             "joint", "draws", "direction", "pairing", "npairs", "pairs", *prompt_edits.FORM_KEYS)
MAX_PIVOT_CELLS = 60
MAX_BARS = 60
# The before/after table's first columns: the unit, the answers clean and under the intervention, the metric.
BEFORE_AFTER = ["unit", "target_seed", "source_seed", "draw", "truth", "edited_truth", "clean_text", "clean_decoded",
                "decoded_text", "decoded", "shift", "abs_error", "changed_length", "m_clean", "m_corrupt",
                "logprob_diff", "normalized", "flagged"]


# --- the server ---------------------------------------------------------------------------------------------------

def server_url() -> str:
    return os.environ.get("WORKBENCH_SERVER", DEFAULT_SERVER).rstrip("/")


def server_token() -> str | None:
    """$WORKBENCH_TOKEN, else `WORKBENCH_TOKEN` of the app's secrets, else none."""
    if os.environ.get("WORKBENCH_TOKEN"):
        return os.environ["WORKBENCH_TOKEN"]
    try:
        return st.secrets.get("WORKBENCH_TOKEN")
    except Exception:  # no secrets file: st.secrets raises on any access
        return None


@st.cache_resource(show_spinner=False)
def backend(url: str, token: str | None, cache: str) -> HttpBackend:
    return HttpBackend(url, token, cache)


@st.cache_data(ttl=5, show_spinner=False)
def health(url: str, token: str | None, cache: str) -> dict:
    """The server's /health, at most 5 s old (a failure is not kept: the next run asks again)."""
    return backend(url, token, cache).health()


def start_hint(store: RunStore) -> str:
    return (f"Start one on this machine with `python -m cache_builder serve --model {store.attrs['model'].get('spec')} "
            f"--cache {cache_dir()}`, or set WORKBENCH_SERVER to the address of a running one (and WORKBENCH_TOKEN "
            "to its token).")


def _reset_positions() -> None:
    """Another mode or site kind: the positions go back to that one's default."""
    set_param("pos", None)
    st.session_state.pop("w:pos", None)


def _apply(request: ExperimentRequest, store: RunStore, finished: list[int]) -> bool:
    """Puts a saved experiment's settings into the form (URL and widgets); False when the
    form cannot show all of them (an experiment made elsewhere, e.g. several site kinds)."""
    exp = request.experiment.root
    for key in FORM_KEYS:
        set_param(key, None)
        st.session_state.pop(f"w:{key}", None)
    if isinstance(exp, PromptEdit):
        values, whole = prompt_edits.form_values(exp, int(store.attrs["dataset"]["n_examples"]))
        for key, value in {"mode": "Edit", **values}.items():
            set_param(key, value)
        return whole
    grid = exp.sites[0]
    values = {"site": grid.kind, "every_layer": "1" if grid.layers == "all" else "0", "pos": ",".join(exp.positions)}
    if grid.layers != "all":
        values["layers"] = ",".join(map(str, grid.layers))
    if grid.heads is not None:
        values["every_head"] = "1" if grid.heads == "all" else "0"
        if grid.heads != "all":
            values["heads"] = ",".join(map(str, grid.heads))
    whole = len(exp.sites) == 1
    if isinstance(exp, Ablation):
        values.update(mode="Ablate", method=exp.method, seeds=",".join(map(str, exp.seeds)), a=exp.pair[0],
                      b=exp.pair[1], joint="1" if exp.joint else "0", draws=str(exp.n_resamples))
        whole = whole and exp.resample_seed == 0
    else:
        pairs = [tuple(p) for p in exp.pairs]
        values.update(mode="Patch", direction=exp.direction)
        if pairs == consecutive_pairs(finished, len(pairs)):
            values.update(pairing="consecutive", npairs=str(len(pairs)))
        else:
            values.update(pairing="typed", pairs=", ".join(f"{c}:{r}" for c, r in pairs))
    for key, value in values.items():
        set_param(key, value)
    return whole


# --- the form ------------------------------------------------------------------------------------------------------

def consecutive_pairs(finished: list[int], n: int) -> list[tuple[int, int]]:
    """(s0, s1), (s2, s3), ...: n pairs of the finished seeds, in order."""
    return [(finished[2 * i], finished[2 * i + 1]) for i in range(min(n, len(finished) // 2))]


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """Parses `0:1, 2:3` (clean:corrupt); raises ValueError with a readable message."""
    pairs = []
    for part in text.replace(";", ",").split(","):
        if not part.strip():
            continue
        clean, sep, corrupt = part.partition(":")
        try:
            pair = int(clean), int(corrupt)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not clean:corrupt (two seeds, e.g. 0:1)") from None
        if pair[0] == pair[1]:
            raise ValueError(f"{part.strip()!r} pairs a seed with itself")
        pairs.append(pair)
    if not pairs:
        raise ValueError("no pair given; type e.g. 0:1, 2:3")
    return pairs


def position_names(n_examples: int, n_features: int) -> list[str]:
    return (["stored", "final", "all"] + [f"slot[{k}]" for k in range(n_examples)]
            + [f"y[{k}]" for k in range(n_examples)]
            + [f"x[{k}][{j}]" for k in range(n_examples + 1) for j in range(n_features)])


def form(store: RunStore, finished: list[int]) -> ExperimentRequest | None:
    """The experiment the widgets describe; None (with a message shown) when they describe none."""
    info, data = store.attrs["model"], store.attrs["dataset"]
    n_layers, n_heads = int(info["n_layers"]), int(info["n_heads"])
    mode = radio("Experiment", "mode", list(MODES), "Ablate", format_func=MODES.get, on_change=_reset_positions)
    if mode == "Edit":
        experiment = prompt_edits.form(store, finished)
        return None if experiment is None else _request(store, experiment)
    c1, c2 = st.columns(2)
    with c1:
        kind = choose("Site", "site", list(SITE_KINDS), sidebar=False, format_func=lambda k: f"{k}: {SITE_LABELS[k]}",
                      on_change=_reset_positions)
        top = n_layers if kind == "resid_pre" else n_layers - 1
        every_layer = check(f"Every layer (0-{top})", "every_layer", True)
        layers = "all" if every_layer else many("Layers", "layers", list(range(top + 1)), [0])
        heads = None
        if kind == "head":
            heads = "all" if check(f"Every head (0-{n_heads - 1})", "every_head", True) else many(
                "Heads", "heads", list(range(n_heads)), [0])
    with c2:
        default_pos = ["stored"] if mode == "Patch" and kind != "head" else ["final"]
        positions = many("Positions", "pos", position_names(data["n_examples"], data["n_features"]), default_pos,
                         help="final: the query's answer slot, where the answer is predicted; slot[k]: example k's "
                              "answer slot (the space after `Output:`); y[k]: example k's output value; x[k][j]: "
                              f"feature j of example k (k = {data['n_examples']}: the query); all: every token; "
                              "stored: one cell per stored position (every answer slot and the final one).")
    if kind == "resid_pre":
        st.caption(f"resid_pre layer l is the residual stream entering layer l; layer {n_layers} is after the last "
                   "layer, before the final norm.")

    if mode == "Ablate":
        c1, c2 = st.columns(2)
        with c1:
            method = radio("Method", "method", list(METHODS), "zero", format_func=lambda m: m)
            st.caption(METHODS[method] + (". Zero is off-distribution: the layers after it never see a zero "
                                          "activation, so its effect mixes what the site carries with damage."
                                          if method == "zero" else "."))
            draws = integer("Draws per seed", "draws", 3, 1, 32) if method == "resample" else 3
            joint = check("Together: every site at every position at once (one cell)", "joint", False)
        with c2:
            seeds = many("Seeds", "seeds", finished, finished[:8])
            a, b = candidate_pair(store)
            st.caption("Metric: log p(A) - log p(B) of the two whole answers, teacher-forced; normalised by its "
                       "clean value (1: no effect, 0: no preference left).")
        if unusable(seeds, (a, b)):
            return None
        experiment = dict(kind="ablation", method=method, seeds=seeds, pair=(a, b), joint=joint, n_resamples=draws)
    else:
        if len(finished) < 2:
            st.warning("Patching needs two finished seeds; this run has fewer.")
            return None
        c1, c2 = st.columns(2)
        with c1:
            direction = radio("Direction", "direction", list(DIRECTIONS), "denoising")
            st.caption(DIRECTIONS[direction] + ". Metric: log p(clean answer) - log p(corrupt answer), the model's "
                       "own clean answers; normalised effect (m - m_corrupt) / (m_clean - m_corrupt).")
        with c2:
            pairing = radio("Pairs (clean, corrupt)", "pairing", list(PAIRINGS), "consecutive",
                            format_func=PAIRINGS.get)
            if pairing == "consecutive":
                n = integer("Number of pairs", "npairs", min(8, len(finished) // 2), 1, len(finished) // 2)
                pairs = consecutive_pairs(finished, n)
            else:
                typed = text("Pairs, clean:corrupt", "pairs", ", ".join(f"{c}:{r}" for c, r in
                                                                        consecutive_pairs(finished, 8)))
                try:
                    pairs = parse_pairs(typed)
                except ValueError as exc:
                    st.warning(f"The pairs do not parse: {exc}.")
                    return None
            st.caption("Pairs: " + ", ".join(f"{c}->{r}" for c, r in pairs))
        experiment = dict(kind="patching", direction=direction, pairs=pairs)

    if not positions:
        st.warning("Choose at least one position.")
        return None
    if layers != "all" and not layers or heads is not None and heads != "all" and not heads:
        st.warning("Choose at least one layer" + (" and one head." if kind == "head" else "."))
        return None
    return _request(store, {**experiment, "sites": [{"kind": kind, "layers": layers, "heads": heads}],
                            "positions": positions})


def _request(store: RunStore, experiment: dict) -> ExperimentRequest | None:
    """The request of that experiment on this run; None (with the reason shown) when it is not valid."""
    try:
        return ExperimentRequest(run=store.name.removesuffix(".zarr"), experiment=experiment)
    except ValidationError as exc:
        first = exc.errors()[0]
        st.warning(f"This experiment is not valid: {'.'.join(map(str, first['loc']))}: {first['msg']}.")
        return None


# --- results -------------------------------------------------------------------------------------------------------

@st.cache_resource(show_spinner=False, max_entries=32)
def _saved(cache: str, run: str, hash_: str) -> Result:
    return archive.load(cache, run, hash_)


def saved_result(run: str, hash_: str | None) -> Result | None:
    """The results store's result of that hash (read once per session), or None."""
    if not hash_ or "/" in hash_ or ".." in hash_:
        return None
    if not (archive.result_dir(cache_dir(), run, hash_) / "result.json").exists():
        return st.session_state.get(f"iv:result:{hash_}")  # run on a server whose results store is elsewhere
    return _saved(str(cache_dir()), run, hash_)


@st.cache_data(show_spinner=False, max_entries=32)
def summary_of(hash_: str, _result: Result) -> pd.DataFrame:
    """The result's summary (bootstrap intervals), once per result."""
    return _result.summary()


def _scale(values: pd.Series, metric: str) -> alt.Scale:
    """Sequential for the absolute error; else diverging around 0 over a symmetric domain (at
    least -1..1 for the normalised effect), so that noise around 1 is not painted as contrast."""
    if metric == "abs_error":
        return alt.Scale(scheme="viridis")
    top = float(np.nanmax(np.abs(values))) if values.notna().any() else 1.0
    if metric == "normalized":
        top = max(top, 1.0)
    return alt.Scale(scheme="redblue", domain=[-top, top], reverse=True)


def _tooltip(metric: str) -> list:
    return ["label", alt.Tooltip(f"{metric}:Q", format=".3f", title="mean"),
            alt.Tooltip(f"{metric}_low:Q", format=".3f", title="CI low"),
            alt.Tooltip(f"{metric}_high:Q", format=".3f", title="CI high"), "n_units", "flagged"]


def heatmaps(summary: pd.DataFrame, metric: str) -> None:
    """Layer x position (residual, attention, MLP) or layer x head (heads, one panel per position)."""
    order = list(dict.fromkeys(summary.position))
    for kind in dict.fromkeys(summary.kind):
        if kind == "joint":
            continue
        part = summary[summary.kind == kind]
        n_layers = part.layer.nunique()
        x = (alt.X("head:O", axis=alt.Axis(labelAngle=0)) if kind == "head"
             else alt.X("position:N", sort=order, axis=alt.Axis(labelAngle=-45)))
        base = alt.Chart(part).encode(x=x, y=alt.Y("layer:O", sort="descending"), tooltip=_tooltip(metric))
        # Grey under every cell: a cell without a value (NaN: every unit flagged) shows as grey, not as a gap.
        c = (base.mark_rect(color="#e5e7eb")
             + base.mark_rect().encode(color=alt.Color(f"{metric}:Q", scale=_scale(part[metric], metric),
                                                       title=metric))
             ).properties(height=max(200, 24 * n_layers + 70))
        if kind == "head" and part.position.nunique() > 1:
            c = c.facet(column=alt.Column("position:N", sort=order))
        st.markdown(f"**{kind}**: {SITE_LABELS.get(kind, kind)}, layer x {'head' if kind == 'head' else 'position'}")
        chart(c)


def bars(summary: pd.DataFrame, metric: str, metrics: dict[str, str]) -> None:
    """One bar per cell with its 95% interval (the MAX_BARS cells of largest |mean| when there are more)."""
    if len(summary) > MAX_BARS:
        st.caption(f"The {MAX_BARS} of {len(summary)} cells with the largest |mean|, in grid order.")
        summary = summary.loc[sorted(summary[metric].abs().nlargest(MAX_BARS).index)]
    base = alt.Chart(summary).encode(x=alt.X("label:N", sort=None, title=None,
                                             axis=alt.Axis(labelAngle=-60, labelLimit=260)))
    chart((base.mark_bar().encode(y=alt.Y(f"{metric}:Q", title=metrics[metric]), tooltip=_tooltip(metric))
           + base.mark_rule(color="black").encode(y=f"{metric}_low:Q", y2=f"{metric}_high:Q"))
          .properties(height=320))


def before_after(result: Result, store: RunStore, frame: pd.DataFrame, cell: int) -> pd.DataFrame:
    """Per unit: the clean answers and m_clean (baselines) beside the cell's answer and metrics."""
    base = result.baseline_frame()
    rows = frame[frame.cell == cell].drop(columns=["cell", "cell_label"])
    rows = rows.drop(columns=[c for c in rows.columns if c in base.columns and c != "unit"])
    table = base.merge(rows, on="unit", how="right")
    if "truth" not in table and "target_seed" in table:
        y_true = store.y_true()
        table.insert(1, "truth", [float(y_true[store.index(int(s))]) if int(s) in store.seeds else float("nan")
                                  for s in table.target_seed])
    first = [c for c in BEFORE_AFTER if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]]


def show(result: Result, store: RunStore) -> None:
    exp = result.request.experiment.root
    prov = result.provenance
    st.subheader(f"Result `{result.hash}`")
    units = _n(len(result.baselines.get("unit", [])), "pair" if isinstance(exp, Patching) else "seed")
    edit = isinstance(exp, PromptEdit)
    how = getattr(exp, "method", None) or getattr(exp, "direction", None) or ", ".join(dict.fromkeys(
        e.op for e in exp.edits))
    st.caption(f"{exp.kind}, {how}: {_n(len(result.cells), 'cell')} on {units}; finished {prov.get('finished', '?')} "
               f"on {prov.get('device', '?')}" + (f" in {prov['seconds']:.1f} s" if prov.get("seconds") else "") + ".")
    for note in result.notes:
        if "m_clean - m_corrupt" not in note:  # the flagged rows: counted below
            st.info(note)
    if isinstance(exp, Ablation) and exp.method == "zero" and not any("off-distribution" in n for n in result.notes):
        st.info("Zero ablation is off-distribution: part of its effect is the damage a zero does downstream, not "
                "only what the site carries. Mean or resample ablation keep the activation on-distribution.")

    metrics = EDIT_METRICS if edit else METRICS
    frame = result.frame()
    with st.spinner("Bootstrap intervals (once per result)..."):
        summary = summary_of(result.hash, result)
    if edit:
        prompt_edits.shifts(result, summary)
        prompt_edits.query_curve(result, store, frame)
        prompt_edits.prompt_view(result, store)
    metric = choose("Metric", "metric", list(metrics), sidebar=False, format_func=metrics.get)
    flagged = int(summary.flagged.sum())
    if flagged:
        st.warning(f"{flagged} of {len(result.table['cell'])} rows have |m_clean - m_corrupt| < {DENOMINATOR_MIN:g} "
                   "nats: their normalised effect is NaN (never divided by a near-zero denominator) and left out of "
                   "the normalised means" + ("; grey cells have no unit left" if summary.normalized.isna().any()
                                             else "") + ".")
    if summary[metric].isna().all():
        st.warning(f"No cell has a value of {metric}: every row is NaN (see the notes above and the rows below; "
                   "e.g. answers that are no number, or candidates that do not differ).")
    if not edit:
        st.caption("Colour: the mean over units; hover for its 95% bootstrap interval (units resampled), the number "
                   "of units with a value, and the flagged rows.")
        heatmaps(summary, metric)
    if not isinstance(exp, Patching):
        st.markdown(f"**Per {'edit' if edit else 'cell'}**: {metrics[metric]}, mean and 95% interval")
        bars(summary, metric, metrics)
    with st.expander("The summary behind these charts"):
        st.dataframe(summary, hide_index=True)
    download(summary, f"interventions-{result.hash}-summary", "summary")

    st.subheader("Decoded answers before and after")
    means = summary[metric].abs()
    strongest = int(summary.cell[means.idxmax()]) if means.notna().any() else 0
    labels = {int(c): label for c, label in zip(summary.cell, summary.label)}
    cell = choose("Cell", "cell", list(labels), default=strongest, sidebar=False,
                  format_func=lambda c: labels[c], help="default: the cell of the largest |mean| of the metric")
    table = before_after(result, store, frame, int(cell))
    st.caption("Per unit: the clean run (m_clean, the clean greedy answers) and under the intervention "
               "(decoded_text, decoded, the metrics).")
    st.dataframe(table, hide_index=True)
    download(table, f"interventions-{result.hash}-cell{cell}", "this cell's rows")

    st.subheader(f"Per unit: {metrics[metric]}")
    per_unit = frame.groupby(["unit", "cell"], sort=False)[metric].mean().reset_index()
    if len(result.cells) <= MAX_PIVOT_CELLS:
        pivot = per_unit.pivot(index="unit", columns="cell", values=metric)
        pivot = pivot.loc[list(dict.fromkeys(per_unit.unit)), [c for c in summary.cell if c in pivot.columns]]
        pivot.columns = [labels[c] for c in pivot.columns]
        st.dataframe(pivot.reset_index(), hide_index=True)
    else:
        st.caption(f"{len(result.cells)} cells: one row per unit and cell (resample draws averaged).")
        per_unit.insert(2, "label", [labels[c] for c in per_unit.cell])
        st.dataframe(per_unit, hide_index=True)
    with st.expander("Every row"):
        st.dataframe(frame, hide_index=True)
    download(frame, f"interventions-{result.hash}-rows", "every row")
    with st.expander("Experiment and provenance"):
        st.json({"request": result.request.model_dump(mode="json"), "provenance": prov})


def earlier(run: str, exp: str | None) -> None:
    """The run's finished experiments, newest first; choosing one reopens it."""
    rows = archive.list_results(cache_dir(), run)
    with st.expander(f"This run's experiments ({len(rows)})", expanded=not exp and bool(rows)):
        if not rows:
            st.caption(f"None yet under `{archive.result_dir(cache_dir(), run, '')}`.")
            return
        table = pd.DataFrame(rows)
        st.dataframe(table, hide_index=True)
        hashes = table.hash.tolist()
        key = f"w:reopen:{exp}"
        st.selectbox("Reopen", hashes, index=hashes.index(exp) if exp in hashes else None, key=key,
                     placeholder="choose an experiment",
                     format_func=lambda h: "{hash}: {kind} {method}, {cells} cells, {units} units, {finished}".format(
                         **rows[hashes.index(h)]), on_change=_reopen, args=(key,))


def _reopen(key: str) -> None:
    if st.session_state.get(key):
        set_param("exp", st.session_state[key])
        st.session_state.pop("iv:applied", None)


# --- the page ------------------------------------------------------------------------------------------------------

def _n(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def cost(store: RunStore, request: ExperimentRequest, served: dict | None) -> Plan | None:
    """Shows what the experiment costs; None (with the reason shown) when it cannot run."""
    try:
        p = plan(store, request, store.attrs["model"])
    except InterventionError as exc:
        st.error(f"This experiment cannot run: {exc}")
        return None
    per = served.get("clean_forward_s") if served else None
    seconds = f", about {p.clean_forwards * per:.1f} s on this server" if per else ""
    draws = len(p.rows) // max(len(p.cells) * len(p.units), 1)
    st.markdown(f"**Cost**: {len(p.rows)} rows ({_n(len(p.cells), 'cell')} x {_n(len(p.units), 'unit')}"
                f"{' x ' + _n(draws, 'draw') if draws > 1 else ''}), about "
                f"{p.clean_forwards:.1f} clean forward passes{seconds}.")
    if served and not per:
        st.caption("The server has timed no ablation or patching job yet: the time per forward pass is known after "
                   "its first.")
    return p


def server_line(store: RunStore) -> tuple[dict | None, bool]:
    """Shows the server's state; returns its /health (None: no answer) and whether it can
    run this run's experiments (an unreachable server may be started meanwhile: True)."""
    url, token = server_url(), server_token()
    try:
        h = health(url, token, str(cache_dir()))
    except ServerError as exc:
        st.warning(f"{str(exc)[:1].upper()}{str(exc)[1:]}. Saved results still open. " + start_hint(store))
        return None, True
    served = h.get("model") or {}
    want = fingerprint(store.attrs["model"])
    if served.get("config_hash") and served["config_hash"] != want["config_hash"]:
        st.error(f"The server at {url} serves {served.get('name')!r}, not this run's model {want['name']!r}: it "
                 "cannot run this run's experiments. " + start_hint(store))
        return h, False
    state = "busy" if h.get("busy") else "idle"
    st.caption(f"Server {url}: {served.get('name') or served.get('spec')} ({served.get('dtype')} on "
               f"{served.get('device')}), {state}, {h.get('queued', 0)} queued.")
    return h, True


def run_on_server(store: RunStore, request: ExperimentRequest) -> Result | None:
    """Runs the experiment on the server with its progress; None (with a readable error) when it fails."""
    client = backend(server_url(), server_token(), str(cache_dir()))
    problem = None
    with st.status("Sending the experiment to the server...", expanded=True) as status:
        bar = st.progress(0.0, text="queued")

        def progress(fraction: float, stage: str) -> None:
            bar.progress(min(max(float(fraction or 0.0), 0.0), 1.0), text=stage or "running")
            status.update(label=f"Running on {server_url()}: {stage or 'running'}")

        try:
            result = client.run(request, progress=progress)
        except ServerError as exc:
            problem = f"The experiment did not run: {exc}"
            try:
                health.clear()
                health(server_url(), server_token(), str(cache_dir()))
            except ServerError:
                problem += ". " + start_hint(store)
        except InterventionError as exc:
            problem = f"The experiment cannot run: {exc}"
        if problem:
            status.update(label="The experiment did not run", state="error", expanded=False)
        else:
            status.update(label=f"Done: result {result.hash}", state="complete", expanded=False)
    if problem:
        st.error(problem)
        return None
    return result


header("Interventions", "Ablate or patch the model's activations at chosen sites and positions, or edit the prompt's "
       "in-context data, live, on an intervention server; the effect per cell with its 95% bootstrap interval over "
       "seeds or pairs.")
run = pick_run()
store = run.store
name = store.name.removesuffix(".zarr")
finished = [int(s) for s, d in zip(store.seeds, store.done()) if d]
if st.session_state.get("iv:run", name) != name:  # another run: the experiment shown was the other's
    set_param("exp", None)
st.session_state["iv:run"] = name

exp = param("exp")
if exp and st.session_state.get("iv:applied") != (name, exp):
    reopened = saved_result(name, exp)
    if reopened is None:
        st.warning(f"The link names experiment `{exp}`, which is not in this run's results store "
                   f"(`{archive.result_dir(cache_dir(), name, exp)}`); set up the experiment below instead.")
        set_param("exp", None)
        exp = None
    else:
        st.session_state["iv:whole"] = _apply(reopened.request, store, finished)
        st.session_state["iv:form"] = None  # the form it gives, once drawn below
    st.session_state["iv:applied"] = (name, exp)
if st.session_state.pop("iv:message", None):
    st.success(f"Finished and saved: result `{exp}`.")

earlier(name, exp)
st.subheader("Experiment")
request = form(store, finished)
shown = None
if request is not None:
    dump = request.model_dump(mode="json")
    if st.session_state.get("iv:form", "unset") is None:
        st.session_state["iv:form"] = dump
    reopened = saved_result(name, exp)
    if reopened is not None and st.session_state.get("iv:form") == dump:
        shown = reopened  # the experiment of the link, or the last one run, while the form is as it left it
        if not st.session_state.get("iv:whole", True):
            st.info("This experiment was set up outside this page (e.g. several site kinds or another resample "
                    "seed): the form above shows only part of it.")
    else:
        hash_ = content_hash(request)
        shown = saved_result(name, hash_)
        set_param("exp", hash_ if shown is not None else None)
        st.session_state.update({"iv:applied": (name, hash_ if shown is not None else None), "iv:form": dump,
                                 "iv:whole": True})
    served, usable = server_line(store)
    p = cost(store, request, served if usable else None)
    if shown is not None:
        st.caption(f"Already run: result `{shown.hash}` from the results store (no server needed).")
    elif p is not None and usable and st.button("Run on the server", type="primary", key="w:go"):
        result = run_on_server(store, request)
        if result is not None:
            st.session_state[f"iv:result:{result.hash}"] = result
            set_param("exp", result.hash)
            st.session_state.update({"iv:applied": (name, result.hash), "iv:form": dump, "iv:whole": True,
                                     "iv:message": True})
            st.rerun()
elif exp:
    shown = saved_result(name, exp)
if shown is not None:
    show(shown, store)
