"""Runs: the run stores of the cache directory, and the chosen one's provenance and contents."""

import time
from pathlib import Path

import streamlit as st

from app.common import cache_dir, download, header, pick_run
from core.store import describe
from core.tables import runs_table

# A build writes `done[seed]` last for each seed: when none was written for this long, and
# for ten times its pace per seed, the build is taken to have stopped.
STOPPED_AFTER_S = 300


def build_state(path: Path) -> str:
    """Whether a partial store's build looks alive: the age of its last finished seed."""
    try:
        times = [e.stat().st_mtime for e in (path / "done" / "c").iterdir()]
    except OSError:
        times = []
    if not times:
        return "no seed is finished yet: the build is starting, or was stopped before its first seed"
    age = time.time() - max(times)
    pace = (max(times) - min(times)) / max(len(times) - 1, 1)
    ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h"
    if age < max(STOPPED_AFTER_S, 10 * pace):
        return f"the build is still running (last seed finished {ago} ago)"
    return f"the build has stopped (last seed finished {ago} ago); run its build command again to resume it"


def build_progress(table) -> None:
    """A progress bar per partial store: seeds done / seeds, and whether its build is still running."""
    if "seeds" not in table:
        return
    for row in table[table.seeds_done < table.seeds].dropna(subset=["seeds"]).itertuples():
        done, total = int(row.seeds_done), int(row.seeds)
        st.progress(done / total, text=f"`{row.run}`: {done} / {total} seeds; "
                                       f"{build_state(cache_dir() / row.run)}")


header("Runs", f"Every run store under `{cache_dir()}`: model x dataset x examples x prompt format, over seeds.")
table = runs_table(cache_dir())
if len(table):
    st.dataframe(table, hide_index=True)
    download(table, "runs")
    build_progress(table)
run = pick_run()
store = run.store
a = store.attrs
st.subheader(store.name)
model, data, prompt, build = a["model"], a["dataset"], a["prompt"], a["build"]
c1, c2, c3, c4 = st.columns(4)
c1.metric("Model", model.get("spec"), help=model.get("name"))
c2.metric("Dataset", data["name"], help=data.get("description"))
c3.metric("In-context examples", data["n_examples"])
c4.metric("Seeds done", f"{int(store.done().sum())} / {len(store.seeds)}")
st.markdown(f"**Prompt**: {prompt['format']} number format, {prompt['n_tokens']} tokens. "
            f"**Model**: {model.get('n_layers')} layers, d_model {model.get('d_model')}, "
            f"{model.get('n_heads')} heads ({model.get('n_kv_heads')} KV), {model.get('dtype')}, "
            f"TransformerLens compatibility mode: {model.get('compatibility_mode')}. "
            f"**Built** {build.get('started')} to {build.get('finished') or 'unfinished'} on {build.get('device')}.")
with st.expander("Provenance and contents (`python -m cache_builder info`)"):
    st.code(describe(store), language=None)
with st.expander("Regressors"):
    st.dataframe([{"regressor": k, "description": v} for k, v in a.get("regressor_descriptions", {}).items()],
                 hide_index=True)
