"""Mechanism: which learning algorithm explains the model's answers on a run, with the
random-init model and the known-answer toys beside it. Reads the lab's saved tables
(`python -m cache_builder mechanism`, `core.mechanism.lab`); never runs a model."""

from pathlib import Path
from urllib.parse import urlencode

import altair as alt
import pandas as pd
import streamlit as st

from app.common import cache_dir, chart, choose, download, header, pick_run
from core.mechanism.battery import summarize
from core.mechanism.lab import (TESTS, TOY_TRUTH, TOYS, card_of, curve_table, distances, fitted_table, lab_dirs,
                                load_bases, loo_table, noise_table)
from core.mechanism.subjects import FAMILIES
from core.mechanism.verdict import family, family_verdict

TEST_LABELS = {"agreement": "1 · agreement of answers", "weights": "3 · effective weights of the examples",
               "implicit": "5 · implicit function over queries", "invariance": "6 · invariance battery"}

header("Mechanism", "Which algorithm family (one GD step / GD-k, OLS-ridge, kernel-kNN, baselines, recalled) best "
       "explains the model's answers: per test the family whose best member is closest, with 95% bootstrap "
       "intervals over seeds, 'indistinguishable' where the data cannot separate families; the same tests on the "
       "random-init model and on toys whose algorithm is known.")
run = pick_run()
name = run.store.name
cache = cache_dir()


@st.cache_data(show_spinner=False)
def load_card(path: str, mtime: float) -> dict:
    return card_of(path)


@st.cache_data(show_spinner=False)
def load_distances(path: str, mtime: float) -> pd.DataFrame:
    return distances(path)


@st.cache_data(show_spinner=False)
def load_noise(path: str, mtime: float) -> pd.DataFrame:
    return noise_table(path)


@st.cache_data(show_spinner=False)
def load_extra(path: str, mtime: float) -> dict[str, pd.DataFrame]:
    """Tests 2, 4 and 7 of what the subject's directory holds."""
    files = {"fitted": ("agreement.csv", fitted_table), "loo": ("loo.csv", loo_table),
             "curves": ("curves.csv", curve_table)}
    return {t: fn(path) for t, (f, fn) in files.items() if (Path(path) / f).exists()}


def _stamp(path) -> float:
    return max((p.stat().st_mtime for p in path.glob("*.csv")), default=0.0)


def _fmt(mean: float, low: float, high: float) -> str:
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def card_table(card: dict, subject: str) -> pd.DataFrame:
    """The card's rows, each with a link to the view its numbers come from (this page, that test)."""
    return pd.DataFrame([{"test": TEST_LABELS.get(t["test"], t["test"]), "closest family": t["winner"],
                          "best member": t["member"], "distance [95% CI]": _fmt(t["distance"], t["low"], t["high"]),
                          "indistinguishable from": t["tied_with"] or "—",
                          "view": "?" + urlencode({"run": name, "subject": subject, "test": t["test"]})}
                         for t in card["tests"]])


toys = {p.name: p for p in lab_dirs(cache, TOYS)}
with st.expander("Known-answer toys: the tests must classify these before their verdict on a model counts",
                 expanded=False):
    if not toys:
        st.info("No toy results yet: `python -m cache_builder mechanism --toys` (about a minute).")
    else:
        rows = []
        for toy, path in toys.items():
            card = load_card(str(path), _stamp(path))
            got = card["verdict"]["family"]
            rows.append({"toy": toy, "is": TOY_TRUTH.get(toy, "?"), "verdict": card["verdict"]["text"],
                         "correct": got == TOY_TRUTH.get(toy)})
        toy_table = pd.DataFrame(rows)
        st.dataframe(toy_table, hide_index=True)
        download(toy_table, "mechanism-toys")
        if not toy_table["correct"].all():
            st.error("A toy is misread: the tests cannot be trusted on a model until they read every toy correctly.")

