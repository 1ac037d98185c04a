"""The battery on one subject: every test, saved seed by seed, and its verdict card.

`run_lab` runs the tests on a subject (a language model over a run's seeds, or a toy
over sampled tasks) with the reference estimators beside it, and writes each test's
per-seed table to `<out>/<test>.csv` as seeds finish: a killed run resumes at the
first seed a test has not saved. Four tests feed the verdict (`VERDICT_TESTS`: 1
agreement, 3 effective weights, 5 implicit function, 6 invariance); test 3's noise floor
(`noise`: a non-numeric token changed), 4 leave-one-out and 7 learning curves are run
beside them, and 2 fitted parameters is fitted from test 1's answers and the truths
(`fitted_table`). `<out>/card.json` holds the verdict once every
test is done. Every number the Mechanism page shows is read from these files.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.mechanism import curves, fitted, implicit, invariance, loo
from core.mechanism.edits import rounded
from core.mechanism.subjects import MechanismError, PredictSubject, Subject, Task, regressor_subject, toy_subject
from core.mechanism.toys import GDConstruction, lookup_toy, sample_tasks, softmax_kernel_head, train_lsa
from core.mechanism.verdict import (agreement_distances, curve_distances, invariance_distances, verdict,
                                    weight_distances)
from core.mechanism.weights import weights_test
from core.regressors import kernel_standardized, knn_standardized

# The estimators every subject is compared with: one per way of reading the examples,
# and for the local smoothers a grid of their parameter (the family's best member wins).
REFERENCES = ("gd-k1", "gd-k1-eta1", "gd-std-k1", "gd-k10", "gd-std-k10", "lr-ols", "lr-ridge-closed-form", "lr-knn",
              "mean", "last")
KNN_K = (1, 3, 5, 10)
KERNEL_SCALES = (0.1, 0.2, 0.5, 1.0)  # x the median pairwise distance of the standardized examples
TOYS = "toys"  # the toys' results sit beside the runs' under cache/mechanism/
WEIGHT_REL = 0.1  # test 3's perturbation, x the seed's y std
SWEEP_SEEDS = 2  # the delta-sweep control (3 x WEIGHT_REL) runs on the first seeds only: it doubles test 3
CURVE_POINTS = 21  # test 5's queries per seed: a grid over x (1-D) or random points in the examples' box
VERDICT_TESTS = ("agreement", "weights", "implicit", "invariance")
TESTS = (*VERDICT_TESTS, "noise", "loo", "curves")


def lab_dir(cache: str | Path, run: str, subject: str) -> Path:
    """Returns where a subject's tables on a run (or `TOYS`) live: cache/mechanism/<run>/<subject>/."""
    return Path(cache) / "mechanism" / run.removesuffix(".zarr") / subject.replace("/", "--").replace(":", "-")


def lab_dirs(cache: str | Path, run: str) -> list[Path]:
    """Returns the subjects' directories of a run (or `TOYS`) that hold saved bases."""
    root = Path(cache) / "mechanism" / run.removesuffix(".zarr")
    return sorted(p.parent for p in root.glob("*/bases.npz"))


def reference_subjects(names: Sequence[str] = REFERENCES) -> list[Subject]:
    """Returns the reference estimators: `names`, kNN over `KNN_K` and a Gaussian kernel over
    `KERNEL_SCALES` on standardized features."""
    refs: list[Subject] = [regressor_subject(r) for r in names]
    refs += [PredictSubject(f"knn-std-k{k}", lambda x, y, q, k=k: knn_standardized(x, y, q, 0, k)) for k in KNN_K]
    refs += [PredictSubject(f"kernel-std-c{c}", lambda x, y, q, c=c: kernel_standardized(x, y, q, 0, c))
             for c in KERNEL_SCALES]
    return refs


@dataclass(frozen=True)
class _Seed:
    """A subject seen through one base: the tests run seed by seed (base 0 = base `k`)."""

    inner: Subject
    k: int

    @property
    def name(self) -> str:
        return self.inner.name

    def predict(self, base: int, tasks: Sequence[Task]) -> np.ndarray:
        return self.inner.predict(self.k, tasks)


def _answers(subject: Subject, k: int, task: Task) -> float:
    return float(subject.predict(k, [task])[0])


