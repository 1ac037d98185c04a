"""Probes: what a linear read-out of the residual stream at the final position recovers."""

import altair as alt
import pandas as pd
import streamlit as st

from app.common import chart, download, header, open_store, pick_run, pick_subset
from core.probes import N_FOLDS, RELATIVE_ALPHAS
from core.tables import View, probe_table

header("Probes", "Ridge probes from the residual stream at the final position, per layer.")
run = pick_run()
store = run.store
view = pick_subset(store)


@st.cache_data(show_spinner=False)
def probes(key: tuple[str, float, int], subset: str, versus: str | None) -> pd.DataFrame:
    """The probe table, once per run state and subset (`core.tables.probe_table`)."""
    return probe_table(open_store(*key[:2]), View(subset=subset, versus=versus))


with st.spinner("Fitting probes (once per run and subset)..."):
    table = probes(run.key, view.subset, view.versus)
st.caption(f"Held-out R^2 from {N_FOLDS}-fold cross-validation over seeds; the penalty is chosen inside each "
           f"training fold by leave-one-out, from {RELATIVE_ALPHAS[0]:g} to {RELATIVE_ALPHAS[-1]:g} times the mean "
           "squared norm of a (centred) residual at that layer. Targets: the truth, each column's "
           "prediction (pred:...), and the least-squares weights fitted on the seed's in-context examples.")
targets = list(dict.fromkeys(table.target))
default = [t for t in ["truth", "pred:model", "pred:linear", "pred:gd-k1", "ls-weight:0"] if t in targets]
chosen = st.multiselect("Targets", targets, default=default or targets[:3], key="w:targets")
shown = table[table.target.isin(chosen)]
chart(alt.Chart(shown.dropna(subset=["r2"])).mark_line(point=True).encode(
    x="layer:O", y=alt.Y("r2:Q", title="held-out R^2", scale=alt.Scale(domainMax=1)), color="target:N",
    strokeDash=alt.condition(alt.datum.status == "ok", alt.value([1, 0]), alt.value([4, 3])),
    tooltip=["layer", "target", "r2", "constant_r2", "alpha", "n_seeds", "status"]).properties(height=340))
bad = shown[shown.status != "ok"]
if len(bad):
    st.warning(f"{len(bad)} of {len(shown)} probes shown are not plain successes (dashed or missing above): "
               + "; ".join(f"{s}: {n}" for s, n in bad.status.value_counts().items()))
best = table.loc[table.dropna(subset=["r2"]).groupby("target").r2.idxmax()].sort_values("r2", ascending=False)
st.subheader("Best layer per target")
st.dataframe(best.style.format({"r2": "{:.3f}", "constant_r2": "{:.3f}", "alpha": "{:.3g}"}), hide_index=True)
with st.expander("Every probe"):
    st.dataframe(table, hide_index=True)
download(table, "probes", "every probe")
