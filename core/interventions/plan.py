"""An experiment checked against its run store and laid out as batch rows.

`plan` refuses what cannot run (one-line `InterventionError`): seeds not in the run or
not finished, layers or heads out of range, positions that do not parse, a patching or
mean / resample experiment on a run whose seeds do not share token positions, unknown
candidates. It expands the grid into cells, the cells into rows (one per cell and
unit, and per resample draw), and says what the rows cost in clean forward passes.
"""

from dataclasses import dataclass

import numpy as np

from core.candidates import TRUTH
from core.interventions import positions as named
from core.interventions.spec import (Ablation, Cell, EditSpec, ExperimentRequest, InterventionError, Patching,
                                     PromptEdit, Site, SiteGrid)
from core.regressors import UnknownName, get_regressor
from core.store import MODEL_COLUMN, RunStore


@dataclass(frozen=True)
class Unit:
    """What a cell is measured on: one seed (ablation) or one (clean, corrupt) pair.

    `prompts` are the store rows whose unpatched runs give the baselines: for an
    ablation the seed's own; for patching the clean seed's (m_clean) and the corrupt
    seed's (m_corrupt). `target` is the row whose prompt the interventions run on.
    """

    label: str
    target: int
    prompts: tuple[int, ...]


@dataclass(frozen=True)
class Row:
    """One batch row: a cell on a unit, patched from `source` (a store row, -1: none)."""

    cell: int
    unit: int
    draw: int
    source: int


@dataclass
class Plan:
    cells: list[Cell]
    units: list[Unit]
    rows: list[Row]
    clean_forwards: float  # the rows' cost in clean forward passes of one prompt
    n_tokens: int
    n_layers: int
    spans: named.Spans
    starts: dict[tuple[int, int], tuple[int, int]]  # (cell, prompt row) -> `start` of the cell there

    def start(self, row: Row) -> tuple[int, int]:
        """Returns (layer, position) from which `row` can change anything."""
        return self.starts[row.cell, self.units[row.unit].target]

    @property
    def n_rows(self) -> int:
        return len(self.rows)


@dataclass
class EditPlan:
    """A prompt-edit experiment's rows: each edit (cell) on each seed (unit)."""

    cells: list[EditSpec]
    units: list[Unit]
    rows: list[Row]
    regressors: list[str]
    clean_forwards: float  # at most: an edit that keeps the token count recomputes only its tail

    @property
    def n_rows(self) -> int:
        return len(self.rows)


def expand_sites(grid: SiteGrid, n_layers: int, n_heads: int) -> list[Site]:
    """Returns the grid's sites; raises InterventionError for a layer or head out of range."""
    top = n_layers if grid.kind == "resid_pre" else n_layers - 1
    layers = list(range(top + 1)) if grid.layers == "all" else list(grid.layers)
    for layer in layers:
        if not 0 <= layer <= top:
            raise InterventionError(f"{grid.kind} layer {layer} is out of range: the model has "
                                    f"{grid.kind} layers 0-{top}")
    if grid.kind != "head":
        if grid.heads is not None:
            raise InterventionError(f"heads are given for site kind {grid.kind}; only kind head has heads")
        return [Site(kind=grid.kind, layer=layer) for layer in layers]
    if grid.heads is None:
        raise InterventionError("site kind head needs heads (a list, or \"all\")")
    heads = list(range(n_heads)) if grid.heads == "all" else list(grid.heads)
    for head in heads:
        if not 0 <= head < n_heads:
            raise InterventionError(f"head {head} is out of range: the model has heads 0-{n_heads - 1}")
    return [Site(kind="head", layer=layer, head=head) for layer in layers for head in heads]


def _rows_of(store: RunStore, seeds: list[int], done: np.ndarray) -> list[int]:
    rows = []
    for seed in seeds:
        if seed not in store.seeds:
            raise InterventionError(f"seed {seed} is not in run {store.name} (seeds {store.seeds[0]}-{store.seeds[-1]})")
        row = store.seeds.index(seed)
        if not done[row]:
            raise InterventionError(f"seed {seed} of run {store.name} is not built yet")
        rows.append(row)
    return rows


def aligned(store: RunStore) -> bool:
    """True when every seed of the run has the same token length and value positions."""
    n = store.root["positions/n_tokens"][:]
    return store.attrs["prompt"]["format"] == "aligned" and len(set(n.tolist())) == 1


def start(cell: Cell, spans: named.Spans, row: int) -> tuple[int, int]:
    """Returns (layer, position) from which the cell can change anything on that prompt."""
    first = min(int(spans.resolve(row, p).min()) for p in cell.positions)
    return min(s.layer for s in cell.sites), first


def _check_pair(store: RunStore, pair: tuple[str, str]) -> None:
    candidates = [TRUTH, *store.columns]
    for name in pair:
        if name not in candidates:
            raise InterventionError(f"no candidate {name!r}; use truth, {MODEL_COLUMN} or a regressor of the run")
    if pair[0] == pair[1]:
        raise InterventionError("the pair names one candidate twice: their difference is zero")


