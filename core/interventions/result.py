"""An experiment's result: per cell and unit (seed, or pair, or resample draw) the
metrics, the clean baselines per unit, and provenance. JSON over the wire.

Metrics of a row (`Result.table` columns):
- `logprob_diff`: log p(A) - log p(B) of the two whole answers, teacher-forced, under
  the intervention (ablation: the experiment's pair; patching: the clean seed's answer
  vs the corrupt seed's, the model's own clean answers);
- `logit_diff`: logit(A_k) - logit(B_k) at the first answer token k where A and B differ
  (NaN when they do not differ);
- `decoded_text`, `decoded`: the greedy answer under the intervention and its number;
  `abs_error`: |decoded - truth of the prompt's seed|;
- `normalized`: (m - m_corrupt) / (m_clean - m_corrupt) of `logprob_diff`, NaN with
  `flagged` where |m_clean - m_corrupt| < `DENOMINATOR_MIN` (never divided blindly).
  Ablation has no corrupt run: m_corrupt = 0 (no preference between A and B).
A prompt edit's cells are its edits, and its table adds the model's `shift` and each
regressor's refit answer and shift (`core.interventions.prompt_edits`).
"""

from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict

from core.interventions.spec import Cell, EditSpec, ExperimentRequest

DENOMINATOR_MIN = 0.1  # nats: below this the clean and corrupt runs barely differ
METRICS = ("logprob_diff", "logit_diff", "decoded", "abs_error", "normalized")


class Result(BaseModel):
    """A finished experiment (see the module docstring for the columns)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    hash: str
    request: ExperimentRequest
    cells: list[Cell | EditSpec]
    # One entry per row: cell index, unit label, target seed (whose prompt runs),
    # source seed (-1: none), draw, then the metrics.
    table: dict[str, list[Any]]
    # One entry per unit: its label, m_clean, m_corrupt, the clean greedy answers.
    baselines: dict[str, list[Any]]
    provenance: dict[str, Any]
    notes: list[str] = []

    def frame(self) -> pd.DataFrame:
        """Returns the per-row table with each cell's label and sites."""
        df = pd.DataFrame(self.table)
        labels = [c.label for c in self.cells]
        df.insert(1, "cell_label", [labels[i] for i in df["cell"]])
        return df

    def summary(self, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Returns per cell: its sites and positions (a prompt edit: its op), and per
        metric (a prompt edit's also: the shifts) the mean over units with a 95% percentile
        bootstrap interval (units resampled; NaN rows left out)."""
        from core.interventions.metrics import bootstrap_ci

        df = pd.DataFrame(self.table)
        metrics = [*METRICS, *(c for c in df.columns if c == "shift" or c.startswith("shift:"))]
        rows = []
        for i, cell in enumerate(self.cells):
            # Resample draws of one unit are averaged first: the unit is what is resampled.
            part = df[df["cell"] == i].groupby("unit", sort=False)[metrics].mean()
            row: dict[str, Any] = {"cell": i, "label": cell.label}
            if isinstance(cell, EditSpec):
                row.update(kind="edit", op=cell.op, changed_length=int(df.loc[df["cell"] == i, "changed_length"].sum()))
            else:
                site = cell.sites[0] if len(cell.sites) == 1 else None
                row.update(kind=site.kind if site else "joint", layer=site.layer if site else -1,
                           head=site.head if site and site.head is not None else -1,
                           position=" + ".join(cell.positions))
            row.update(n_units=len(part), flagged=int(df.loc[df["cell"] == i, "flagged"].sum()))
            for metric in metrics:
                mean, low, high = bootstrap_ci(part[metric].to_numpy(dtype=float), n_boot, seed)
                row.update({metric: mean, f"{metric}_low": low, f"{metric}_high": high})
            rows.append(row)
        return pd.DataFrame(rows)

    def baseline_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.baselines)