def _agreement(subject: Subject, refs: list[Subject], k: int, task: Task, truth: float) -> pd.DataFrame:
    row = {"seed": k, "answer": _answers(subject, k, task), "y_mean": float(task.y.mean())}
    row.update({f"ref_{r.name}": _answers(r, k, task) for r in refs})
    return pd.DataFrame([row])


def _weights(subject: Subject, refs: list[Subject], k: int, task: Task, truth: float) -> pd.DataFrame:
    rels = (WEIGHT_REL, 3 * WEIGHT_REL) if k < SWEEP_SEEDS else (WEIGHT_REL,)
    table = weights_test([_Seed(s, k) for s in [subject, *refs]], [task], rels=rels,
                         references=[r.name for r in refs])
    return table.assign(seed=k)


def _implicit(subject: Subject, refs: list[Subject], k: int, task: Task, truth: float) -> pd.DataFrame:
    q = (implicit.grid_1d(task, CURVE_POINTS) if task.x.shape[1] == 1
         else implicit.random_queries(task, CURVE_POINTS, np.random.default_rng([k, CURVE_POINTS])))
    return implicit.curves([_Seed(s, k) for s in [subject, *refs]], [task], [q]).assign(seed=k)


def _invariance(subject: Subject, refs: list[Subject], k: int, task: Task, truth: float) -> pd.DataFrame:
    table = invariance.run([_Seed(s, k) for s in [subject, *refs]], [task], [r.name for r in refs], seed=k)
    return table.assign(seed=k, y_std=float(task.y.std()))


def _noise(subject: Subject, refs: list[Subject], k: int, task: Task, truth: float) -> pd.DataFrame:
    # Only a language model reads tokens: any other subject's answer cannot move.
    read = getattr(subject, "non_numeric_changes", None)
    change = read(k) if read is not None else np.zeros(task.n)
    return pd.DataFrame({"seed": k, "example": np.arange(task.n), "change": change})


def _loo(subject: Subject, refs: list[Subject], k: int, task: Task, truth: float) -> pd.DataFrame:
    return loo.changes([_Seed(s, k) for s in [subject, *refs]], [task]).assign(seed=k)


def _curves(subject: Subject, refs: list[Subject], k: int, task: Task, truth: float) -> pd.DataFrame:
    return curves.run([_Seed(s, k) for s in [subject, *refs]], [task], np.array([truth])).assign(seed=k)


_RUNNERS: dict[str, Callable[[Subject, list[Subject], int, Task, float], pd.DataFrame]] = {
    "agreement": _agreement, "weights": _weights, "implicit": _implicit, "invariance": _invariance,
    "noise": _noise, "loo": _loo, "curves": _curves,
}