def check_edit(edit: EditSpec, n_examples: int, n_features: int) -> None:
    """Raises InterventionError when the edit does not fit a run of these examples and features."""
    if edit.example is not None and not 0 <= edit.example < n_examples:
        raise InterventionError(f"{edit.op}: example {edit.example} is out of range: the run has examples "
                                f"0-{n_examples - 1}")
    if edit.feature is not None and not 0 <= edit.feature < n_features:
        raise InterventionError(f"{edit.op}: feature {edit.feature} is out of range: the run has features "
                                f"0-{n_features - 1}")
    if edit.x is not None and len(edit.x) != n_features:
        raise InterventionError(f"{edit.op}: x has {len(edit.x)} values; the run's examples have {n_features} "
                                "features")
    if edit.k is not None and not 1 <= edit.k <= n_examples:
        raise InterventionError(f"prefix: k = {edit.k} is out of range: keep 1-{n_examples} examples")
    if edit.op == "drop" and n_examples < 2:
        raise InterventionError("drop: the run has one example; dropping it leaves no data")


def plan_edits(store: RunStore, exp: PromptEdit) -> EditPlan:
    """Returns a prompt-edit experiment's rows; raises InterventionError for what cannot run."""
    data = store.attrs["dataset"]
    for edit in exp.edits:
        check_edit(edit, data["n_examples"], data["n_features"])
    _check_pair(store, exp.pair)
    names = [c for c in store.columns if c != MODEL_COLUMN] if exp.regressors == "run" else list(exp.regressors)
    for name in names:
        try:
            get_regressor(name)
        except UnknownName as exc:
            raise InterventionError(exc.args[0]) from None
    if exp.readout == "number" and store.attrs["prompt"]["format"] != "aligned":
        raise InterventionError(f"the number readout needs a run in the aligned format; {store.name} is "
                                f"{store.attrs['prompt']['format']}")
    seeds = _rows_of(store, exp.seeds, store.done())
    units = [Unit(f"seed {store.seeds[row]}", row, (row,)) for row in seeds]
    rows = [Row(c, u, 0, -1) for u in range(len(units)) for c in range(len(exp.edits))]
    return EditPlan(list(exp.edits), units, rows, names, float(len(rows) + len(units)))


def plan(store: RunStore, request: ExperimentRequest, model_info: dict) -> Plan | EditPlan:
    """Returns the experiment's rows on this store; raises InterventionError for what cannot run."""
    exp = request.experiment.root
    if isinstance(exp, PromptEdit):
        return plan_edits(store, exp)
    a = store.attrs
    n_layers, n_heads = int(model_info["n_layers"]), int(model_info["n_heads"])
    n_examples, n_features = a["dataset"]["n_examples"], a["dataset"]["n_features"]
    for name in exp.positions:
        if name != "stored":
            named.check(name, n_examples, n_features)
    sites = [s for grid in exp.sites for s in expand_sites(grid, n_layers, n_heads)]
    places = named.expand(exp.positions, n_examples)
    if isinstance(exp, Ablation) and exp.joint:
        cells = [Cell(sites=sites, positions=places)]
    else:
        cells = [Cell(sites=[s], positions=[p]) for s in sites for p in places]
    done = store.done()
    needs_alignment = isinstance(exp, Patching) or exp.method != "zero"
    if needs_alignment and not aligned(store):
        what = "patching" if isinstance(exp, Patching) else f"{exp.method} ablation"
        raise InterventionError(f"{what} needs every seed at the same token positions; run {store.name} is "
                                f"{a['prompt']['format']}-format with prompts of different lengths (use an aligned run)")

    rows: list[Row] = []
    units: list[Unit] = []
    if isinstance(exp, Ablation):
        _check_pair(store, exp.pair)
        seeds = _rows_of(store, exp.seeds, done)
        finished = np.nonzero(done)[0]
        if exp.method == "resample" and len(finished) < 2:
            raise InterventionError("resample ablation needs at least two finished seeds")
        rng = np.random.default_rng(exp.resample_seed)
        for u, row in enumerate(seeds):
            units.append(Unit(f"seed {store.seeds[row]}", row, (row,)))
            draws = exp.n_resamples if exp.method == "resample" else 1
            sources = [int(rng.choice(finished[finished != row])) if exp.method == "resample" else -1
                       for _ in range(draws)]
            rows += [Row(c, u, d, src) for c in range(len(cells)) for d, src in enumerate(sources)]
    else:
        for u, (clean, corrupt) in enumerate(exp.pairs):
            c_row, r_row = _rows_of(store, [clean, corrupt], done)
            target, source = (r_row, c_row) if exp.direction == "denoising" else (c_row, r_row)
            units.append(Unit(f"{clean}->{corrupt}", target, (c_row, r_row)))
            rows += [Row(c, u, 0, source) for c in range(len(cells))]

    spans = named.Spans(store)
    n_tokens = int(spans.n_tokens[units[0].target])
    starts = {(c, u.target): start(cell, spans, u.target) for c, cell in enumerate(cells) for u in units}
    cost = 0.0
    for r in rows:
        layer, pos = starts[r.cell, units[r.unit].target]
        cost += (n_layers - layer) / n_layers * (n_tokens - pos) / n_tokens
    clean_seeds = {p for u in units for p in u.prompts} | {r.source for r in rows if r.source >= 0}
    if isinstance(exp, Ablation) and exp.method == "mean":
        clean_seeds |= set(np.nonzero(done)[0].tolist())
    return Plan(cells, units, rows, cost + len(clean_seeds), n_tokens, n_layers, spans, starts)