subjects = {p.name: p for p in lab_dirs(cache, name)}
if not subjects:
    st.info(f"No mechanism-lab results for this run yet. Run `python -m cache_builder mechanism {name}` "
            f"(the model) and `python -m cache_builder mechanism {name} --model random:<spec>` (the random-init "
            "control); a killed run resumes where it stopped.")
    st.stop()

cols = st.columns(len(subjects))
lab_seeds: dict[str, list[int]] = {}  # each subject's seeds, for the live link of test 3
for col, (subject, path) in zip(cols, subjects.items()):
    with col:
        bases, seeds = load_bases(path)
        lab_seeds[subject] = seeds
        done = [t for t in TESTS if (path / f"{t}.csv").exists()]
        st.subheader(subject + (" (random-init control)" if subject.startswith("random-") else ""))
        if not done:
            st.info("Started; no test finished a seed yet.")
            continue
        card = load_card(str(path), _stamp(path))
        st.markdown(f"**Verdict:** {card['verdict']['text']}")
        st.dataframe(card_table(card, subject), hide_index=True,
                     column_config={"view": st.column_config.LinkColumn("view", display_text="per seed")})
        st.caption(f"{len(seeds)} seeds (run seeds {seeds[0]}–{seeds[-1]}); tests saved: {', '.join(done)}. "
                   + ("" if (path / "card.json").exists() else "Still running or stopped: the card covers the "
                      "seeds saved so far; the same command resumes it."))
        download(card_table(card, subject), f"mechanism-card-{subject}")

st.divider()
# The toys' tables read like a subject's: what each test says of an algorithm known by construction.
choices = {**subjects, **{f"toy: {toy}": p for toy, p in toys.items()}}
subject = choose("Subject", "subject", list(choices), sidebar=False,
                 help="the run's subjects, then the known-answer toys (their tests 1-7 read the same way)")
path = choices[subject]
dist = load_distances(str(path), _stamp(path))
test = choose("Test", "test", [t for t in TESTS if t in set(dist["test"])], sidebar=False,
              format_func=lambda t: TEST_LABELS.get(t, t))
families = family_verdict(dist[dist["test"] == test])
st.markdown(f"**{TEST_LABELS[test]}** — per family its best member's distance to {subject} (lower is closer), and "
            "the paired difference to the closest family; 'tied' where that difference's interval reaches down to "
            "the tie tolerance.")
st.dataframe(families.assign(about=families["family"].map(lambda f: FAMILIES.get(f, ""))), hide_index=True)
download(families, f"mechanism-{test}-{subject}")
if test == "weights":
    if (path / "noise.csv").exists() and (path / "weights.csv").exists():
        noise = load_noise(str(path), _stamp(path))
        if len(noise):
            sm = summarize(noise.assign(subject=subject), ["shift", "floor"]).iloc[0]
            st.markdown(f"**Noise floor** over {len(noise)} seeds: the answer moves "
                        f"{_fmt(sm['shift_mean'], sm['shift_low'], sm['shift_high'])} under the +-delta edits of the "
                        f"y's, and {_fmt(sm['floor_mean'], sm['floor_low'], sm['floor_high'])} when one example's "
                        "`Output` is written `output` (a non-numeric token): weights whose moves are near the floor "
                        "are noise.")
            download(noise, f"mechanism-noise-{subject}", "noise floor per seed")
    else:
        st.caption("No noise-floor control saved for this subject (`--tests noise`).")
    spec = run.store.attrs["model"]["spec"]
    if subject in (spec, f"{spec}+number"):
        live = urlencode({"run": name.removesuffix(".zarr"), "mode": "Edit", "ops": "perturb-y", "every_example": "1",
                          "seeds": ",".join(map(str, lab_seeds[subject][:4])), "a": "truth", "b": "model",
                          "readout": "number" if subject.endswith("+number") else "greedy"})
        st.markdown(f"[Perturb every y_i of these seeds live](interventions?{live}) on the Interventions page (an "
                    "intervention server runs the run's model): each edit's shift beside every regressor's, one "
                    "delta for all seeds (a tenth of the run's spread of y).")
