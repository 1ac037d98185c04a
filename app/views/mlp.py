"""MLP: each layer's MLP contribution to a pair's logit difference, and MLP output norms."""

import altair as alt
import streamlit as st

from app.common import chart, download, header, pick_pair_diff, pick_run
from core.tables import mlp_table

header("MLP", "What each layer's MLP adds to logit(A) - logit(B), and how large its output is.")
run = pick_run()
store = run.store
view, diff = pick_pair_diff(run)
a, b = view.a, view.b
table = mlp_table(store, view, diff)
n_last = (st.slider("Last N layers in the heatmap", 1, len(table), min(8, len(table)), key="w:last_n")
          if len(table) > 1 else 1)
st.caption(f"Direct contribution of each MLP to the logit difference of **{a}** versus **{b}** at their first "
           f"differing answer token (as on the logit-difference page), over {int(table.logit_diff_n_seeds.max())} seeds.")

chart(alt.Chart(table).mark_bar().encode(
    x="layer:O", y=alt.Y("logit_diff_mean:Q", title="mean MLP contribution"),
    color=alt.condition(alt.datum.logit_diff_mean > 0, alt.value("#2563eb"), alt.value("#dc2626")),
    tooltip=["layer", "logit_diff_mean", "logit_diff_std", "logit_diff_n_seeds"]).properties(height=260))

st.subheader(f"The last {n_last} layers, per seed")
per_seed = diff.mlp[:, -n_last:]
long = [{"seed": int(s), "layer": int(len(table) - n_last + j), "contribution": float(v)}
        for s, row, ok in zip(diff.seeds, per_seed, diff.ok) if ok for j, v in enumerate(row)]
if long:
    chart(alt.Chart(alt.Data(values=long)).mark_rect().encode(
        x="layer:O", y="seed:O", color=alt.Color("contribution:Q", scale=alt.Scale(scheme="redblue", domainMid=0,
                                                                                  reverse=True)),
        tooltip=["seed:O", "layer:O", "contribution:Q"]).properties(height=max(200, 10 * len(diff.seeds))))
else:
    st.warning("No seed of this subset can be compared for this pair.")

st.subheader("MLP output norm")
norms = table.melt(id_vars="layer", value_vars=["norm_answer_slots", "norm_final"], var_name="position",
                   value_name="norm")
chart(alt.Chart(norms).mark_line(point=True).encode(x="layer:O", y=alt.Y("norm:Q", title="L2 norm"), color="position:N",
                                                     tooltip=["layer", "position", "norm"]).properties(height=260))
st.caption("norm_answer_slots: mean over the in-context answer slots; norm_final: the final position.")
with st.expander("The table behind these charts"):
    st.dataframe(table, hide_index=True)
download(table, f"mlp-{a}-vs-{b}", "MLP table")
