"""Every table the app charts, as a function of a run store and a view.

The app lays these out; `python -m cache_builder export` writes the same tables as
CSV. Only finished seeds are used; `View.subset` then selects among them
(`core.leaderboard.seed_subset`).
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.candidates import TRUTH
from core.heads import HEAD_SCORES
from core.leaderboard import abs_errors, leaderboard, seed_subset
from core.logit_diff import Candidates, PairDiff, pair_logit_diff
from core.probes import probe, probe_targets
from core.store import MODEL_COLUMN, RunStore, StoreError


@dataclass(frozen=True)
class View:
    """What a page shows: a candidate pair, a seed subset, one seed."""

    a: str = TRUTH
    b: str = MODEL_COLUMN
    subset: str = "all"
    versus: str | None = None  # the regressor of the model-better / model-worse subsets
    seed: int | None = None
    layer: int = 0  # the attention view's layer


def find_runs(cache_dir: str | Path) -> list[Path]:
    """Returns the run stores (`*.zarr` directories) under `cache_dir`, by name."""
    root = Path(cache_dir)
    return sorted(p for p in root.glob("*.zarr") if p.is_dir()) if root.is_dir() else []


def runs_table(cache_dir: str | Path) -> pd.DataFrame:
    """Returns one row per run store under `cache_dir`: what it holds, or why it cannot be read."""
    rows = []
    for path in find_runs(cache_dir):
        try:
            store = RunStore.open(path)
        except StoreError as exc:
            rows.append({"run": path.name, "status": str(exc)})
            continue
        a, done = store.attrs, store.done()
        rows.append({"run": path.name, "model": a["model"].get("name"), "dataset": a["dataset"]["name"],
                     "n_examples": a["dataset"]["n_examples"], "format": a["prompt"]["format"],
                     "seeds_done": int(done.sum()), "seeds": len(done),
                     "status": "complete" if done.all() else "partial (build still running or stopped)"})
    return pd.DataFrame(rows)


def finished(store: RunStore) -> np.ndarray:
    """Returns the store rows of the finished seeds."""
    return np.nonzero(store.done())[0]


def subset_rows(store: RunStore, view: View) -> tuple[np.ndarray, str]:
    """Returns the store rows of the view's subset of the finished seeds, and its note.

    Every table reads `done` once, here: a build still running may finish seeds meanwhile.
    """
    rows = finished(store)
    mask, note = seed_subset(store.predictions()[rows], store.y_true()[rows], store.columns, view.subset,
                             view.versus)
    return rows[mask], note


def seed_row(store: RunStore, view: View) -> int:
    """Returns the store row of the view's seed (default: the first finished one)."""
    rows = finished(store)
    if not len(rows):
        raise StoreError(f"{store.name} has no finished seed yet")
    row = rows[0] if view.seed is None else store.index(view.seed)
    if not store.done()[row]:
        raise StoreError(f"seed {view.seed} of {store.name} is not built yet")
    return int(row)


# Prompt


def prompt_tokens(store: RunStore, view: View) -> pd.DataFrame:
    """Returns the seed's prompt, one row per token: text, role and whether activations are stored there."""
    row = seed_row(store, view)
    tokens = store.tokens(row)
    role = np.full(len(tokens), "", dtype=object)
    g = store.root["positions"]
    for (a, b) in g["x"][row].reshape(-1, 2):
        role[a:b] = "feature value"
    for (a, b) in g["y"][row]:
        role[a:b] = "answer value"
    role[g["answer_slots"][row]] = "answer slot"
    role[int(g["final"][row])] = "final (query's answer slot)"
    stored = np.isin(np.arange(len(tokens)), store.act_positions(row))
    return pd.DataFrame({"position": np.arange(len(tokens)), "token_id": tokens,
                         "text": store.decode(tokens), "role": role, "stored": stored})


def seed_answers(store: RunStore, view: View, cands: Candidates) -> pd.DataFrame:
    """Returns every candidate's answer for the seed: value, error, text as tokenized and
    log-probability of the whole answer under the model (teacher-forced)."""
    row = seed_row(store, view)
    if row not in cands.rows:
        raise StoreError(f"seed {store.seeds[row]} finished after the candidates were read; load the page again")
    i = int(np.nonzero(cands.rows == row)[0][0])
    values = np.concatenate([[store.y_true()[row]], store.predictions()[row]])
    out = []
    for j, name in enumerate(cands.names):
        toks = cands.tokens[i, j]
        toks = toks[toks >= 0]
        out.append({"candidate": name, "value": values[j], "abs_error": abs(values[j] - values[0]),
                    "answer_tokens": "|".join(store.decode(toks)),
                    "answer_logprob": float(cands.logprob[i, j, : len(toks)].sum()) if len(toks) else np.nan})
    table = pd.DataFrame(out)
    table.loc[0, "abs_error"] = np.nan
    return table


