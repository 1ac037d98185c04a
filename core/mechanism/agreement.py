"""Estimator agreement: how close the model's predictions are to each estimator's.

The measure is the squared difference of two columns' predictions, per seed, divided
by the run's y variance (the variance of each seed's in-context y's, averaged over
seeds), so 0 is the same function on these prompts and 1 is as far apart as a typical
y is from its mean. The control is the same measure between the estimators: where two
estimators are closer to each other than the model is to either, the data cannot tell
them apart, and the verdict says "indistinguishable" (`indistinguishable`).
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from core.interventions.metrics import bootstrap_ci
from core.leaderboard import equivalence_groups
from core.store import MODEL_COLUMN

# Below this normalised disagreement (1% of the y variance) two columns count as the same
# function on these prompts: well under any estimator gap that matters, and far above
# the model's rounding of its answers to the prompt's decimals.
THRESHOLD = 0.01


def y_scale(y: Float[np.ndarray, "s n"] | Float[np.ndarray, " s"]) -> float:
    """Returns the normaliser: the mean over seeds of the variance of each seed's in-context
    y's (`y_train [s, n]`), or the variance over seeds of `y_true [s]`."""
    y = np.asarray(y, np.float64)
    return float(y.var(axis=1).mean() if y.ndim == 2 else y.var())


def disagreement(a: Float[np.ndarray, " s"], b: Float[np.ndarray, " s"], scale: float) -> Float[np.ndarray, " s"]:
    """Returns (a - b)^2 / scale per seed (NaN where either failed)."""
    return (np.asarray(a, np.float64) - b) ** 2 / scale


def model_agreement(predictions: Float[np.ndarray, "s R"], columns: list[str], y: np.ndarray,
                    model: str = MODEL_COLUMN, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Returns one row per other column, closest first: its normalised disagreement with
    `model` (`mean` over seeds where both gave a number, bootstrap `low` / `high` over
    seeds), `n_seeds`, and `equal` (the same number on every seed, `core.leaderboard.agree`)."""
    scale = y_scale(y)
    j = columns.index(model)
    equal = _equal_to(predictions, columns, model)
    rows = []
    for k, name in enumerate(columns):
        if k == j:
            continue
        d = disagreement(predictions[:, j], predictions[:, k], scale)
        mean, low, high = bootstrap_ci(d, n_boot, seed)
        rows.append({"candidate": name, "mean": mean, "low": low, "high": high,
                     "n_seeds": int(np.isfinite(d).sum()), "equal": name in equal})
    table = pd.DataFrame(rows)
    return table.sort_values(["equal", "mean"], ascending=[False, True], na_position="last",
                             kind="stable").reset_index(drop=True)


def best_match(predictions: Float[np.ndarray, "s R"], columns: list[str], y: np.ndarray,
               model: str = MODEL_COLUMN) -> str:
    """Returns the column closest to `model`: the first, in column order, that equals it on
    every seed (float noise does not pick among equal estimators), else the lowest mean
    normalised disagreement."""
    equal = _equal_to(predictions, columns, model)
    if equal:
        return equal[0]
    return str(model_agreement(predictions, columns, y, model, n_boot=1)["candidate"].iloc[0])


def _equal_to(predictions: np.ndarray, columns: list[str], model: str) -> list[str]:
    group = next(g for g in equivalence_groups(predictions, columns, keep_apart=()) if model in g)
    return [c for c in group if c != model]


def pairwise(predictions: Float[np.ndarray, "s R"], columns: list[str], y: np.ndarray) -> pd.DataFrame:
    """Returns the columns x columns matrix of mean normalised disagreement, each pair over
    the seeds where both gave a number: the control for the model's row."""
    scale = y_scale(y)
    p = np.asarray(predictions, np.float64)
    with np.errstate(invalid="ignore"):
        d = (p[:, :, None] - p[:, None, :]) ** 2 / scale
    ok = np.isfinite(d)
    count = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.where(ok, d, 0.0).sum(axis=0) / count, np.nan)
    return pd.DataFrame(mean, index=columns, columns=columns)


@dataclass(frozen=True)
class Indistinguishable:
    """Columns the data cannot tell apart: `equal`, the same number on every seed
    (`core.leaderboard.equivalence_groups`); `close`, groups whose every pair's mean
    normalised disagreement is at most `threshold`. Both list every column, singletons included."""

    equal: list[list[str]]
    close: list[list[str]]
    threshold: float

    def group_of(self, name: str, exact: bool = False) -> list[str]:
        """Returns the group holding `name`."""
        return next(g for g in (self.equal if exact else self.close) if name in g)


def indistinguishable(predictions: Float[np.ndarray, "s R"], columns: list[str], y: np.ndarray,
                      threshold: float = THRESHOLD) -> Indistinguishable:
    """Returns the groups of columns (the model included) that agree exactly, and those
    within `threshold` of each other pairwise (complete linkage, so no chaining: every
    two members of a group are within it; a pair never seen together counts as apart)."""
    equal = equivalence_groups(predictions, columns, keep_apart=())
    if len(columns) < 2:
        return Indistinguishable(equal, [list(columns)], threshold)
    d = pairwise(predictions, columns, y).to_numpy()
    d = np.where(np.isnan(d), np.inf, d)
    np.fill_diagonal(d, 0.0)
    # Exactly equal columns are one function whatever the threshold.
    for group in equal:
        idx = [columns.index(c) for c in group]
        d[np.ix_(idx, idx)] = 0.0
    finite_max = d[np.isfinite(d)].max(initial=0.0)
    dist = squareform(np.where(np.isinf(d), 2 * max(finite_max, threshold) + 1.0, d), checks=False)
    labels = fcluster(linkage(dist, method="complete"), t=threshold, criterion="distance")
    close: dict[int, list[str]] = {}
    for name, label in zip(columns, labels):
        close.setdefault(int(label), []).append(name)
    return Indistinguishable(equal, sorted(close.values(), key=lambda g: columns.index(g[0])), threshold)
