"""Named token positions, resolved per seed from the run store's `positions/`.

- `final`: the prompt's last token (the query's answer slot, where the answer is predicted);
- `slot[k]`: example k's answer slot, the space after `Output:` (k = n: `final`);
- `y[k]`: example k's output value, its tokens with the space before them (k < n);
- `x[k][j]`: feature j of example k, likewise (k = n: the query);
- `all`: every token of the prompt;
- `stored` (a grid, not one position): one cell per stored position (`acts/positions`),
  named `slot[0]` ... `slot[n-1]`, `final`.
"""

import re

import numpy as np
from jaxtyping import Int

from core.interventions.spec import InterventionError
from core.store import RunStore

_NAME = re.compile(r"final|all|slot\[(\d+)\]|y\[(\d+)\]|x\[(\d+)\]\[(\d+)\]")


class PositionError(InterventionError):
    """A position name that does not parse or is out of range; str() is one line."""


def expand(names: list[str], n_examples: int) -> list[str]:
    """Returns the names with `stored` replaced by every stored position's name."""
    out: list[str] = []
    for name in names:
        out += [f"slot[{k}]" for k in range(n_examples)] + ["final"] if name == "stored" else [name]
    return out


def check(name: str, n_examples: int, n_features: int) -> None:
    """Raises PositionError unless `name` names a position of a run of this shape."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise PositionError(f"position {name!r} does not parse; use final, all, stored, slot[k], y[k] or x[k][j]")
    slot, y, xk, xj = m.groups()
    n, f = n_examples, n_features
    if slot is not None and int(slot) > n:
        raise PositionError(f"position {name}: examples are 0-{n - 1} and the query is {n}")
    if y is not None and int(y) >= n:
        raise PositionError(f"position {name}: output values are y[0]-y[{n - 1}] (the query has none)")
    if xk is not None and (int(xk) > n or int(xj) >= f):
        raise PositionError(f"position {name}: x[k][j] needs k <= {n} and j < {f}")


class Spans:
    """A run store's `positions/` arrays, read once; `resolve` names positions from them."""

    def __init__(self, store: RunStore) -> None:
        g = store.root["positions"]
        self.x, self.y = g["x"][:], g["y"][:]
        self.slots, self.final, self.n_tokens = g["answer_slots"][:], g["final"][:], g["n_tokens"][:]
        self.n_examples, self.n_features = self.y.shape[1], self.x.shape[2]

    def resolve(self, row: int, name: str) -> Int[np.ndarray, " p"]:
        """Returns the token positions `name` covers in the prompt of store row `row`."""
        check(name, self.n_examples, self.n_features)
        slot, y, xk, xj = _NAME.fullmatch(name).groups()
        if name == "final":
            return np.array([int(self.final[row])])
        if name == "all":
            return np.arange(int(self.n_tokens[row]))
        if slot is not None:
            return np.array([int(self.slots[row, int(slot)])])
        start, stop = self.y[row, int(y)] if y is not None else self.x[row, int(xk), int(xj)]
        return np.arange(int(start), int(stop))
