"""The leaderboard: every regressor's error against the truth and against the model."""

import numpy as np
import pandas as pd
from jaxtyping import Float

from core.store import MODEL_COLUMN, RunStore


def abs_errors(predictions: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"]) -> Float[np.ndarray, "s R"]:
    """Returns |prediction - truth| per seed and column (NaN where the column failed)."""
    return np.abs(predictions - y_true[:, None])


def ranked_errors(predictions: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"]) -> Float[np.ndarray, "s R"]:
    """Returns |prediction - truth| with a failed answer's as infinity: it loses to any number."""
    err = abs_errors(predictions, y_true)
    return np.where(np.isnan(err), np.inf, err)


def leaderboard(predictions: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"],
                columns: list[str], reference: str = MODEL_COLUMN) -> pd.DataFrame:
    """Returns one row per column, sorted by mean squared error.

    - `mse_*`, `mae_*`: mean and median of the squared / absolute error over the seeds
      where that column gave a number; `failures`: seeds where it did not (NaN).
    - `beats_model`: share of seeds where its absolute error is smaller than the
      reference column's; a failure loses to any number, two failures tie (no win).
    - `avg_rank`: mean over seeds of its rank by absolute error among all columns
      (1 = best, ties share the average rank, failures rank last).
    """
    err = abs_errors(predictions, y_true)
    ranked = ranked_errors(predictions, y_true)
    ranks = pd.DataFrame(ranked).rank(axis=1, method="average").to_numpy()
    ref = ranked[:, columns.index(reference)]
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
        })
    return pd.DataFrame(rows).sort_values("mse_mean", na_position="last").reset_index(drop=True)


def store_leaderboard(store: RunStore) -> pd.DataFrame:
    """Returns the leaderboard over the finished seeds of a run store."""
    done = store.done()
    return leaderboard(store.predictions()[done], store.y_true()[done], store.columns)


SUBSETS = ("all", "model-better", "model-worse", "model-low-error")
SELECTION_BIAS = ("Chosen by the model's own error: the model looks better on this subset by construction, "
                  "so comparing it with the regressors here is biased (a flaw of the original analysis).")


def seed_subset(predictions: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"], columns: list[str],
                kind: str, versus: str | None = None) -> tuple[np.ndarray, str]:
    """Returns a boolean mask over seeds and a note saying how it was chosen.

    - `all`; `model-better` / `model-worse`: the model's absolute error is smaller /
      larger than regressor `versus`'s (a failed answer is worse than any number);
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
    regressor's (the baselines left out; a failed answer never wins)."""
    err = ranked_errors(predictions, y_true)
    others = [j for j, c in enumerate(columns) if c != MODEL_COLUMN and c not in baselines]
    if not others:
        return float("nan")
    return float((err[:, [columns.index(MODEL_COLUMN)]] < err[:, others]).all(1).mean())
