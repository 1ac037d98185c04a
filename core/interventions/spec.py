"""Experiments as data: Pydantic models, JSON in and out, never pickle or code.

An experiment is a grid of cells. A cell is one intervention: a set of sites
(`resid_pre`, `attn_out`, `mlp_out` of a layer, or one head's output) at a set of
token positions, applied to one seed's prompt (ablation) or copied from a source
seed into a target seed (patching). Every cell runs on every seed (ablation) or
pair (patching): one batch row each.

Positions are named and resolved per seed from the run store (`core.interventions.positions`):
`final`, `slot[k]`, `y[k]`, `x[k][j]`, `all`; `stored` expands to one cell per stored
position (`acts/positions`: every answer slot, the final last).
"""

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

SCHEMA_VERSION = 1
SiteKind = Literal["resid_pre", "attn_out", "mlp_out", "head"]
SITE_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "head")


class InterventionError(ValueError):
    """An experiment that cannot run as asked; str() is one line (HTTP 422, CLI exit 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class SiteGrid(_Strict):
    """Sites of one kind: every listed layer (and head, for `head`); `all` = every one.

    `resid_pre` layer l is the residual stream entering layer l (l = n_layers: after the
    last layer, before the final norm); `attn_out` / `mlp_out` layer l are what layer l's
    attention / MLP adds; `head` (l, h) is head h's output through its slice of W_O.
    """

    kind: SiteKind
    layers: list[int] | Literal["all"] = "all"
    heads: list[int] | Literal["all"] | None = None


class Site(_Strict):
    """One site: a kind, a layer and (for `head`) a head."""

    kind: SiteKind
    layer: int
    head: int | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} L{self.layer}" + (f"H{self.head}" if self.head is not None else "")


class Cell(_Strict):
    """One intervention of the grid: these sites at these named positions."""

    sites: list[Site]
    positions: list[str]

    @property
    def label(self) -> str:
        return f"{' + '.join(s.label for s in self.sites)} @ {' + '.join(self.positions)}"


class Ablation(_Strict):
    """Ablate each cell (one site at one named position) on each seed, alone; `joint`:
    every site at every position together, one cell.

    - `zero`: the activation set to 0 (off-distribution: results say so);
    - `mean`: the mean over the run's finished seeds at the same position;
    - `resample`: another seed's activation at the same position, `n_resamples` draws
      (seeded by `resample_seed`), each its own row, averaged.
    `pair`: the two candidates (`truth`, `model` or a regressor) whose whole-answer
    log-probability difference is the metric.
    """

    kind: Literal["ablation"] = "ablation"
    method: Literal["zero", "mean", "resample"]
    sites: list[SiteGrid] = Field(min_length=1)
    positions: list[str] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    pair: tuple[str, str] = ("truth", "model")
    joint: bool = False
    decode: bool = True  # greedy answers under each intervention (sequential steps: the slow part)
    n_resamples: int = Field(default=3, ge=1, le=32)
    resample_seed: int = 0


class Patching(_Strict):
    """Activation patching for pairs (clean seed, corrupt seed).

    `denoising`: run the corrupt seed's prompt with the clean seed's activation patched
    in; `noising`: run the clean prompt with the corrupt one's. Metric: log p(clean
    answer) - log p(corrupt answer), the answers being the model's own clean answers on
    the two seeds as it wrote them (`answers="model"`), or the two seeds' true outputs in
    the run's number format (`answers="truth"`); normalised effect
    (m - m_corrupt) / (m_clean - m_corrupt).
    """

    kind: Literal["patching"] = "patching"
    direction: Literal["denoising", "noising"] = "denoising"
    answers: Literal["model", "truth"] = "model"
    decode: bool = True
    sites: list[SiteGrid] = Field(min_length=1)
    positions: list[str] = Field(min_length=1)
    pairs: list[tuple[int, int]] = Field(min_length=1)


class Experiment(RootModel[Annotated[Ablation | Patching, Field(discriminator="kind")]]):
    """An ablation or a patching experiment (discriminated by `kind`)."""


class ExperimentRequest(_Strict):
    """What a client sends: the run (store name under the server's cache) and the experiment."""

    schema_version: Literal[1] = SCHEMA_VERSION
    run: str
    experiment: Experiment


def code_version() -> str:
    """Returns a hash of the interventions code: results of other code are other results."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def content_hash(request: ExperimentRequest) -> str:
    """Returns the hash naming a result: same run + same experiment + same code = same result."""
    body = json.dumps({"request": request.model_dump(mode="json"), "code": code_version()}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]