def run_lab(subject: Subject, bases: Sequence[Task], out: str | Path, labels: Sequence[int] | None = None,
            truths: Sequence[float] | None = None, tests: Sequence[str] = TESTS,
            references: Sequence[str] = REFERENCES, progress: Callable[[float, str], None] | None = None) -> dict:
    """Runs `tests` on every base (`labels`: their run seeds, `truths`: their queries'
    true values, NaN where unknown), resuming from `<out>/<test>.csv`; returns the card
    (also written to `<out>/card.json`): per verdict test its winner and ties, and the verdict."""
    say = progress or (lambda f, s: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truths = np.full(len(bases), np.nan) if truths is None else np.asarray(truths, np.float64)
    save_bases(out, bases, labels, truths)
    refs = reference_subjects(references)
    paths = {test: out / f"{test}.csv" for test in tests}
    have = {test: set(pd.read_csv(p)["seed"].tolist()) if p.exists() else set() for test, p in paths.items()}
    # Seed by seed: a language model keeps one seed's clean run for all its tests.
    for k, task in enumerate(bases):
        for i, test in enumerate(tests):
            if k not in have[test]:
                say((k * len(tests) + i) / (len(tests) * len(bases)), f"seed {k + 1}/{len(bases)}: {test}")
                _append(paths[test], _RUNNERS[test](subject, refs, k, task, float(truths[k])))
    card = card_of(out)
    (out / "card.json").write_text(json.dumps(card, indent=1, default=float))
    say(1.0, "done")
    return card


def _append(path: Path, part: pd.DataFrame) -> None:
    # Written whole and renamed: a run killed mid-write leaves the previous table, never half a row.
    table = pd.concat([pd.read_csv(path), part], ignore_index=True) if path.exists() else part
    tmp = path.with_suffix(".csv.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)


def _agree(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two arrays of truths are equal wherever both are known (not NaN)."""
    known = np.isfinite(a) & np.isfinite(b)
    return np.array_equal(a[known], b[known])


def save_bases(out: Path, bases: Sequence[Task], labels: Sequence[int] | None, truths: np.ndarray) -> None:
    """Writes the bases, their run seeds and truths to `<out>/bases.npz`. A directory
    holding a prefix of them is extended (its saved tables stay true: more seeds are
    added); one holding other bases is refused (its tables are about those). A truth
    unknown (NaN) on one side is taken from the other."""
    arrays = {"x": np.stack([t.x for t in bases]), "y": np.stack([t.y for t in bases]),
              "q": np.stack([t.q for t in bases]),
              "seeds": np.asarray(range(len(bases)) if labels is None else labels, dtype=np.int64),
              "truth": truths}
    path = out / "bases.npz"
    if path.exists():
        with np.load(path) as old:
            n = len(old["seeds"])
            # Directories of earlier versions hold no truths: they gain them.
            saved = old["truth"] if "truth" in old else np.full(n, np.nan)
            same = n <= len(bases) and all(np.array_equal(old[k], arrays[k][:n]) for k in ("x", "y", "q", "seeds"))
            if not (same and _agree(saved, truths[:n])):
                raise MechanismError(f"{out} holds the tables of other seeds; delete it or choose other --seeds")
            arrays["truth"] = np.concatenate([np.where(np.isfinite(truths[:n]), truths[:n], saved), truths[n:]])
            if n == len(bases) and "truth" in old and np.array_equal(arrays["truth"], saved, equal_nan=True):
                return
    np.savez(path, **arrays)


def load_bases(out: str | Path) -> tuple[list[Task], list[int]]:
    """Returns the bases a lab directory's tables are about, and their run seeds."""
    with np.load(Path(out) / "bases.npz") as z:
        return [Task(x, y, q) for x, y, q in zip(z["x"], z["y"], z["q"])], z["seeds"].tolist()


def load_truths(out: str | Path) -> np.ndarray:
    """Returns the true values of the bases' queries (NaN where unknown)."""
    with np.load(Path(out) / "bases.npz") as z:
        return z["truth"] if "truth" in z else np.full(len(z["seeds"]), np.nan)


def distances(out: str | Path) -> pd.DataFrame:
    """Returns every saved test's per-seed distances to each reference (`core.mechanism.verdict`)."""
    out = Path(out)
    bases, _ = load_bases(out)
    read = lambda test: pd.read_csv(out / f"{test}.csv") if (out / f"{test}.csv").exists() else None  # noqa: E731
    y_train = np.stack([t.y for t in bases])
    parts = []
    if (a := read("agreement")) is not None:
        a = a.sort_values("seed")
        seeds = a["seed"].to_numpy()
        refs = {c.removeprefix("ref_"): a[c].to_numpy() for c in a.columns if c.startswith("ref_")}
        # Each fitted family's answer on a seed with its parameter fitted on the other half of the seeds.
        held = fitted.fit_answers({"subject": a["answer"].to_numpy()}, [bases[i] for i in seeds])
        for cand, g in held.groupby("candidate", sort=False):
            refs[f"{cand}-fit"] = g.sort_values("seed")["prediction_held"].to_numpy()
        parts.append(agreement_distances(seeds, a["answer"].to_numpy(), refs, y_train[seeds]))
    if (w := read("weights")) is not None:
        parts.append(weight_distances(w, w["subject"].iloc[0], WEIGHT_REL))
    if (c := read("implicit")) is not None:
        parts.append(curve_distances(c, y_train))
    if (v := read("invariance")) is not None:
        parts.append(invariance_distances(v))
    return pd.concat(parts, ignore_index=True)


def fitted_table(out: str | Path) -> pd.DataFrame:
    """Returns test 2 (`fitted.summary`) on the saved answers of test 1 and, as its control,
    on the truths: per subject and candidate the fitted parameter and its held-out R^2."""
    out = Path(out)
    bases, _ = load_bases(out)
    a = pd.read_csv(out / "agreement.csv").sort_values("seed")
    seeds = a["seed"].to_numpy()
    answers = {"subject": a["answer"].to_numpy()}
    truths = load_truths(out)[seeds]
    if np.isfinite(truths).all():
        answers[fitted.TRUTH] = truths
    return fitted.summary(fitted.fit_answers(answers, [bases[i] for i in seeds]))


def noise_table(out: str | Path) -> pd.DataFrame:
    """Returns test 3's noise floor per seed: `shift`, the mean |answer move| under the
    +-delta edits of the y's (mean |w_i| x delta), `floor`, the mean |answer move| when a
    non-numeric token of an example is changed (`noise.csv`), and `ratio` = shift / floor."""
    out = Path(out)
    w = pd.read_csv(out / "weights.csv")
    w = w[(w["subject"] == w["subject"].iloc[0]) & (w["rel"] == WEIGHT_REL)]
    bases, _ = load_bases(out)
    n = np.array([bases[s].n for s in w["seed"]])
    floor = pd.read_csv(out / "noise.csv").assign(change=lambda d: d["change"].abs()).groupby("seed")["change"].mean()
    table = pd.DataFrame({"seed": w["seed"].to_numpy(), "shift": (w["abs_total"] / n * w["delta"]).to_numpy()})
    table["floor"] = table["seed"].map(floor)
    table["ratio"] = table["shift"] / table["floor"]
    return table.dropna(subset=["floor"]).reset_index(drop=True)


def loo_table(out: str | Path) -> pd.DataFrame:
    """Returns test 4 (`loo.summary` of `loo.per_seed`) on the saved `loo.csv`: per subject
    the rank correlation of |change| with distance to the query and the share of examples
    whose removal moves the answer, with intervals over seeds."""
    return loo.summary(loo.per_seed(pd.read_csv(Path(out) / "loo.csv")))


def curve_table(out: str | Path) -> pd.DataFrame:
    """Returns test 7 (`curves.summary`) on the saved `curves.csv`: per subject and number
    of examples k the mean error with its interval over seeds."""
    return curves.summary(pd.read_csv(Path(out) / "curves.csv"))


def card_of(out: str | Path) -> dict:
    """Returns the verdict card of the saved tests: {"tests": [...], "verdict": {...}}."""
    table, overall = verdict(distances(out))
    return {"tests": table.to_dict(orient="records"), "verdict": overall}


def toy_bases(n_seeds: int, seed: int = 0) -> tuple[list[Task], np.ndarray]:
    """Returns von Oswald et al.'s tasks (d = 10, N = 10) with values at the prompts'
    decimals, and their queries' true values."""
    t = sample_tasks(n_seeds, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tasks = [rounded(t.x[i].numpy(), t.y[i].numpy(), t.x_query[i].numpy()) for i in range(n_seeds)]
    return tasks, t.y_query.numpy()


def toy_subjects(train_seed: int = 0) -> list[PredictSubject]:
    """Returns the known-answer toys as subjects: a linear self-attention layer trained on
    the task (`train_lsa`, about 10 s), its GD construction, the softmax kernel head and
    the lookup."""
    trained = train_lsa(seed=train_seed).model
    return [PredictSubject("trained-lsa", trained.predict), PredictSubject("gd-construction", GDConstruction().predict),
            toy_subject(softmax_kernel_head()), toy_subject(lookup_toy())]


# What each toy is, by construction: the verdict each must reach.
TOY_TRUTH = {"trained-lsa": "gd", "gd-construction": "gd", "softmax-kernel-head": "kernel-knn", "lookup": "recalled"}


def card_records(out: str | Path) -> pd.DataFrame:
    """Returns the verdict card's per-test rows."""
    return pd.DataFrame(card_of(out)["tests"])


# The lab's tables by name, each from a subject's directory (the CLI's `export mechanism-<name>`).
TABLES: dict[str, Callable[[str | Path], pd.DataFrame]] = {
    "card": card_records, "distances": distances, "fitted": fitted_table, "noise": noise_table, "loo": loo_table,
    "curves": curve_table,
}
