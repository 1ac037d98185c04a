"""Prompt: one seed's prompt with token boundaries and stored positions, the model's raw
answer, and every candidate's answer against the truth."""

import html

import altair as alt
import streamlit as st

from app.common import chart, download, header, pick_run, pick_seed, run_candidates
from core.tables import View, prompt_tokens, seed_answers

header("Prompt", "One seed's prompt as the model read it, and what each candidate answered.")
run = pick_run()
store = run.store
seed = pick_seed(store)
view = View(seed=seed)
tokens = prompt_tokens(store, view)
answers = seed_answers(store, view, run_candidates(run))
row = store.index(seed)

c1, c2, c3 = st.columns(3)
c1.metric("Truth", f"{answers.loc[0, 'value']:.2f}")
model = answers[answers.candidate == "model"].iloc[0]
c2.metric("Model's answer", "failed (no number)" if model.value != model.value else f"{model.value:.2f}")
c3.metric("Model's absolute error", "n/a" if model.value != model.value else f"{model.abs_error:.2f}")
st.markdown(f"**The model's raw answer** (greedy, until a number was complete): `{store.llm_text()[row]!r}`")

st.subheader("Every candidate's answer")
st.caption("answer_tokens: the answer as the model would have to write it, token by token; answer_logprob: "
           "its log-probability under the model, teacher-forced after the prompt.")
st.dataframe(answers, hide_index=True)
download(answers, f"answers-seed{seed}", "answers")
points = answers.dropna(subset=["value"])
rule = alt.Chart(points[points.candidate == "truth"]).mark_rule(color="black", strokeDash=[4, 2]).encode(x="value")
dots = alt.Chart(points[points.candidate != "truth"]).mark_circle(size=70).encode(
    x=alt.X("value", title="prediction (dashed: truth)"), y=alt.Y("candidate", sort="x", title=None),
    color=alt.condition(alt.datum.candidate == "model", alt.value("#d62728"), alt.value("#1f77b4")),
    tooltip=["candidate", "value", "abs_error"])
chart(dots + rule)

st.subheader("The prompt, token by token")
colors = {"feature value": "#dbeafe", "answer value": "#dcfce7", "answer slot": "#fef9c3",
          "final (query's answer slot)": "#fecaca"}
legend = " ".join(f'<span style="background:{c};padding:1px 4px">{k}</span>' for k, c in colors.items())
spans = []
for t in tokens.itertuples():
    text = html.escape(t.text).replace("\n", "\u21b5<br>")
    style = f"background:{colors.get(t.role, 'transparent')};border:1px solid #ccc;margin:0 1px;padding:0 1px;"
    if t.stored:
        style += "outline:2px solid #b91c1c;"
    spans.append(f'<span title="{t.position}: {t.role or "text"}" style="{style}">{text}</span>')
st.html(f'<div style="font-family:monospace;font-size:13px;line-height:1.9">{legend} '
        f'<span style="outline:2px solid #b91c1c">activations stored</span><br><br>{"".join(spans)}</div>')
st.caption(f"{len(tokens)} tokens; activations are stored at {int(tokens.stored.sum())} positions "
           "(every answer slot; the last is the final position, where the model predicts its answer).")
download(tokens, f"prompt-seed{seed}", "tokens")
