"""Logit difference by layer: the logit lens on the residual stream and each layer's,
MLP's and head's direct contribution, for a pair of candidate answers."""

import altair as alt
import numpy as np
import streamlit as st

from app.common import chart, download, header, pick_pair_diff, pick_run
from core.tables import component_summary, head_summary, lens_summary, lens_table, pair_status

header("Logit difference by layer", "logit(A) - logit(B) at the first answer token where A and B differ.")
run = pick_run()
view, diff = pick_pair_diff(run)
a, b = view.a, view.b
ok = diff.ok
st.info(
    f"**What is compared.** For each seed, with that seed's own answers: A = **{a}**, B = **{b}**, each written "
    "as the model would write it. Their tokens agree up to some step k (e.g. shared leading zeros); the model is "
    "fed the prompt and that shared prefix, and we read logit(A's token k) - logit(B's token k). "
    "Layer l of the lens applies the model's own final RMSNorm and unembedding to the residual stream before "
    f"layer l; the last layer ({diff.lens.shape[1] - 1}) is the model's real logits. Positive: the model prefers A. "
    "Components are direct contributions through the final norm's scale; they add up to the last layer's value.")
counts = {s: diff.status.count(s) for s in dict.fromkeys(diff.status)}
c1, c2, c3 = st.columns(3)
c1.metric("Seeds compared", f"{int(ok.sum())} / {len(ok)}", help=", ".join(f"{k}: {v}" for k, v in counts.items()))
c2.metric("Final logit difference (mean)", f"{np.nanmean(diff.lens[:, -1]):.3f}" if ok.any() else "n/a")
c3.metric("Whole-answer log p(A) - log p(B) (mean)",
          f"{np.nanmean(diff.answer_logprob):.3f}" if np.isfinite(diff.answer_logprob).any() else "n/a",
          help="sum of the log-probabilities of every answer token, teacher-forced, at the last layer")
if not ok.any():
    st.warning("No seed of this subset can be compared: " + ", ".join(f"{k} ({v})" for k, v in counts.items()))
    st.stop()
if len(counts) > 1:
    st.caption("Seeds not compared: " + ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "ok"))

st.subheader("Logit lens")
summary = lens_summary(diff)
per_seed = lens_table(diff).dropna(subset=["logit_diff"])
# The lens of the first layers can be tens of logits wide; the axis follows the quartiles
# and the mean so that the later layers stay readable (marks outside are clipped).
low = min(summary[["q25", "mean"]].min().min(), 0.0)
high = max(summary[["q75", "mean"]].max().max(), 0.0)
pad = 0.15 * (high - low or 1.0)
y = alt.Y("q25:Q", title="logit(A) - logit(B)", scale=alt.Scale(domain=[low - pad, high + pad]))
band = alt.Chart(summary).mark_area(opacity=0.25, clip=True).encode(x="layer:Q", y=y, y2="q75:Q")
line = alt.Chart(summary).mark_line(point=True, color="#1f77b4", clip=True).encode(
    x="layer:Q", y="mean:Q", tooltip=["layer", "mean", "std", "q25", "q75", "n_seeds"])
seeds = alt.Chart(per_seed).mark_line(opacity=0.12, color="gray", clip=True).encode(
    x="layer:Q", y="logit_diff:Q", detail="seed:N")
zero = alt.Chart(summary).mark_rule(color="black", strokeDash=[2, 2]).encode(y=alt.datum(0))
chart((seeds + band + line + zero).properties(height=320))
st.caption("Line: mean over seeds; band: quartiles; grey: each seed (the axis follows the quartiles; "
           "seeds beyond it are clipped, the CSV has every value).")
download(summary, f"logit-lens-{a}-vs-{b}", "lens (mean and spread)")
download(per_seed, f"logit-lens-per-seed-{a}-vs-{b}", "lens (per seed)")

st.subheader("Direct contribution of each layer's attention and MLP")
comps = component_summary(diff)
bars = comps[comps.component != "embed"]
bars = bars.assign(low=bars["mean"] - bars["std"], high=bars["mean"] + bars["std"])
base = alt.Chart(bars).encode(x=alt.X("layer:O"), xOffset="component:N")
chart((base.mark_bar().encode(y=alt.Y("mean:Q", title="mean (whiskers: 1 std)"),
                              color="component:N", tooltip=["component", "layer", "mean", "std", "n_seeds"])
       + base.mark_rule(color="#444").encode(y="low:Q", y2="high:Q")).properties(height=300))
st.caption(f"Embedding: {comps.loc[comps.component == 'embed', 'mean'].iloc[0]:.3f} on average.")
download(comps, f"components-{a}-vs-{b}", "components")

st.subheader("Direct contribution of each head")
heads = head_summary(diff)
chart(alt.Chart(heads).mark_rect().encode(
    x="head:O", y="layer:O", color=alt.Color("mean:Q", scale=alt.Scale(scheme="redblue", domainMid=0, reverse=True)),
    tooltip=["layer", "head", "mean", "std"]).properties(height=max(200, 14 * diff.heads.shape[1])))
download(heads, f"heads-{a}-vs-{b}", "heads")

with st.expander("Per seed: where A and B part, and the whole-answer log-probability difference"):
    status = pair_status(diff)
    st.dataframe(status, hide_index=True)
    download(status, f"pair-status-{a}-vs-{b}", "per-seed status")
