"""Prompt edits as an experiment: each edit of each seed's in-context data through the
model, and every regressor refit on the same edited data.

`apply_edit` turns an `EditSpec` into the edited task (`core.mechanism.edits`, values
rounded as a prompt writes them). `execute_edits` writes each seed's edited prompts in
the run's format and answers them with `run_prompts` beside the unedited prompt (the
clean baseline, in the same batch): an edit that keeps the token count reuses the seed's
clean KV cache up to its first changed token; one that changes it starts on that cache
at its first differing token and is flagged (`changed_length`).

The result's table has, beside the columns every experiment has
(`core.interventions.result`): `edited_truth`, the edited task's true answer where the
edit defines one (the seed's; plus c for `shift-y`; NaN where the query or the x's move),
which `abs_error` is against; `shift`, the model's answer minus its clean answer;
`changed_length`; `n_tokens`; and per regressor R `refit:R`, its answer refit on the
edited data, and `shift:R`, that minus its answer on the unedited data as the prompt
writes it (the baselines' `clean_refit:R`).
"""

import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from jaxtyping import Float

from core.interventions.executor import provenance, unit_answers
from core.interventions.metrics import normalized_effect
from core.interventions.plan import plan_edits
from core.interventions.result import Result
from core.interventions.spec import EditSpec, ExperimentRequest, InterventionError, content_hash
from core.mechanism import edits
from core.mechanism.lm import LMSubject, numbers, run_tasks, task_text
from core.mechanism.subjects import MechanismError, Task
from core.models import LoadedModel
from core.regressors import predict_named
from core.store import RunStore, now

# Edits after which the seed's true answer no longer answers the edited task.
MOVES_QUERY = ("scale-x", "scale-feature", "query")


def apply_edit(task: Task, edit: EditSpec, seed: int) -> Task:
    """Returns the edited task; random edits draw from a generator of (`edit.draw`, seed)."""
    rng = np.random.default_rng([edit.draw, seed])
    match edit.op:
        case "perturb-y":
            return edits.perturb_y(task, edit.example, edit.value)
        case "drop":
            return edits.drop(task, edit.example)
        case "replace":
            return edits.replace(task, edit.example, np.asarray(edit.x), edit.value)
        case "permute":
            return edits.permute(task, rng)
        case "duplicate":
            return edits.duplicate(task, edit.example)
        case "scale-x":
            return edits.scale_x(task, edit.value)
        case "scale-feature":
            return edits.scale_feature(task, edit.feature, edit.value)
        case "shift-y":
            return edits.shift_y(task, edit.value)
        case "shuffle-y":
            return edits.shuffle_y(task, rng)
        case "add-distractor":
            return edits.add_distractor(task, rng)
        case "prefix":
            return edits.prefix(task, edit.k)
        case "query":
            return edits.query_grid(task, np.asarray([edit.x]))[0]
    raise InterventionError(f"unknown edit {edit.op!r}")


def edited_truth(edit: EditSpec, truth: float) -> float:
    """Returns the edited task's true answer: the seed's, shifted with the y's, NaN where
    the query or the x's move (the store holds the function's value at its query only)."""
    if edit.op in MOVES_QUERY:
        return float("nan")
    return truth + edit.value if edit.op == "shift-y" else truth


def edited_prompt(store: RunStore, row: int, edit: EditSpec) -> tuple[str, str]:
    """Returns the prompt of the seed at store row `row` as the run wrote it, and as the edit writes it."""
    fmt = store.number_format()
    task = run_tasks(store, [row])[0]
    written = edits.rounded(task.x, task.y, task.q)
    return task_text(fmt, written), task_text(fmt, apply_edit(written, edit, store.seeds[row]))


def closest_regressors(summary: pd.DataFrame) -> pd.DataFrame:
    """Returns per edit of a prompt-edit result's summary: the model's mean shift with its
    interval, and the regressor whose mean shift is nearest it (with that shift)."""
    regs = [c for c in summary.columns if c.startswith("shift:") and not c.endswith(("_low", "_high"))]
    out = summary[["label", "n_units", "changed_length", "shift", "shift_low", "shift_high"]].reset_index(drop=True)
    values = summary[regs].to_numpy(dtype=float).reshape(len(summary), len(regs))
    gaps = np.abs(values - out[["shift"]].to_numpy(dtype=float))
    found = [int(np.nanargmin(g)) if np.isfinite(g).any() else None for g in gaps]
    out["closest_regressor"] = [regs[j].removeprefix("shift:") if j is not None else None for j in found]
    out["its_shift"] = [values[i, j] if j is not None else np.nan for i, j in enumerate(found)]
    return out


def refits(names: list[str], tasks: list[Task], seed: int) -> Float[np.ndarray, "m R"]:
    """Returns each regressor's answer refit on each task (NaN where a fit fails)."""
    return np.array([predict_named(names, t.x, t.y, t.q, seed) for t in tasks]).reshape(len(tasks), len(names))


