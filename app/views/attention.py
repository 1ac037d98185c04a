"""Attention: heads ranked by where the final position looks (answer values versus
feature values), previous-token and induction scores, and one seed's attention."""

from dataclasses import replace

import altair as alt
import circuitsvis as cv
import numpy as np
import streamlit as st
import streamlit.components.v1 as components
import torch

from app.common import choose, chart, download, header, pick_run, pick_seed, pick_subset
from core.heads import HEAD_SCORE_DOC
from core.tables import final_attention, head_scores_table

header("Attention", "Which heads read the in-context answers, which read the features, and which copy.")
store = pick_run().store
view = pick_subset(store)
scores = head_scores_table(store, view)
st.markdown("\n".join(f"- **{k}**: {v}" for k, v in HEAD_SCORE_DOC.items()))
st.caption("Means over the chosen seeds, from each seed's stored attention rows (`core.heads.head_scores`).")

left, right = st.columns(2)
with left:
    st.subheader("Answer values versus feature values")
    chart(alt.Chart(scores).mark_circle(size=60).encode(
        x=alt.X("feature_values:Q", title="attention to feature values"),
        y=alt.Y("answer_values:Q", title="attention to answer values"),
        color=alt.Color("layer:Q", scale=alt.Scale(scheme="viridis")),
        tooltip=["layer", "head", "answer_values", "feature_values", "previous_token", "induction"]).properties(height=340))
with right:
    st.subheader("Heads ranked by answer minus feature attention")
    st.dataframe(scores.head(20).style.format(precision=3), hide_index=True, height=340)
download(scores, "head-scores", "head scores")

st.subheader("Previous-token and induction scores")
long = scores.melt(id_vars=["layer", "head"], value_vars=["previous_token", "induction"], var_name="score")
chart(alt.Chart(long).mark_rect().encode(
    x="head:O", y="layer:O", color=alt.Color("value:Q", scale=alt.Scale(scheme="greens")),
    column=alt.Column("score:N", title=None), tooltip=["layer", "head", "score", "value"]
).properties(width=260, height=max(160, 12 * int(scores.layer.max() + 1))))

st.subheader("One seed: where the final position looks, per head")
if "attn_rows" not in store.acts_choice.arrays:
    st.info(f"This run holds no attention rows (built with `--acts {store.acts_choice.text()}`): the head scores "
            "above come from its summaries; rebuild with `--acts all` or `--acts attn_rows:final` to see one "
            "seed's attention here.")
    st.stop()
seed = pick_seed(store)
n_layers = store.attrs["model"]["n_layers"]
layer = int(choose("Layer (default: the top-ranked head's)", "layer", list(range(n_layers)),
                   default=int(scores.layer.iloc[0]), sidebar=False))
table = final_attention(store, replace(view, seed=seed, layer=layer))
texts = store.decode(store.tokens(store.index(seed)))
html = cv.tokens.colored_tokens_multi(texts, torch.tensor(table.to_numpy(dtype=np.float32)), labels=list(table.columns))
components.html(html.local_src, height=700, scrolling=True)
st.caption(f"CircuitsVis, rendered offline. Seed {seed}, layer {layer}: each head's attention from the final "
           "position over the prompt; pick a head to colour the tokens by it.")
download(table.reset_index(), f"attention-seed{seed}-layer{layer}", "attention")