# Leaderboard


def leaderboard_table(store: RunStore, view: View, collapse: bool = False) -> pd.DataFrame:
    """Returns the leaderboard over the view's seeds (`core.leaderboard.leaderboard`);
    `collapse`: one row per group of equivalent estimators."""
    rows = subset_rows(store, view)[0]
    return leaderboard(store.predictions()[rows], store.y_true()[rows], store.columns, collapse=collapse)


def seed_errors(store: RunStore, view: View) -> pd.DataFrame:
    """Returns each seed's absolute error per column, long format (NaN: failed answer)."""
    rows = subset_rows(store, view)[0]
    err = abs_errors(store.predictions()[rows], store.y_true()[rows])
    seeds = np.asarray(store.seeds)[rows]
    return pd.DataFrame({"seed": np.repeat(seeds, err.shape[1]), "regressor": np.tile(store.columns, len(rows)),
                         "abs_error": err.ravel()})


# Logit difference


def pair_diff(store: RunStore, view: View, cands: Candidates) -> PairDiff:
    """Returns the view's pair's logit difference over its seeds (`core.logit_diff`)."""
    return pair_logit_diff(cands, view.a, view.b, np.isin(cands.rows, subset_rows(store, view)[0]))


def lens_table(diff: PairDiff) -> pd.DataFrame:
    """Returns the logit lens per seed and layer (layer L: the model's logits), long format."""
    s, n = diff.lens.shape
    return pd.DataFrame({"seed": np.repeat(diff.seeds, n), "layer": np.tile(np.arange(n), s),
                         "logit_diff": diff.lens.ravel(), "status": np.repeat(diff.status, n)})


def spread(values: np.ndarray, index: pd.Index) -> pd.DataFrame:
    """Returns mean, standard deviation, quartiles and count over seeds (axis 0), NaN left out."""
    ok = ~np.isnan(values).all(tuple(range(1, values.ndim))) if values.ndim > 1 else ~np.isnan(values)
    v = values[ok]
    if not len(v):
        return pd.DataFrame({"mean": np.nan, "std": np.nan, "q25": np.nan, "q75": np.nan, "n_seeds": 0}, index=index)
    return pd.DataFrame({"mean": v.mean(0).ravel(), "std": v.std(0).ravel(), "q25": np.quantile(v, .25, 0).ravel(),
                         "q75": np.quantile(v, .75, 0).ravel(), "n_seeds": len(v)}, index=index)


def lens_summary(diff: PairDiff) -> pd.DataFrame:
    """Returns the logit lens's mean and spread over seeds, per layer."""
    return spread(diff.lens, pd.RangeIndex(diff.lens.shape[1], name="layer")).reset_index()


def component_summary(diff: PairDiff) -> pd.DataFrame:
    """Returns each component's direct contribution (embedding, each layer's attention and MLP), mean and spread."""
    n_layers = diff.attn.shape[1]
    parts = [diff.embed[:, None], np.stack([diff.attn, diff.mlp], 2).reshape(len(diff.seeds), 2 * n_layers)]
    index = pd.MultiIndex.from_tuples([("embed", -1)] + [(k, l) for l in range(n_layers) for k in ("attn", "mlp")],
                                      names=["component", "layer"])
    return spread(np.concatenate(parts, 1), index).reset_index()


def head_summary(diff: PairDiff) -> pd.DataFrame:
    """Returns each head's direct contribution at the final position, mean and spread."""
    n_layers, n_heads = diff.heads.shape[1:]
    index = pd.MultiIndex.from_product([range(n_layers), range(n_heads)], names=["layer", "head"])
    return spread(diff.heads, index).reset_index()


def pair_status(diff: PairDiff) -> pd.DataFrame:
    """Returns per seed whether the pair could be compared, at which answer token, and the
    whole-answer log-probability difference."""
    return pd.DataFrame({"seed": diff.seeds, "status": diff.status, "first_differing_token": diff.step,
                         "token_a": diff.token_a, "token_b": diff.token_b,
                         "final_logit_diff": diff.lens[:, -1], "answer_logprob_diff": diff.answer_logprob})


