"""Attribution sweep: every cell's AtP / AtP* estimate of its patching effect as a heatmap,
the cells checked by exact patching marked "verified", and how well the estimate ranked them.

The app never loads a model: it reads the sweeps `python -m cache_builder sweep` wrote under
`<cache>/sweeps/<run>/<hash>.json` (JSON) and says how to make one.
"""

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app.common import cache_dir, chart, choose, download, header, pick_run
from core.interventions import attribution

VALUES = {"estimate": "estimated effect (nats of log p(A) - log p(B))",
          "normalized": "estimated normalised effect (per pair / (m_clean - m_corrupt))",
          "atp": "plain AtP (linearised through the softmax too)"}
KIND_LABELS = {"resid_pre": "residual stream (before the layer)", "attn_out": "attention output",
               "mlp_out": "MLP output", "head": "one head's output",
               "head_q": "one head's query (AtP*: exact softmax; estimated only)",
               "head_k": "the keys one head reads (AtP*: exact softmax; estimated only)"}


@st.cache_data(show_spinner=False, max_entries=8)
def read(path: str, mtime: float) -> attribution.Sweep:
    return attribution.load(path)


def command(run: str, finished: list[int]) -> str:
    pairs = ",".join(f"{finished[2 * i]}:{finished[2 * i + 1]}" for i in range(min(4, len(finished) // 2)))
    return (f"python -m cache_builder sweep {run} --pairs {pairs or '0:1'} --verify-top 10 --verify-random 10 "
            f"--cache {cache_dir()}")


def stats_table(sw: attribution.Sweep) -> pd.DataFrame | None:
    kinds = (sw.verification or {}).get("kinds", {})
    if not kinds:
        return None
    return pd.DataFrame([{"kind": k, **v} for k, v in kinds.items()])


def heatmap(part: pd.DataFrame, value: str, x: str, order: list) -> alt.Chart:
    """Cells coloured by `value` (diverging around 0), verified ones outlined and ticked."""
    top = float(np.nanmax(np.abs(part[value]))) if part[value].notna().any() else 1.0
    tooltip = ["label", alt.Tooltip("estimate:Q", format=".4f"), alt.Tooltip("atp:Q", format=".4f"),
               alt.Tooltip("normalized:Q", format=".3f"), "status", alt.Tooltip("exact:Q", format=".4f")]
    base = alt.Chart(part).encode(x=alt.X(f"{x}:O", sort=order, axis=alt.Axis(labelAngle=-45 if x == "position"
                                                                                 else 0)),
                                  y=alt.Y("layer:O", sort="descending"), tooltip=tooltip)
    verified = base.transform_filter(alt.datum.status == "verified")
    n_layers = part["layer"].nunique()
    return (base.mark_rect(color="#e5e7eb")
            + base.mark_rect().encode(color=alt.Color(f"{value}:Q", title=value, scale=alt.Scale(
                scheme="redblue", domain=[-top or -1, top or 1], reverse=True)))
            + verified.mark_rect(fill=None, stroke="black", strokeWidth=1.5)
            + verified.mark_text(text="✓", fontSize=10)).properties(height=max(200, 18 * n_layers + 60))


header("Attribution sweep", "Every cell's patching effect estimated from one forward and one backward pass per "
       "pair (attribution patching, AtP; AtP* for heads' queries and keys), the top cells checked by exact "
       "patching.")
run = pick_run()
store = run.store
name = store.name.removesuffix(".zarr")
finished = [int(s) for s, d in zip(store.seeds, store.done()) if d]
sweeps = attribution.list_sweeps(cache_dir(), name)
if not sweeps:
    st.info("No attribution sweep of this run yet. Make one on a machine with the model (a GPU host, or this "
            "one), then reload:")
    st.code(command(name, finished), language="bash")
    st.stop()

labels = {s["hash"]: f"{s['hash'][:8]} · {s['pairs']} pairs · {s['kinds']} · {s['verified']} verified · "
                     f"{s['finished'][:16]}" for s in sweeps}
chosen = choose("Sweep", "sweep", list(labels), format_func=labels.get)
path = next(s["path"] for s in sweeps if s["hash"] == chosen)
sw = read(path, Path(path).stat().st_mtime)
df = sw.frame()
kind = choose("Site kind", "skind", sw.kinds, format_func=lambda k: f"{k}: {KIND_LABELS.get(k, k)}")
value = choose("Colour", "svalue", list(VALUES), format_func=VALUES.get)

n_verified = int((df["status"] == "verified").sum())
st.caption(f"{len(sw.pairs)} pairs (clean->corrupt: {', '.join(sw.baselines['pair'][:8])}"
           f"{' ...' if len(sw.pairs) > 8 else ''}), answers: {sw.answers}; {len(df)} cells, {n_verified} verified "
           f"by exact patching, the others estimated. Denoising: the corrupt prompt with the clean activation; "
           f"effect = m(patched) - m(corrupt), m = log p(clean answer) - log p(corrupt answer). "
           f"Device {sw.provenance.get('device')}, {sw.provenance.get('seconds_sweep')} s.")

stats = stats_table(sw)
st.subheader("Verification")
if stats is None:
    st.markdown("No cell of this sweep is verified yet: every value is an estimate. Check the top cells with "
                f"`{command(name, finished)}` (same pairs as this sweep's).")
else:
    v = sw.verification
    st.markdown(f"Per kind, the {v['top_k']} cells of largest |estimate| and {v['n_random']} others drawn at "
                "random were patched exactly (the intervention executor) and are marked verified.")
    for kind_, stat in v["kinds"].items():
        st.markdown(f"**{kind_}**: {attribution.verification_line(stat)}.")
    st.caption("recall@k: of the k largest exact effects among the verified cells, the share the estimate put in "
               "its top k. head_q / head_k are never verified: the executor patches no queries or keys.")
    with st.expander("The verification table"):
        st.dataframe(stats, hide_index=True)

part = df[df["kind"] == kind].copy()
st.subheader(f"{kind}: {KIND_LABELS.get(kind, kind)}")
if kind in attribution.HEAD_KINDS:
    position = choose("Position (heads)", "hpos", sw.positions, default="final" if "final" in sw.positions else None)
    part = part[part["position"] == position]
    chart(heatmap(part, value, "head", sorted(part["head"].unique().tolist())))
    st.caption(f"Layer x head at position {position}. Outlined and ticked: verified.")
else:
    chart(heatmap(part, value, "position", sw.positions))
    st.caption("Layer x position. Outlined and ticked: verified.")

checked = part[part["status"] == "verified"]
if len(checked):
    st.markdown(f"**Estimate against exact effect**, the {len(checked)} verified {kind} cells here")
    lim = float(np.nanmax(np.abs(checked[["estimate", "exact"]].to_numpy()))) or 1.0
    diagonal = alt.Chart(pd.DataFrame({"x": [-lim, lim], "y": [-lim, lim]})).mark_line(
        color="#9ca3af", strokeDash=[4, 4]).encode(x="x:Q", y="y:Q")
    chart((diagonal + alt.Chart(checked).mark_circle(size=60).encode(
        x=alt.X("estimate:Q", title="estimate"), y=alt.Y("exact:Q", title="exact effect"),
        tooltip=["label", "estimate", "exact"])).properties(height=320))

st.subheader("Cells by |estimate|")
table = df[df["kind"] == kind].reindex(df[df["kind"] == kind]["estimate"].abs().sort_values(ascending=False).index)
st.dataframe(table[["label", "estimate", "atp", "normalized", "status", "exact"]].head(50), hide_index=True)
download(table, f"sweep-{sw.hash[:8]}-{kind}", "cells")
with st.expander("Notes and provenance"):
    for note in sw.notes:
        st.markdown(f"- {note}")
    st.json(sw.provenance, expanded=False)
