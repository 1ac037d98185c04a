"""What every page shares: the run picker, selections kept in the URL, store handles,
CSV downloads and readable errors. Numbers come from `core.tables`; pages lay them out."""

import os
from dataclasses import dataclass, replace
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from core.leaderboard import SUBSETS
from core.logit_diff import Candidates, PairDiff, load_candidates
from core.store import MODEL_COLUMN, RunStore, StoreError
from core.tables import View, find_runs, pair_diff, subset_rows

SUBSET_LABELS = {"all": "all seeds", "model-better": "model better than a regressor",
                 "model-worse": "model worse than a regressor",
                 "model-low-error": "model's error at most its median (biased)"}


def cache_dir() -> Path:
    """The directory whose run stores the app lists: $WORKBENCH_CACHE, default `cache/`."""
    return Path(os.environ.get("WORKBENCH_CACHE", "cache"))


def param(key: str, default: str | None = None) -> str | None:
    """Returns a selection from the URL, else the session (pages share it), else `default`."""
    return st.query_params.get(key) or st.session_state.get(f"param:{key}") or default


def set_param(key: str, value: object) -> None:
    """Keeps a selection in the URL (a link reproduces the view) and in the session."""
    if value is None:
        st.query_params.pop(key, None)
        st.session_state.pop(f"param:{key}", None)
    else:
        st.query_params[key] = str(value)
        st.session_state[f"param:{key}"] = str(value)


def choose(label: str, key: str, options: list, default=None, sidebar: bool = True, **kw):
    """A selectbox whose choice lives in the URL under `key`."""
    options = list(options)
    wanted = param(key)
    names = [str(o) for o in options]
    index = names.index(wanted) if wanted in names else (options.index(default) if default in options else 0)
    where = st.sidebar if sidebar else st
    value = where.selectbox(label, options, index=index, key=f"w:{key}", **kw)
    set_param(key, value)
    return value


@st.cache_resource(show_spinner=False)
def open_store(path: str, mtime: float) -> RunStore:
    """A store handle, reopened when the store changes (`mtime` of its metadata)."""
    return RunStore.open(path)


@st.cache_resource(show_spinner=False)
def store_candidates(path: str, mtime: float, n_done: int) -> Candidates:
    """The store's candidates; read again once more seeds are finished (a build still running)."""
    return load_candidates(open_store(path, mtime))


@dataclass(frozen=True)
class Run:
    """The chosen run store, and the key its cached derivations are stored under."""

    store: RunStore
    key: tuple[str, float, int]  # path, metadata mtime, finished seeds


def _mtime(path: Path) -> float:
    meta = path / "zarr.json"
    return meta.stat().st_mtime if meta.exists() else 0.0


def header(title: str, what: str) -> None:
    st.title(title)
    st.caption(what)


def pick_run() -> Run:
    """The sidebar's run picker; stops the page with a readable message when no store can be used."""
    runs = find_runs(cache_dir())
    if not runs:
        st.info(f"No run store under `{cache_dir().resolve()}`. Build one with `make run`, or "
                "`python -m cache_builder build ...` (README), or set WORKBENCH_CACHE to the cache directory.")
        st.stop()
    names = [p.name.removesuffix(".zarr") for p in runs]
    wanted = param("run")
    if wanted:
        wanted = wanted.removesuffix(".zarr")
        set_param("run", wanted)
        if wanted not in names:
            st.warning(f"The link names run `{wanted}`, which is not under `{cache_dir()}`; showing another.")
    name = choose("Run", "run", names, sidebar=True)
    path = runs[names.index(name)]
    try:
        store = open_store(str(path), _mtime(path))
    except StoreError as exc:
        st.error(f"This run store cannot be read: {exc}")
        st.stop()
    if not store.done().any():
        st.warning("No seed of this run is finished yet: its build is still running or was stopped. "
                   "Run its build command again to resume it.")
        st.stop()
    return Run(store, (str(path), _mtime(path), int(store.done().sum())))


def run_candidates(run: Run) -> Candidates:
    return store_candidates(*run.key)


def pick_seed(store: RunStore) -> int:
    done = [s for s, d in zip(store.seeds, store.done()) if d]
    return int(choose("Seed", "seed", done))


def pick_subset(store: RunStore) -> View:
    """The sidebar's seed subset; returns the view with it (and its note shown)."""
    regressors = [c for c in store.columns if c != MODEL_COLUMN]
    kinds = [k for k in SUBSETS if regressors or k not in ("model-better", "model-worse")]
    subset = choose("Seeds", "subset", kinds, format_func=lambda s: SUBSET_LABELS[s])
    versus = None
    if subset in ("model-better", "model-worse"):
        versus = choose("… than", "versus", regressors, default="linear" if "linear" in regressors else None)
    else:
        set_param("versus", None)
    view = View(subset=subset, versus=versus)
    rows, note = subset_rows(store, view)
    (st.sidebar.warning if subset == "model-low-error" else st.sidebar.caption)(f"{note}: {len(rows)} seeds.")
    if not len(rows):
        st.warning("No seed is in this subset; choose another.")
        st.stop()
    return view


def pick_pair_diff(run: Run) -> tuple[View, PairDiff]:
    """The sidebar's seed subset and candidate pair; returns the view and the pair's logit
    difference over that subset (`core.tables.pair_diff`)."""
    cands = run_candidates(run)
    view = pick_subset(run.store)
    a = choose("Candidate A", "a", cands.names, default="truth")
    b = choose("Candidate B", "b", cands.names, default=MODEL_COLUMN)
    if a == b:
        st.warning("A and B are the same candidate: their difference is zero. Choose two.")
        st.stop()
    view = replace(view, a=a, b=b)
    return view, pair_diff(run.store, view, cands)


def download(table: pd.DataFrame, name: str, label: str = "CSV") -> None:
    """A CSV download of a chart's data."""
    st.download_button(f"Download {label}", table.to_csv(index=False).encode(), file_name=f"{name}.csv",
                       mime="text/csv", key=f"dl:{name}", on_click="ignore")


def chart(c: alt.Chart) -> None:
    st.altair_chart(c, width="stretch")
