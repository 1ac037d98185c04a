"""The Interventions page's prompt edits: the form that builds a `PromptEdit` experiment
(edits of each seed's in-context data, run by the server with every regressor refit on
the same edits), and the views of its result: how far each edit moves the model's answer
beside the regressors' shifts, and the edited prompt itself."""

import difflib

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app.common import chart
from app.widgets import candidate_pair, check, integer, many, number, radio, text, unusable
from core.interventions.prompt_edits import closest_regressors, edited_prompt
from core.interventions.result import Result
from core.interventions.spec import EditSpec, PromptEdit
from core.store import MODEL_COLUMN, RunStore

OPS = {
    "perturb-y": "y of an example + delta (token count kept)", "shift-y": "every y + delta",
    "permute": "the examples in a random order", "shuffle-y": "the y's shuffled among the examples",
    "drop": "an example removed", "duplicate": "an example repeated at the end",
    "replace": "an example replaced by (x, y)", "scale-x": "every x and the query times a factor",
    "scale-feature": "one feature times a factor", "add-distractor": "one more random feature",
    "prefix": "only the first k examples", "query": "the query moved (one edit per query)",
}
EXAMPLE_OPS = ("perturb-y", "drop", "replace", "duplicate")
RANDOM_OPS = ("permute", "shuffle-y", "add-distractor")
DEFAULT_OPS = ["perturb-y", "shift-y", "permute", "shuffle-y", "duplicate", "scale-x"]
# Regressors shown by default: one or two of each family, as far as the run has them.
REPRESENTATIVE = ("linear", "ridge", "knn", "knn-distance", "kernel-ridge", "gd-k1", "gd-k10", "mean", "last")
READOUTS = {"greedy": "greedy: the model's own answer", "number": "number: greedy within the run's number format"}
FORM_KEYS = ("ops", "every_example", "example", "delta", "factor", "feature", "k", "queries", "rx", "ry", "edraws",
             "regs", "every_reg", "readout", "show_regs")


def parse_vectors(typed: str, n_features: int) -> list[list[float]]:
    """Parses `0.5; 1.2` (one query per `;`, its features separated by `,`; with one
    feature, `lo:hi:m` is m evenly spaced values); raises ValueError with a readable message."""
    out = []
    for part in typed.split(";"):
        if not part.strip():
            continue
        if n_features == 1 and part.count(":") == 2:
            try:
                lo, hi, m = float(part.split(":")[0]), float(part.split(":")[1]), int(part.split(":")[2])
            except ValueError:
                raise ValueError(f"{part.strip()!r} is not lo:hi:m (two numbers and a count)") from None
            if not 1 <= m <= 200:
                raise ValueError(f"{part.strip()!r} asks for {m} points; give 1-200")
            out += [[round(float(v), 2)] for v in np.linspace(lo, hi, m)]
            continue
        try:
            values = [float(v) for v in part.split(",")]
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not {n_features} number(s) separated by commas") from None
        if len(values) != n_features:
            raise ValueError(f"{part.strip()!r} has {len(values)} values; the run's examples have {n_features} "
                             "features")
        out.append(values)
    if not out:
        raise ValueError("no value given")
    return out


def build_edits(ops: list[str], examples: list[int], delta: float, factor: float, feature: int, k: int,
                queries: list[list[float]], replace_x: list[float], replace_y: float, draws: int) -> list[EditSpec]:
    """Returns the edits the form describes: per op, one per chosen example, random draw or query."""
    one = {"shift-y": dict(value=delta), "scale-x": dict(value=factor), "scale-feature": dict(feature=feature,
                                                                                              value=factor),
           "prefix": dict(k=k)}
    out = []
    for op in ops:
        if op in EXAMPLE_OPS:
            extra = {"perturb-y": dict(value=delta), "replace": dict(x=replace_x, value=replace_y)}.get(op, {})
            out += [EditSpec(op=op, example=i, **extra) for i in examples]
        elif op in RANDOM_OPS:
            out += [EditSpec(op=op, draw=d) for d in range(draws)]
        elif op == "query":
            out += [EditSpec(op=op, x=q) for q in queries]
        else:
            out.append(EditSpec(op=op, **one[op]))
    return out


def default_delta(store: RunStore) -> float:
    """A tenth of the run's spread of y, to the prompts' two decimals (at least 0.01)."""
    return max(round(0.1 * float(np.std(store.root["y_train"][:])), 2), 0.01)