# Attention and MLP


def head_scores_table(store: RunStore, view: View) -> pd.DataFrame:
    """Returns per head the mean over the view's seeds of each `core.heads` score, ranked by
    attention to answer values minus attention to feature values."""
    rows = subset_rows(store, view)[0]
    scores = store.root["summary/head_scores"][:][rows].mean(0)  # [4, L, H]
    n_layers, n_heads = scores.shape[1:]
    table = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), n_heads), "head": np.tile(np.arange(n_heads), n_layers),
                          **{name: scores[k].ravel() for k, name in enumerate(HEAD_SCORES)}})
    table["answer_minus_feature"] = table["answer_values"] - table["feature_values"]
    return table.sort_values("answer_minus_feature", ascending=False).reset_index(drop=True)


def final_attention(store: RunStore, view: View) -> pd.DataFrame:
    """Returns the attention of the final position over the seed's tokens, one column per head."""
    row = seed_row(store, view)
    n_layers = store.attrs["model"]["n_layers"]
    if not 0 <= view.layer < n_layers:
        raise ValueError(f"layer {view.layer} is out of range: the model has layers 0-{n_layers - 1}")
    n = len(store.tokens(row))
    rows = store.attn_rows(row, view.layer)[:, -1, :n]  # [H, T]
    return pd.DataFrame(rows.T, columns=[f"L{view.layer}H{h}" for h in range(rows.shape[0])]).rename_axis("position")


def mlp_table(store: RunStore, view: View, diff: PairDiff) -> pd.DataFrame:
    """Returns per layer: the MLP's direct contribution to the pair's logit difference (mean,
    spread) and its output norm at the in-context answer slots and at the final position."""
    rows = subset_rows(store, view)[0]
    norms = store.root["summary/mlp_norm"][:][rows]  # [s, L, P]
    n_layers = norms.shape[1]
    table = spread(diff.mlp, pd.RangeIndex(n_layers, name="layer")).add_prefix("logit_diff_").reset_index()
    table["norm_answer_slots"] = norms[:, :, :-1].mean((0, 2))
    table["norm_final"] = norms[:, :, -1].mean(0)
    return table


# Probes


def probe_table(store: RunStore, view: View) -> pd.DataFrame:
    """Returns per layer and target the held-out R^2 of a ridge probe from the residual
    stream at the final position (`core.probes`), with its constant baseline and status."""
    rows = subset_rows(store, view)[0]
    r = store.root
    targets = probe_targets(store.predictions()[rows], store.columns, store.y_true()[rows],
                            r["x_train"][:][rows], r["y_train"][:][rows])
    resid = r["summary/final_resid"][:][rows]  # [s, L+1, d]
    y = targets.to_numpy()
    out = []
    for layer in range(resid.shape[1]):
        res = probe(resid[:, layer], y)
        out.append(pd.DataFrame({"layer": layer, "target": targets.columns, "r2": res.r2,
                                 "constant_r2": res.constant_r2, "alpha": res.alpha, "n_seeds": res.n_seeds,
                                 "status": res.status}))
    return pd.concat(out, ignore_index=True)


# The CLI's export: table name -> function of (store, view, candidates).
EXPORTS: dict[str, Callable[..., pd.DataFrame]] = {
    "runs": lambda store, view, cands: runs_table(Path(str(store.path)).parent),
    "prompt": lambda store, view, cands: prompt_tokens(store, view),
    "answers": lambda store, view, cands: seed_answers(store, view, cands),
    "leaderboard": lambda store, view, cands: leaderboard_table(store, view),
    "seed-errors": lambda store, view, cands: seed_errors(store, view),
    "logit-lens": lambda store, view, cands: lens_table(pair_diff(store, view, cands)),
    "logit-lens-summary": lambda store, view, cands: lens_summary(pair_diff(store, view, cands)),
    "components": lambda store, view, cands: component_summary(pair_diff(store, view, cands)),
    "heads-dla": lambda store, view, cands: head_summary(pair_diff(store, view, cands)),
    "pair-status": lambda store, view, cands: pair_status(pair_diff(store, view, cands)),
    "attention": lambda store, view, cands: final_attention(store, view).reset_index(),
    "head-scores": lambda store, view, cands: head_scores_table(store, view),
    "mlp": lambda store, view, cands: mlp_table(store, view, pair_diff(store, view, cands)),
    "probes": lambda store, view, cands: probe_table(store, view),
}
