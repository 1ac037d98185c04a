"""The leaderboard: every regressor's error against the truth and against the model."""

import numpy as np
import pandas as pd
from jaxtyping import Float

from core.store import MODEL_COLUMN, RunStore


def abs_errors(predictions: Float[np.ndarray, "s R"], y_true: Float[np.ndarray, " s"]) -> Float[np.ndarray, "s R"]:
    """Returns |prediction - truth| per seed and column (NaN where the column failed)."""
    return np.abs(predictions - y_true[:, None])


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
    ranked = np.where(np.isnan(err), np.inf, err)
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