def execute_edits(model: LoadedModel, store: RunStore, request: ExperimentRequest,
                  progress: Callable[[float, str], None] | None = None) -> Result:
    """Runs a prompt-edit experiment on a run store and returns its result (module docstring)."""
    started, t0 = now(), time.perf_counter()
    say = progress or (lambda f, s: None)
    exp = request.experiment.root
    p = plan_edits(store, exp)
    answers = unit_answers(store, request, p, model.tokenizer)
    subject = LMSubject.of_run(model, store, [u.target for u in p.units], readout=exp.readout)
    try:
        subject.check_tokenizer()
    except MechanismError as exc:
        raise InterventionError(str(exc)) from None
    y_true, seeds, names = store.y_true(), store.seeds, p.regressors
    n_units = len(p.units)
    table: dict[str, list] = {k: [] for k in ("cell", "unit", "target_seed", "source_seed", "draw", "logprob_diff",
                                              "logit_diff", "decoded_text", "decoded", "edited_truth", "abs_error",
                                              "shift", "changed_length", "n_tokens")}
    table.update({f"{col}:{r}": [] for col in ("refit", "shift") for r in names})
    base: dict[str, list] = {k: [] for k in ("unit", "target_seed", "truth", "clean_text", "clean_decoded",
                                             "m_clean", "m_corrupt", "clean_n_tokens",
                                             *(f"clean_refit:{r}" for r in names))}
    for u, unit in enumerate(p.units):
        seed, truth = seeds[unit.target], float(y_true[unit.target])
        written = edits.rounded(subject.bases[u].x, subject.bases[u].y, subject.bases[u].q)
        tasks = [apply_edit(written, e, seed) for e in p.cells]
        subject.progress = lambda f, s, u=u: say(0.9 * (u + f) / n_units, f"seed {seed} ({u + 1}/{n_units}): {s}")
        prompts = [subject.tokens[u]] + [subject.prompt(t) for t in tasks]
        out = subject.run(u, prompts, [subject.y_digits(written)] + [subject.y_digits(t) for t in tasks],
                          [answers[u]] * len(prompts))
        decoded = numbers(out)
        say(0.9 * (u + 1) / n_units, f"seed {seed}: refitting {len(names)} regressors on {len(tasks)} edits")
        fits = refits(names, [written, *tasks], seed)
        base["unit"].append(unit.label)
        base["target_seed"].append(seed)
        base["truth"].append(truth)
        base["clean_text"].append(out[0]["decoded_text"])
        base["clean_decoded"].append(decoded[0])
        base["m_clean"].append(out[0]["logprob_diff"])
        base["m_corrupt"].append(0.0)
        base["clean_n_tokens"].append(len(prompts[0]))
        for j, r in enumerate(names):
            base[f"clean_refit:{r}"].append(fits[0, j])
        for c, edit in enumerate(p.cells):
            o, want = out[c + 1], edited_truth(edit, truth)
            row = {"cell": c, "unit": unit.label, "target_seed": seed, "source_seed": -1, "draw": edit.draw,
                   "logprob_diff": o["logprob_diff"], "logit_diff": o["logit_diff"], "decoded_text": o["decoded_text"],
                   "decoded": decoded[c + 1], "edited_truth": want, "abs_error": abs(decoded[c + 1] - want),
                   "shift": decoded[c + 1] - decoded[0], "changed_length": not o["reused"],
                   "n_tokens": len(prompts[c + 1])}
            row.update({f"refit:{r}": fits[c + 1, j] for j, r in enumerate(names)})
            row.update({f"shift:{r}": fits[c + 1, j] - fits[0, j] for j, r in enumerate(names)})
            for k, v in row.items():
                table[k].append(v)
    units = np.array([r.unit for r in p.rows])
    norm, flagged = normalized_effect(np.array(table["logprob_diff"], dtype=float),
                                      np.array(base["m_clean"], dtype=float)[units], np.zeros(len(units)))
    table.update(normalized=norm.tolist(), flagged=flagged.tolist())
    table = {k: [float(v) if isinstance(v, np.floating) else v for v in col] for k, col in table.items()}
    base = {k: [float(v) if isinstance(v, np.floating) else v for v in col] for k, col in base.items()}
    notes = ["Normalised effect of an edit: m_edited / m_clean of the pair's log-probability difference (the seed's "
             "unedited candidates); 1 = the edit leaves the preference as it was, 0 = no preference left.",
             "shift: the answer on the edited prompt minus the answer on the unedited one, the model's and each "
             "regressor's (refit on the same edited data)."]
    changed = int(sum(table["changed_length"]))
    if changed:
        notes.append(f"{changed} of {len(p.rows)} rows changed the prompt's token count (changed_length): they ran "
                     "from their first differing token, not as a patch of the seed's run.")
    if any(e.op in MOVES_QUERY for e in p.cells):
        notes.append("Edits that move the query or rescale the x's have no true answer in the store: their "
                     "edited_truth and abs_error are NaN.")
    if flagged.any():
        notes.append(f"{int(flagged.sum())} rows have |m_clean| below the threshold: their normalised effect is "
                     "left out (NaN), never divided.")
    say(1.0, "done")
    return Result(hash=content_hash(request), request=request, cells=p.cells, table=table, baselines=base,
                  provenance=provenance(model, store, p, started, t0, prompts=subject.prompts_run,
                                        changed_length=subject.changed_length), notes=notes)
