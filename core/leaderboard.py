"""The leaderboard: every regressor's error against the truth and against the model.

Float noise is not a difference: two errors on a seed are equal when they agree
within `REL_TOL` of the larger magnitude involved (`snap_ties`), so two
implementations of one estimator tie in every rank, win and subset; and estimators
whose predictions agree within `REL_TOL` on every seed are one estimator
(`equivalence_groups`), shown as one row. The mechanism lab's "indistinguishable"
verdicts use the same two functions.
"""

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float

from core.store import MODEL_COLUMN, RunStore

# Relative tolerance under which two numbers are the same number. Two least-squares
# solvers differ by ~1e-12 of the answer on the demo stores; a real difference between
# estimators on numbers rounded to 2 decimals is far above 1e-9.
REL_TOL = 1e-9


def agree(a: np.ndarray, b: np.ndarray, rel_tol: float = REL_TOL) -> np.ndarray:
    """Returns elementwise whether a and b are the same number within `rel_tol` of the
    larger magnitude (two NaNs agree: both failed; infinities agree with themselves)."""
    with np.errstate(invalid="ignore"):
        close = np.abs(a - b) <= rel_tol * np.maximum(np.abs(a), np.abs(b))
    return close | (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))


def abs_errors(predictions: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"]) -> Float[np.ndarray, "s R"]:
    """Returns |prediction - truth| per seed and column (NaN where the column failed)."""
    return np.abs(predictions - y_true[:, None])


def snap_ties(err: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"],
              rel_tol: float = REL_TOL) -> Float[np.ndarray, "s R"]:
    """Returns the errors with each seed's near-equal ones replaced by the smallest of their group.

    Per seed, errors sorted ascending start a new group where the gap to the previous
    one exceeds `rel_tol * (|y_true| + the larger error)`, a bound on the larger
    prediction's magnitude. Chaining makes equality transitive; infinities tie.
    """
    order = np.argsort(err, axis=1, kind="stable")
    e = np.take_along_axis(err, order, axis=1)
    with np.errstate(invalid="ignore"):
        gap = np.diff(e, axis=1)
        near = np.isfinite(e[:, 1:]) & (gap <= rel_tol * (np.abs(y_true)[:, None] + e[:, 1:]))
        tied = near | (np.isinf(e[:, 1:]) & np.isinf(e[:, :-1]))
    index = np.broadcast_to(np.arange(e.shape[1]), e.shape)
    start = np.concatenate([np.zeros((len(e), 1), bool), ~tied], axis=1) * index
    snapped = np.take_along_axis(e, np.maximum.accumulate(start, axis=1), axis=1)
    out = np.empty_like(err)
    np.put_along_axis(out, order, snapped, axis=1)
    return out


def ranked_errors(predictions: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"]) -> Float[np.ndarray, "s R"]:
    """Returns |prediction - truth| with a failed answer's as infinity (it loses to any
    number) and near-equal errors made equal (`snap_ties`): what every comparison uses."""
    err = abs_errors(predictions, y_true)
    return snap_ties(np.where(np.isnan(err), np.inf, err), y_true)


def equivalence_groups(predictions: Float[np.ndarray, "s R"], columns: list[str],
                       keep_apart: tuple[str, ...] = (MODEL_COLUMN,)) -> list[list[str]]:
    """Returns the columns grouped by equal predictions on every seed (`agree`), each group
    in column order, groups ordered by their first member; `keep_apart` columns stay alone.

    Groups are the connected components of "agree on every seed" (single linkage).
    With no seed, nothing is known to be equal: every column is alone.
    """
    parent = list(range(len(columns)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    if len(predictions):
        for i in range(len(columns)):
            for j in range(i + 1, len(columns)):
                if columns[i] in keep_apart or columns[j] in keep_apart:
                    continue
                if root(i) != root(j) and agree(predictions[:, i], predictions[:, j]).all():
                    parent[max(root(i), root(j))] = min(root(i), root(j))
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(columns):
        groups.setdefault(root(i), []).append(name)
    return list(groups.values())


def leaderboard(predictions: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"],
                columns: list[str], reference: str = MODEL_COLUMN, collapse: bool = False) -> pd.DataFrame:
    """Returns one row per column, sorted by mean squared error.

    - `mse_*`, `mae_*`: mean and median of the squared / absolute error over the seeds
      where that column gave a number; `failures`: seeds where it did not (NaN).
    - `beats_model`: share of seeds where its absolute error is smaller than the
      reference column's (equal within `REL_TOL` is no win); a failure loses to any
      number, two failures tie.
    - `avg_rank`: mean over seeds of its rank by absolute error among all columns
      (1 = best, ties within `REL_TOL` share the average rank, failures rank last).
    - `equivalent_to`: the other columns whose predictions equal this one's on every
      seed (`equivalence_groups`). `collapse=True` keeps one row per group, the first
      in column order.
    """
    err = abs_errors(predictions, y_true)
    ranked = ranked_errors(predictions, y_true)
    ranks = pd.DataFrame(ranked).rank(axis=1, method="average").to_numpy()
    ref = ranked[:, columns.index(reference)]
    groups = {name: group for group in equivalence_groups(predictions, columns) for name in group}
    rows = []
    for j, name in enumerate(columns):
        e = err[:, j]
        ok = e[~np.isnan(e)]
        rows.append({
            "regressor": name,
            "mse_mean": float(np.mean(ok**2)) if ok.size else np.nan,
            "mse_median": float(np.median(ok**2)) if ok.size else np.nan,
            "mae_mean": float(np.mean(ok)) if ok.size else np.nan,
            "mae_median": float(np.median(ok)) if ok.size else np.nan,
            "failures": int(np.isnan(e).sum()),
            "beats_model": float(np.mean(ranked[:, j] < ref)) if len(ref) else np.nan,
            "avg_rank": float(ranks[:, j].mean()) if len(ref) else np.nan,
            "equivalent_to": ", ".join(n for n in groups[name] if n != name),
        })
    table = pd.DataFrame(rows)
    if collapse:
        table = table[[groups[name][0] == name for name in columns]]
    return table.sort_values("mse_mean", na_position="last", kind="stable").reset_index(drop=True)


def store_leaderboard(store: RunStore, collapse: bool = False) -> pd.DataFrame:
    """Returns the leaderboard over the finished seeds of a run store."""
    done = store.done()
    return leaderboard(store.predictions()[done], store.y_true()[done], store.columns, collapse=collapse)


SUBSETS = ("all", "model-better", "model-worse", "model-low-error")
SELECTION_BIAS = ("Chosen by the model's own error: the model looks better on this subset by construction, "
                  "so comparing it with the regressors here is biased (a flaw of the original analysis).")


def seed_subset(predictions: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"], columns: list[str],
                kind: str, versus: str | None = None) -> tuple[Bool[np.ndarray, " s"], str]:
    """Returns a boolean mask over seeds and a note saying how it was chosen.

    - `all`; `model-better` / `model-worse`: the model's absolute error is smaller /
      larger than regressor `versus`'s (equal within `REL_TOL` is neither; a failed
      answer is worse than any number);
    - `model-low-error`: seeds where the model's error is at most its median (biased:
      the note says so).
    """
    err = ranked_errors(predictions, y_true)
    model = err[:, columns.index(MODEL_COLUMN)]
    if kind == "all":
        return np.ones(len(y_true), bool), "all seeds"
    if kind in ("model-better", "model-worse"):
        if versus not in columns or versus == MODEL_COLUMN:
            raise ValueError(f"subset {kind} needs a regressor to compare with, one of {', '.join(columns[1:])}")
        other = err[:, columns.index(versus)]
        mask = model < other if kind == "model-better" else model > other
        return mask, f"seeds where the model's absolute error is {'below' if kind == 'model-better' else 'above'} {versus}'s"
    if kind == "model-low-error":
        return model <= np.median(model), SELECTION_BIAS
    raise ValueError(f"unknown subset {kind!r}; use one of {', '.join(SUBSETS)}")


def beats_all(predictions: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"], columns: list[str],
              baselines: tuple[str, ...] = ("mean", "last", "random")) -> float:
    """Returns the share of seeds where the model's error is below every classical
    regressor's (the baselines left out; equal within `REL_TOL` is no win; a failed
    answer never wins)."""
    err = ranked_errors(predictions, y_true)
    others = [j for j, c in enumerate(columns) if c != MODEL_COLUMN and c not in baselines]
    if not others:
        return float("nan")
    return float((err[:, [columns.index(MODEL_COLUMN)]] < err[:, others]).all(1).mean())
