"""Leaderboard: every regressor's error against the truth, per-seed error distributions,
and how often the model beats the classical regressors."""

import altair as alt
import streamlit as st

from app.common import chart, download, header, param, pick_run, pick_subset, set_param
from core.leaderboard import REL_TOL, beats_all
from core.tables import leaderboard_table, seed_errors, subset_rows

header("Leaderboard", "Mean and median squared and absolute error over seeds; failures are unparsable answers "
       "(never dropped, never scored 0).")
store = pick_run().store
view = pick_subset(store)
every_row = st.toggle("Show every estimator", value=param("expand") == "1",
                      help=f"Estimators whose predictions agree within {REL_TOL:g} (relative) on every seed of this "
                           "subset are one estimator: one row, named by the first, the others in equivalent_to.")
set_param("expand", "1" if every_row else None)
table = leaderboard_table(store, view, collapse=not every_row)
rows = subset_rows(store, view)[0]
share = beats_all(store.predictions()[rows], store.y_true()[rows], store.columns)
model = table[table.regressor == "model"].iloc[0]
c1, c2, c3 = st.columns(3)
c1.metric("Seeds", len(rows))
c2.metric("Model beats every classical regressor", f"{share:.0%} of seeds",
          help="its absolute error is below every regressor's except the mean / last / random baselines")
c3.metric("Model's rank by mean squared error", f"{int(table.index[table.regressor == 'model'][0]) + 1} / {len(table)}")
if model.failures:
    st.warning(f"The model failed to give a number on {int(model.failures)} seeds: those count as losses.")
st.dataframe(table.style.apply(lambda r: ["background-color:#fee2e2" if r.regressor == "model" else ""] * len(r),
                               axis=1).format(precision=4), hide_index=True, height=36 * (len(table) + 1))
st.caption(f"beats_model: share of seeds where the regressor's absolute error is smaller than the model's. "
           f"avg_rank: mean rank by absolute error among all columns (1 = best). Errors equal within {REL_TOL:g} "
           "of the larger magnitude tie: float noise is no win and no rank.")
download(table, "leaderboard")

st.subheader("Per-seed absolute error")
errors = seed_errors(store, view)
order = table.regressor.tolist()
ok = errors[errors.regressor.isin(order)].dropna()
ok = ok[ok.abs_error > 0]
chart(alt.Chart(ok).mark_boxplot(extent="min-max").encode(
    x=alt.X("abs_error", scale=alt.Scale(type="log"), title="absolute error (log scale)"),
    y=alt.Y("regressor", sort=order, title=None, axis=alt.Axis(labelOverlap=False, labelLimit=200)),
    color=alt.condition(alt.datum.regressor == "model", alt.value("#d62728"), alt.value("#1f77b4"))
).properties(height=22 * len(order)))
st.caption(f"Sorted by mean squared error. {int((errors.abs_error == 0).sum())} exact answers (error 0) "
           "cannot be shown on a log scale and are left out of the plot only.")
download(errors, "seed-errors", "per-seed errors")