part = dist[dist["test"] == test].assign(family=lambda d: d["reference"].map(family))
chart(alt.Chart(part).mark_boxplot(extent="min-max").encode(
    x=alt.X("distance", title="distance per seed"),
    y=alt.Y("reference", sort=alt.EncodingSortField("distance", op="mean"), title=None),
    color=alt.Color("family:N", title="family")).properties(height=16 * part["reference"].nunique()))
download(part, f"mechanism-{test}-{subject}-per-seed", "per-seed distances")
raw = pd.read_csv(path / f"{test}.csv")
with st.expander(f"The saved table ({test}.csv)"):
    st.dataframe(raw, hide_index=True)
    download(raw, f"mechanism-{test}-{subject}-raw", "raw table")

st.divider()
st.subheader(f"Beside the verdict: tests 2, 4 and 7 on {subject}")
extra = load_extra(str(path), _stamp(path))
if "fitted" in extra:
    st.markdown("**2 · fitted algorithm parameters** — the one parameter of each candidate that best reproduces the "
                "answers over the seeds (gd: the step eta of one GD step from w = 0; knn: k; kernel: the Gaussian "
                "bandwidth h; `-std` on standardized features), fitted on one half of the seeds and scored on the "
                "other (held-out R^2, 95% bootstrap interval). Rows `truth`: the same fits to the true values, the "
                "control: how well each family could do at best.")
    f = extra["fitted"].assign(subject=lambda d: d["subject"].replace("subject", subject))
    st.dataframe(f.assign(**{"held-out R^2 [95% CI]": [_fmt(m, lo, hi) for m, lo, hi in
                                                        zip(f["r2_held"], f["r2_held_low"], f["r2_held_high"])]})
                 [["subject", "candidate", "param", "param_fold0", "param_fold1", "held-out R^2 [95% CI]",
                   "n_seeds"]], hide_index=True)
    download(f, f"mechanism-fitted-{subject}")
if "loo" in extra:
    st.markdown("**4 · leave one out** — drop example i and re-ask: the rank correlation of |change| with the "
                "distance of x_i to the query (raw and on standardized features; strongly negative for a local "
                "smoother, near zero for least squares and GD), the share of examples whose removal moves the "
                "answer (0 for a recalled function, k/n for kNN), with 95% intervals over seeds.")
    moved = extra["loo"]
    values = ["rank_distance", "rank_distance_std", "changed_share", "mean_abs_change"]
    st.dataframe(pd.DataFrame({"subject": moved["subject"], **{c: [_fmt(m, a, b) for m, a, b in zip(
        moved[f"{c}_mean"], moved[f"{c}_low"], moved[f"{c}_high"])] for c in values}}), hide_index=True)
    download(moved, f"mechanism-loo-{subject}")
if "curves" in extra:
    st.markdown("**7 · learning curves** — the error |answer - truth| from the first k examples (prefixes of the "
                "same list), mean over seeds with its 95% interval.")
    cv = extra["curves"].dropna(subset=["error_mean"])
    names = list(dict.fromkeys(cv["subject"]))
    picked = st.multiselect("Curves", names, default=[n for n in names if n == names[0] or n in
                                                      ("mean", "lr-ols", "knn-std-k5", "gd-std-k1")],
                            key="w:curves")
    part = cv[cv["subject"].isin(picked)]
    base = alt.Chart(part).encode(x=alt.X("k:Q", title="examples in the prompt"),
                                  color=alt.Color("subject:N", title=None))
    chart(base.mark_area(opacity=0.15).encode(y=alt.Y("error_low:Q", scale=alt.Scale(type="symlog"),
                                                       title="error |answer - truth|"), y2="error_high:Q")
          + base.mark_line(point=True).encode(y="error_mean:Q"))
    download(extra["curves"], f"mechanism-curves-{subject}")
if not extra:
    st.info("No tables of tests 2, 4 or 7 for this subject yet: `python -m cache_builder mechanism` runs them "
            "(`--tests loo,curves` adds them to an earlier run's tables).")