def form(store: RunStore, finished: list[int]) -> dict | None:
    """The prompt-edit experiment the widgets describe (a dict for `PromptEdit`); None
    (with a message shown) when they describe none."""
    data = store.attrs["dataset"]
    n, f = int(data["n_examples"]), int(data["n_features"])
    st.caption("Each edit changes the seed's in-context data; the server re-runs the model on the edited prompt "
               "(teacher-forced log-probabilities of the pair and the greedy answer) and refits every chosen "
               "regressor on the same edited data, so their shifts are compared on the same edit. An edit that "
               "keeps the token count reuses the seed's cached prefix; one that changes it is flagged.")
    c1, c2 = st.columns(2)
    with c1:
        ops = many("Edits", "ops", list(OPS), DEFAULT_OPS, format_func=lambda o: f"{o}: {OPS[o]}")
        examples, delta, factor, feature, k, draws = [0], 0.0, 10.0, 0, n, 1
        queries, replace_x, replace_y = [], [], 0.0
        if any(op in EXAMPLE_OPS for op in ops):
            if check(f"Every example (one edit per example, 0-{n - 1})", "every_example", False):
                examples = list(range(n))
            else:
                examples = [integer("Example", "example", 0, 0, n - 1)]
        if {"perturb-y", "shift-y"} & set(ops):
            delta = number("delta added to y (perturb-y, shift-y)", "delta", default_delta(store), step=0.01,
                           format="%.2f")
        if {"scale-x", "scale-feature"} & set(ops):
            factor = number("Factor (scale-x, scale-feature; 10 is a decimal shift)", "factor", 10.0)
        if "scale-feature" in ops:
            feature = integer("Feature (scale-feature)", "feature", 0, 0, f - 1)
        if "prefix" in ops:
            k = integer("Keep the first k examples (prefix)", "k", max(1, n // 2), 1, n)
        if set(RANDOM_OPS) & set(ops):
            draws = integer("Random draws of permute, shuffle-y, add-distractor", "edraws", 1, 1, 8)
        try:
            if "query" in ops:
                hint = "; `lo:hi:m`: m evenly spaced queries" if f == 1 else ""
                queries = parse_vectors(text(f"Queries (query; `;` between queries, `,` between features{hint})",
                                             "queries", ", ".join(["0.0"] * f)), f)
            if "replace" in ops:
                replace_x = parse_vectors(text("The new example's x (replace)", "rx", ", ".join(["0.0"] * f)), f)[0]
                replace_y = number("The new example's y (replace)", "ry", 0.0)
        except ValueError as exc:
            st.warning(f"The values do not parse: {exc}.")
            return None
    with c2:
        seeds = many("Seeds", "seeds", finished, finished[:4])
        a, b = candidate_pair(store)
        regs = [c for c in store.columns if c != MODEL_COLUMN]
        every = check(f"Refit every regressor of the run ({len(regs)})", "every_reg", False)
        chosen = regs if every else many("Regressors refit on each edit", "regs", regs,
                                         [r for r in regs if r in REPRESENTATIVE] or regs[:6])
        readout = radio("Readout", "readout", list(READOUTS), "greedy", format_func=READOUTS.get)
    if not ops:
        st.warning("Choose at least one edit.")
        return None
    if unusable(seeds, (a, b)):
        return None
    edits = build_edits(ops, examples, delta, factor, feature, k, queries, replace_x, replace_y, draws)
    return dict(kind="edit", edits=[e.model_dump() for e in edits], seeds=seeds, pair=(a, b),
                regressors="run" if every else chosen, readout=readout)


def form_values(exp: PromptEdit, n_examples: int) -> tuple[dict[str, str], bool]:
    """Returns the form's URL values for a saved experiment, and whether the form shows it
    whole (`build_edits` of those values gives its edits)."""
    edits = exp.edits
    first = lambda attr, ops_, default: next((getattr(e, attr) for e in edits if e.op in ops_), default)  # noqa: E731
    examples = sorted({e.example for e in edits if e.example is not None})
    every = examples == list(range(n_examples))
    p = dict(ops=list(dict.fromkeys(e.op for e in edits)), examples=examples if every else examples[:1] or [0],
             delta=first("value", ("perturb-y", "shift-y"), 0.0), factor=first("value", ("scale-x", "scale-feature"),
                                                                             10.0),
             feature=first("feature", ("scale-feature",), 0), k=first("k", ("prefix",), n_examples),
             queries=[e.x for e in edits if e.op == "query"], replace_x=first("x", ("replace",), []),
             replace_y=first("value", ("replace",), 0.0),
             draws=max((e.draw + 1 for e in edits if e.op in RANDOM_OPS), default=1))
    values = {"ops": ",".join(p["ops"]), "seeds": ",".join(map(str, exp.seeds)), "a": exp.pair[0], "b": exp.pair[1],
              "readout": exp.readout, "every_reg": "1" if exp.regressors == "run" else "0",
              "every_example": "1" if every else "0", "example": str(p["examples"][0]), "delta": str(p["delta"]),
              "factor": str(p["factor"]), "feature": str(p["feature"]), "k": str(p["k"]), "edraws": str(p["draws"]),
              "ry": str(p["replace_y"]), "rx": ", ".join(map(str, p["replace_x"])),
              "queries": "; ".join(", ".join(map(str, q)) for q in p["queries"])}
    if exp.regressors != "run":
        values["regs"] = ",".join(exp.regressors)
    values = {k: v for k, v in values.items() if v != ""}
    return values, build_edits(**p) == list(edits)


def shifts(result: Result, summary: pd.DataFrame) -> None:
    """Per edit: the model's answer shift with its 95% interval beside the chosen regressors'."""
    regs = [c.removeprefix("shift:") for c in summary.columns
            if c.startswith("shift:") and not c.endswith(("_low", "_high"))]
    st.markdown("**How far each edit moves the answer**: the model's shift (its answer on the edited prompt minus "
                "on the unedited one) beside each regressor's, refit on the same edited data; mean over seeds with "
                "its 95% bootstrap interval.")
    shown = many("Regressors beside the model", "show_regs", regs, [r for r in regs if r in REPRESENTATIVE][:6]
                 or regs[:6])
    parts = []
    for name in ["model", *shown]:
        col = "shift" if name == "model" else f"shift:{name}"
        parts.append(pd.DataFrame({"edit": summary.label, "subject": name, "shift": summary[col],
                                   "low": summary[f"{col}_low"], "high": summary[f"{col}_high"]}))
    long = pd.concat(parts, ignore_index=True)
    order = list(summary.label)
    base = alt.Chart(long).encode(y=alt.Y("edit:N", sort=order, title=None, axis=alt.Axis(labelLimit=260)),
                                  yOffset=alt.YOffset("subject:N", sort=["model", *shown]),
                                  color=alt.Color("subject:N", sort=["model", *shown]),
                                  tooltip=["edit", "subject", alt.Tooltip("shift:Q", format=".3f"),
                                           alt.Tooltip("low:Q", format=".3f", title="CI low"),
                                           alt.Tooltip("high:Q", format=".3f", title="CI high")])
    rule = alt.Chart(pd.DataFrame({"x": [0.0]})).mark_rule(color="#9ca3af").encode(x="x:Q")
    chart((rule + base.mark_rule().encode(x=alt.X("low:Q", title="shift of the answer"), x2="high:Q")
           + base.mark_point(filled=True, size=60).encode(x="shift:Q"))
          .properties(height=max(220, len(order) * (18 + 8 * len(shown)))))
    st.caption("Closest regressor per edit: the one whose mean shift is nearest the model's "
               "(`core.interventions.prompt_edits.closest_regressors`).")
    st.dataframe(closest_regressors(summary), hide_index=True)


def query_curve(result: Result, store: RunStore, frame: pd.DataFrame) -> None:
    """On a 1-feature run: one seed's answer as the query moves, the model's beside each
    refit regressor's, over that seed's examples (the implicit function, live)."""
    exp = result.request.experiment.root
    cells = [c for c, e in enumerate(exp.edits) if e.op == "query"]
    if store.attrs["dataset"]["n_features"] != 1 or len(cells) < 2:
        return
    st.markdown("**The answer as the query moves** (the context fixed): the model's greedy answer and each "
                "regressor refit on the same context, over the seed's examples.")
    seed = st.selectbox("Seed of the curve", exp.seeds, key="w:curve_seed")
    regs = [c.removeprefix("refit:") for c in frame.columns if c.startswith("refit:")]
    shown = [r for r in regs if r in REPRESENTATIVE][:4] or regs[:4]
    rows = frame[(frame.target_seed == seed) & frame.cell.isin(cells)]
    xs = [exp.edits[c].x[0] for c in rows.cell]
    curves = pd.concat([pd.DataFrame({"x": xs, "answer": rows["decoded"].to_numpy(), "subject": "model"})]
                       + [pd.DataFrame({"x": xs, "answer": rows[f"refit:{r}"].to_numpy(), "subject": r})
                          for r in shown], ignore_index=True)
    row = store.index(int(seed))
    examples = pd.DataFrame({"x": store.root["x_train"][row][:, 0], "answer": store.root["y_train"][row]})
    order = ["model", *shown]
    lines = alt.Chart(curves).mark_line(point=True).encode(
        x=alt.X("x:Q", title="query x"), y=alt.Y("answer:Q", title="answer"),
        color=alt.Color("subject:N", sort=order), tooltip=["subject", "x", alt.Tooltip("answer:Q", format=".2f")])
    dots = alt.Chart(examples).mark_point(color="black", filled=True, size=40).encode(x="x:Q", y="answer:Q")
    chart((lines + dots).properties(height=320))


def prompt_view(result: Result, store: RunStore) -> None:
    """The prompt of a seed as the run wrote it and as an edit writes it, the changed lines marked."""
    exp = result.request.experiment.root
    with st.expander("The edited prompt"):
        c1, c2 = st.columns(2)
        with c1:
            seed = st.selectbox("Seed", exp.seeds, key="w:edit_prompt_seed")
        with c2:
            c = st.selectbox("Edit", list(range(len(exp.edits))), format_func=lambda i: exp.edits[i].label,
                             key="w:edit_prompt_edit")
        before, after = edited_prompt(store, store.index(int(seed)), exp.edits[c])
        diff = difflib.unified_diff(before.splitlines(), after.splitlines(), "as built", "edited", lineterm="", n=1)
        st.code("\n".join(diff) or "(the edit writes the same prompt)", language="diff")
