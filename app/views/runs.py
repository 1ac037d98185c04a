"""Runs: the run stores of the cache directory, and the chosen one's provenance and contents."""

import streamlit as st

from app.common import cache_dir, download, header, pick_run
from core.store import describe
from core.tables import runs_table

header("Runs", f"Every run store under `{cache_dir()}`: model x dataset x examples x prompt format, over seeds.")
table = runs_table(cache_dir())
if len(table):
    st.dataframe(table, hide_index=True)
    download(table, "runs")
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
