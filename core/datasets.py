"""Regression datasets of llm4regression (Vacareanu et al. 2024), deterministic per seed.

Per seed: draw `n_examples + 1` rows, round x to 2 decimals, compute y (from the
rounded x for the "original" sets), round y to 2 decimals, then
`train_test_split(test_size=1, random_state=seed)`. The in-context examples are
the train rows in that order; the query is the test row.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float
from sklearn.datasets import make_friedman1, make_friedman2, make_friedman3, make_regression
from sklearn.model_selection import train_test_split

from core.registry import Registry

DECIMALS = 2


@dataclass(frozen=True)
class Sample:
    """One seed's regression problem: the in-context examples and the query."""

    seed: int
    x_train: Float[np.ndarray, "n f"]
    y_train: Float[np.ndarray, " n"]
    x_query: Float[np.ndarray, " f"]
    y_true: float


@dataclass(frozen=True)
class Dataset:
    """A named generator of (x, y) rows; `draw(n_rows, seed)` returns unrounded-or-rounded rows."""

    name: str
    n_features: int
    draw: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
    description: str

    def sample(self, seed: int, n_examples: int) -> Sample:
        """Returns the seed's `n_examples` in-context rows and its query row."""
        x, y = self.draw(n_examples + 1, seed)
        y = np.round(y, DECIMALS)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=1, random_state=seed)
        return Sample(seed, x_tr.astype(np.float64), y_tr.astype(np.float64),
                      x_te[0].astype(np.float64), float(y_te[0]))


DATASETS: Registry[Dataset] = Registry("dataset")


def _sklearn(make: Callable[..., tuple[np.ndarray, np.ndarray]], **kwargs) -> Callable:
    # sklearn computes y from the unrounded x; only x and y are rounded.
    def draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = make(n_samples=n, noise=0.0, random_state=seed, **kwargs)
        return np.round(x, DECIMALS), y
    return draw


def _original(low: list[float], high: list[float], f: Callable[[np.ndarray], np.ndarray]) -> Callable:
    # Uniform within per-feature ranges; y is computed from the rounded x.
    lo, hi = np.asarray(low), np.asarray(high)

    def draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        u = np.random.RandomState(seed).uniform(size=(n, lo.size))
        x = np.round(lo + u * (hi - lo), DECIMALS)
        return x, f(x)
    return draw


def _original1(x: np.ndarray) -> np.ndarray:
    x0 = x[:, 0]
    return x0 + 10 * np.sin(5 * np.pi * x0 / 100) + 10 * np.cos(6 * np.pi * x0 / 100)


def _original2(x: np.ndarray) -> np.ndarray:
    x0, x1, x2, x3 = x.T
    return (x0**4 + (x1 * x2 - 2 / (np.sqrt(x1) * np.sqrt(x3))) ** 2) ** 0.75


def _original3(x: np.ndarray) -> np.ndarray:
    x0, x1, x2, x3 = x.T
    return np.exp(x0) + x1 * x2 / np.sqrt(x3) + (x3 * x0) ** 1.5


def _original4(x: np.ndarray) -> np.ndarray:
    x0, x1 = x.T
    return (x1 / 10) * np.sin(x0) + (x0 / 10) * np.cos(x1) + np.sqrt(x0) * np.log(x1) / (np.sqrt(x1) * np.log(x0))


def _original5(x: np.ndarray) -> np.ndarray:
    z = x / 10
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return 100 * (e / e.sum(axis=1, keepdims=True)).max(axis=1)


for _name, _n, _draw, _desc in [
    ("friedman1", 5, _sklearn(make_friedman1, n_features=5), "sklearn make_friedman1, 5 features"),
    ("friedman2", 4, _sklearn(make_friedman2), "sqrt(x0^2 + (x1 x2 - 1/(x1 x3))^2)"),
    ("friedman3", 4, _sklearn(make_friedman3), "arctan((x1 x2 - 1/(x1 x3)) / x0)"),
    ("original1", 1, _original([0], [100], _original1), "x + 10 sin(5 pi x/100) + 10 cos(6 pi x/100)"),
    ("original2", 4, _original([0, 4 * np.pi, 0, 1], [3, 56 * np.pi, 2, 11], _original2),
     "(x0^4 + (x1 x2 - 2/(sqrt(x1) sqrt(x3)))^2)^0.75"),
    ("original3", 4, _original([1, 1, 0, 1], [3, 10, 10, 20], _original3),
     "e^x0 + x1 x2 / sqrt(x3) + (x3 x0)^1.5"),
    ("original4", 2, _original([2, 2], [100, 100], _original4),
     "(x1/10) sin x0 + (x0/10) cos x1 + sqrt(x0) log x1 / (sqrt(x1) log x0)"),
    ("original5", 3, _original([-25] * 3, [25] * 3, _original5), "100 max(softmax(x/10))"),
]:
    DATASETS.register(_name, Dataset(_name, _n, _draw, _desc))

for _i, _t in [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]:
    DATASETS.register(
        f"linear-ni{_i}{_t}",
        Dataset(f"linear-ni{_i}{_t}", _t,
                _sklearn(make_regression, n_features=_t, n_informative=_i),
                f"make_regression: {_i} informative of {_t} features"),
    )
