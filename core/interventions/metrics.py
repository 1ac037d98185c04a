"""Aggregates of intervention metrics: the normalised effect and bootstrap intervals."""

import numpy as np
from jaxtyping import Bool, Float

from core.interventions.result import DENOMINATOR_MIN


def normalized_effect(m: Float[np.ndarray, " n"], m_clean: Float[np.ndarray, " n"], m_corrupt: Float[np.ndarray, " n"],
                      ) -> tuple[Float[np.ndarray, " n"], Bool[np.ndarray, " n"]]:
    """Returns (m - m_corrupt) / (m_clean - m_corrupt) and where the denominator is near
    zero (|.| < DENOMINATOR_MIN): there the effect is NaN and flagged, never divided."""
    den = np.asarray(m_clean, float) - np.asarray(m_corrupt, float)
    flagged = ~(np.abs(den) >= DENOMINATOR_MIN)  # NaN denominators are flagged too
    out = np.full(den.shape, np.nan)
    np.divide(np.asarray(m, float) - m_corrupt, den, out=out, where=~flagged)
    return out, flagged


def bootstrap_ci(values: Float[np.ndarray, " n"], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Returns the mean of the finite values and its percentile bootstrap interval
    (NaN, NaN, NaN without finite values; the mean twice for one value)."""
    v = values[np.isfinite(values)]
    if not len(v):
        return np.nan, np.nan, np.nan
    if len(v) == 1:
        return float(v[0]), float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    tail = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
