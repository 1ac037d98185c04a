"""Experiments as data: Pydantic models, JSON in and out, never pickle or code.

An experiment is a grid of cells. A cell is one intervention: a set of sites
(`resid_pre`, `attn_out`, `mlp_out` of a layer, or one head's output) at a set of
token positions, applied to one seed's prompt (ablation) or copied from a source
seed into a target seed (patching). Every cell runs on every seed (ablation) or
pair (patching): one batch row each.

Positions are named and resolved per seed from the run store (`core.interventions.positions`):
`final`, `slot[k]`, `y[k]`, `x[k][j]`, `all`; `stored` expands to one cell per stored
position (`acts/positions`: every answer slot, the final last).

A prompt edit changes the seed's in-context data instead of an activation: each cell
is one `EditSpec` (`core.interventions.prompt_edits` applies it), run on every seed.
"""

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

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


EditOp = Literal["perturb-y", "drop", "replace", "permute", "duplicate", "scale-x", "scale-feature", "shift-y",
                 "shuffle-y", "add-distractor", "prefix", "query"]
# What each edit reads: the fields it needs (any other given is refused, never ignored).
EDIT_FIELDS: dict[str, tuple[str, ...]] = {
    "perturb-y": ("example", "value"), "drop": ("example",), "replace": ("example", "x", "value"),
    "permute": ("draw",), "duplicate": ("example",), "scale-x": ("value",), "scale-feature": ("feature", "value"),
    "shift-y": ("value",), "shuffle-y": ("draw",), "add-distractor": ("draw",), "prefix": ("k",), "query": ("x",),
}


class EditSpec(_Strict):
    """One edit of a seed's in-context data (`core.mechanism.edits` does each):

    - `perturb-y`: y of `example` + `value`; `shift-y`: every y + `value`;
    - `drop` / `duplicate` `example` (the copy goes after the last example);
      `replace` `example` by (`x`, `value`);
    - `permute` the examples, `shuffle-y` the y's among them, `add-distractor` (one more
      feature): random, drawn per seed from (`draw`, seed);
    - `scale-x`: every x and the query times `value` (10: a decimal shift);
      `scale-feature`: `feature` times `value`;
    - `prefix`: only the first `k` examples; `query`: the query moved to `x`.
    """

    op: EditOp
    example: int | None = None
    feature: int | None = None
    value: float | None = None
    x: list[float] | None = None
    k: int | None = None
    draw: int = 0

    @model_validator(mode="after")
    def _fields_of_op(self) -> "EditSpec":
        wants = EDIT_FIELDS[self.op]
        given = {f for f in ("example", "feature", "value", "x", "k") if getattr(self, f) is not None}
        given |= {"draw"} if self.draw else set()
        if missing := [f for f in wants if f not in given and f != "draw"]:
            raise ValueError(f"edit {self.op} needs {' and '.join(missing)}")
        if extra := sorted(given - set(wants)):
            raise ValueError(f"edit {self.op} takes no {' or '.join(extra)} (it reads {', '.join(wants)})")
        if not all(math.isfinite(v) for v in [*(self.x or []), *([self.value] if self.value is not None else [])]):
            raise ValueError(f"edit {self.op}: every number must be finite")
        if self.op in ("scale-x", "scale-feature") and self.value == 0:
            raise ValueError(f"edit {self.op}: a factor of 0 erases the x's")
        return self

    @property
    def label(self) -> str:
        num = lambda v: f"{v:g}"  # noqa: E731
        vec = lambda: "(" + ", ".join(num(v) for v in self.x) + ")"  # noqa: E731
        return {
            "perturb-y": lambda: f"y[{self.example}] {self.value:+g}",
            "shift-y": lambda: f"y {self.value:+g}",
            "drop": lambda: f"drop example {self.example}",
            "duplicate": lambda: f"duplicate example {self.example}",
            "replace": lambda: f"example {self.example} := {vec()} -> {num(self.value)}",
            "permute": lambda: f"permute (draw {self.draw})",
            "shuffle-y": lambda: f"shuffle y (draw {self.draw})",
            "add-distractor": lambda: f"add distractor (draw {self.draw})",
            "scale-x": lambda: f"x * {num(self.value)}",
            "scale-feature": lambda: f"x[{self.feature}] * {num(self.value)}",
            "prefix": lambda: f"first {self.k} examples",
            "query": lambda: f"query := {vec()}",
        }[self.op]()


class PromptEdit(_Strict):
    """Each edit (a cell) of each seed's prompt, re-run: the model's teacher-forced
    log-probability difference of `pair` (the seed's unedited candidates, as for an
    ablation) and its greedy answer (`readout` `number`: within the run's number
    format), beside every regressor refit on the same edited data (`regressors`: the
    run's, or named ones). An edit that keeps the prompt's token count reuses the seed's
    clean KV cache up to its first changed token; one that changes it is flagged."""

    kind: Literal["edit"] = "edit"
    edits: list[EditSpec] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    pair: tuple[str, str] = ("truth", "model")
    regressors: list[str] | Literal["run"] = "run"
    readout: Literal["greedy", "number"] = "greedy"


class Experiment(RootModel[Annotated[Ablation | Patching | PromptEdit, Field(discriminator="kind")]]):
    """An ablation, a patching or a prompt-edit experiment (discriminated by `kind`)."""


class ExperimentRequest(_Strict):
    """What a client sends: the run (store name under the server's cache) and the experiment."""

    schema_version: Literal[1] = SCHEMA_VERSION
    run: str
    experiment: Experiment


def code_version() -> str:
    """Returns a hash of the interventions code and the prompt edits it runs: results of
    other code are other results."""
    h = hashlib.sha256()
    mechanism = Path(__file__).parent.parent / "mechanism"
    for path in sorted(Path(__file__).parent.glob("*.py")) + [mechanism / "edits.py", mechanism / "lm.py"]:
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def content_hash(request: ExperimentRequest) -> str:
    """Returns the hash naming a result: same run + same experiment + same code = same result."""
    body = json.dumps({"request": request.model_dump(mode="json"), "code": code_version()}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]
