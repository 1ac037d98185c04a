"""`python -m cache_builder build | consolidate | leaderboard | export | info | serve | intervene`:
one-line errors, exit code 2."""

import argparse
import errno
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ValidationError
from tqdm import tqdm

from cache_builder.build import DEFAULT_CACHE, BuildError, BuildSpec, build, consolidate
from core.candidates import TRUTH
from core.interventions import archive
from core.interventions.client import HttpBackend, ServerError, describe_validation_error
from core.interventions.spec import ExperimentRequest, InterventionError, content_hash
from core.leaderboard import REL_TOL, SUBSETS, store_leaderboard
from core.logit_diff import load_candidates
from core.mechanism.subjects import MechanismError
from core.models import ModelUnavailable
from core.prompts import FORMATS, PromptError
from core.registry import UnknownName
from core.regressors import default_suite
from core.store import MODEL_COLUMN, RunStore, StoreError, describe
from core.tables import EXPORTS, View, subset_rows

EXIT_BAD_INPUT = 2
EXPERIMENT_TABLES = ("experiments", "experiment-summary", "experiment-rows")
TOKEN_ENV = "WORKBENCH_TOKEN"


class CliError(Exception):
    """A bad argument; str() is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise CliError(message)


def parse_seeds(text: str) -> list[int]:
    """Parses `0-99`, `3`, `0,5,10-12` into a list of seeds in the order given."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            start, stop = int(lo), int(hi) if sep else int(lo)
            if stop < start:
                raise ValueError
            seeds.extend(range(start, stop + 1))
    except ValueError:
        raise CliError(f"seed range {text!r} does not parse; use e.g. 0-99 or 0,3,10-19") from None
    if len(set(seeds)) != len(seeds):
        raise CliError(f"seed range {text!r} names a seed twice")
    return seeds


def parse_shard(text: str) -> tuple[int, int]:
    """Parses `I/N` (this process builds every N-th batch, starting at batch I)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise CliError(f"shard {text!r} does not parse; use I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise CliError(f"shard {text} is out of range: use I/N with 0 <= I < N")
    return i, n


def resolve_run(run: str, cache: Path) -> str:
    """A run is a store path or URL, or a store name under the cache directory."""
    if "://" in run:
        return run
    for candidate in (Path(run), cache / run, cache / f"{run}.zarr"):
        if candidate.exists():
            return str(candidate)
    raise StoreError(f"no run store {run!r} (looked at {run} and under {cache})")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m cache_builder", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="run a model and the regressors over seeds into a run store")
    b.add_argument("--model", required=True, help="smollm2-135m, tiny-random-llama, a HF id or a directory")
    b.add_argument("--dataset", required=True)
    b.add_argument("--n-examples", required=True, type=int)
    b.add_argument("--seeds", required=True, help="e.g. 0-99")
    b.add_argument("--out", default=str(DEFAULT_CACHE), help="cache directory or fsspec URL (default: cache/)")
    b.add_argument("--format", choices=FORMATS, default="aligned", help="number format of the prompt")
    b.add_argument("--regressors", help="comma-separated names (default: the whole suite)")
    b.add_argument("--batch-size", type=int, help="default: the stored run's on resume, else 4 on "
                   "the CPU and sized to free memory on a GPU")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    b.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    b.add_argument("--shard", default="0/1", help="I/N: build every N-th batch from batch I "
                   "(N processes fill one store; the last to finish closes it)")
    b.add_argument("--max-seeds", type=int, help="build at most K more seeds now (whole batches, at least one), "
                   "then stop; the same command without it builds the rest")
    b.add_argument("--acts", default="all", help="activation arrays to store: all, none, or some of resid, attn_out, "
                   "mlp_out, head_out, attn_rows (attn_rows:final: the final position's rows only); "
                   "summaries are computed either way")
    b.add_argument("--regressor-workers", type=int, help="regressor processes beside the model (0: inline; "
                   "default: every core but one on a GPU host, inline on the CPU)")
    b.add_argument("--write-workers", type=int, help="threads that summarise, compress and write seeds while "
                   "the next batch runs (0: inline; default: up to 8 on a GPU host, 1 on the CPU)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("consolidate", help="close a sharded build once every shard is done")
    c.add_argument("run")
    c.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    lb = sub.add_parser("leaderboard", help="per-regressor errors of a run")
    lb.add_argument("run", help="store path or name under --cache")
    lb.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    lb.add_argument("--csv", action="store_true", help="print CSV (every estimator's row) instead of a table")
    ex = sub.add_parser("export", help="write one of the app's tables as CSV (README: 'Exporting')")
    ex.add_argument("run", help="store path or name under --cache")
    ex.add_argument("table", help=", ".join([*EXPORTS, *EXPERIMENT_TABLES, "mechanism-<lab table>"]))
    ex.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ex.add_argument("--pair", default=f"{TRUTH},{MODEL_COLUMN}", help="A,B: candidates of the logit difference")
    ex.add_argument("--subset", default="all", help=", ".join(SUBSETS))
    ex.add_argument("--versus", help="the regressor of the model-better / model-worse subsets")
    ex.add_argument("--seed", type=int, help="the seed of the prompt, answers and attention tables")
    ex.add_argument("--layer", type=int, default=0, help="the layer of the attention table")
    ex.add_argument("--experiment", help="HASH (or a unique prefix) of a finished experiment: the "
                    "experiment-summary and experiment-rows tables")
    ex.add_argument("--subject", help="the mechanism tables' subject: its --model (default: the run's model)")
    ex.add_argument("--out", help="CSV file (default: standard output)")
    info = sub.add_parser("info", help="describe a run store")
    info.add_argument("run")
    info.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    sv = sub.add_parser("serve", help="serve a model's live interventions over HTTP (one job at a time)")
    sv.add_argument("--model", required=True, help="the model the run stores were built with")
    sv.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="the run stores' directory")
    sv.add_argument("--host", default="127.0.0.1", help="any address but a loopback one needs --token-file")
    sv.add_argument("--port", type=int, default=8765)
    sv.add_argument("--token-file", help="file holding the token clients send as 'Authorization: Bearer'")
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    sv.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    sv.add_argument("--max-units", type=int, default=64, help="most seeds or pairs per experiment")
    sv.add_argument("--max-clean-forwards", type=float, default=20000,
                    help="most clean-forward-pass equivalents per experiment")
    sv.add_argument("--max-body-kb", type=int, default=256, help="largest request body")
    iv = sub.add_parser("intervene", help="run an ablation, patching or prompt-edit experiment on a run (README: "
                        "'Live interventions')")
    iv.add_argument("run", help="run store name under --cache")
    iv.add_argument("spec", help="JSON file holding the experiment: {\"kind\": \"ablation\" | \"patching\" | "
                    "\"edit\", ...}")
    iv.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    iv.add_argument("--server", help="URL of an intervention server (default: run here, loading the run's model)")
    iv.add_argument("--token-file", help=f"the server's token (default: ${TOKEN_ENV})")
    iv.add_argument("--device", default="auto", help="without --server: auto, cpu, cuda, cuda:N")
    iv.add_argument("--dtype", default="auto", help="without --server: auto, float32, bfloat16, float16")
    iv.add_argument("--quiet", action="store_true", help="no progress bar")
    sw = sub.add_parser("sweep", help="attribution patching sweep of a run (AtP / AtP*), top cells checked by exact "
                        "patching; writes <cache>/sweeps/<run>/<hash>.json (README: 'Attribution sweeps')")
    sw.add_argument("run", help="run store name under --cache")
    sw.add_argument("--pairs", required=True, help="clean:corrupt seed pairs, e.g. 0:1,2:3")
    sw.add_argument("--kinds", default="resid_pre,attn_out,mlp_out,head,head_q,head_k")
    sw.add_argument("--positions", default="stored", help="named positions, comma-separated (default: stored)")
    sw.add_argument("--answers", choices=("model", "truth"), default="model")
    sw.add_argument("--verify-top", type=int, default=0, help="per kind, run the K cells of largest |estimate| exactly")
    sw.add_argument("--verify-random", type=int, default=0, help="... and R others drawn at random")
    sw.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    sw.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    sw.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    mc = sub.add_parser("mechanism", help="the mechanism lab's tests and verdict card on a run, or on the "
                        "known-answer toys (README: 'Mechanism lab')")
    mc.add_argument("run", nargs="?", help="run store name under --cache (omit with --toys)")
    mc.add_argument("--toys", action="store_true", help="the toys: GD construction, softmax kernel head, lookup")
    mc.add_argument("--model", help="default: the run's model; random:<spec> for the random-init control")
    mc.add_argument("--seeds", type=int, default=30, help="the first N finished seeds (toys: N sampled tasks)")
    mc.add_argument("--readout", default="greedy", help="greedy (the model's own answer), or number: greedy among "
                    "the tokens that keep the answer a number of the run's format (gives an untrained model answers)")
    mc.add_argument("--tests", help="which tests to run, comma-separated (default: all of "
                    "core.mechanism.lab.TESTS; agreement, weights, implicit and invariance give the verdict)")
    mc.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    mc.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    mc.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    mc.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "build":
        spec = BuildSpec(
            model=args.model, dataset=args.dataset, n_examples=args.n_examples,
            seeds=parse_seeds(args.seeds), prompt_format=args.format,
            regressors=[r.strip() for r in args.regressors.split(",")] if args.regressors else default_suite(),
            batch_size=args.batch_size, device=args.device, dtype=args.dtype, shard=parse_shard(args.shard),
            max_seeds=args.max_seeds, acts=args.acts, regressor_workers=args.regressor_workers,
            write_workers=args.write_workers,
        )
        command = "python -m cache_builder " + shlex.join(argv)
        path = build(spec, args.out, command=command, progress=not args.quiet)
        if args.max_seeds is not None:
            done = RunStore.open(path).done()
            if not done.all():
                print(f"{int(done.sum())}/{len(done)} seeds done; the same command without --max-seeds builds "
                      "the rest", file=sys.stderr)
        print(path)
        return 0
    if args.command == "consolidate":
        print(describe(consolidate(resolve_run(args.run, args.cache))))
        return 0
    if args.command == "serve":
        return serve(args)
    if args.command == "intervene":
        return intervene(args)
    if args.command == "mechanism":
        return mechanism(args)
    if args.command == "sweep":
        return sweep(args)
    store = RunStore.open(resolve_run(args.run, args.cache))
    if args.command == "export":
        table = export(store, args)
        if args.out:
            table.to_csv(args.out, index=False)
        else:
            print(table.to_csv(index=False), end="")
    elif args.command == "info":
        print(describe(store))
    elif args.command == "leaderboard":
        if args.csv:
            print(store_leaderboard(store).to_csv(index=False), end="")
        else:
            table = store_leaderboard(store, collapse=True)
            done = store.done()
            print(f"{store.name}: {int(done.sum())}/{len(done)} seeds done")
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            print(f"Estimators whose predictions agree within {REL_TOL:g} (relative) on every seed are one row, "
                  "named by the first; equivalent_to lists the others (--csv keeps every row).")
    return 0


def export(store: RunStore, args: argparse.Namespace) -> pd.DataFrame:
    """Returns the table `args.table` of the app for the view the arguments describe."""
    if args.table in EXPERIMENT_TABLES:
        return export_experiments(store, args)
    if args.table.startswith("mechanism-"):
        return export_mechanism(store, args)
    if args.table not in EXPORTS:
        raise CliError(f"unknown table {args.table!r}; use one of "
                       f"{', '.join([*EXPORTS, *EXPERIMENT_TABLES, 'mechanism-<lab table>'])}")
    pair = args.pair.split(",")
    if len(pair) != 2:
        raise CliError(f"--pair {args.pair!r}: give two candidates as A,B")
    view = View(a=pair[0], b=pair[1], subset=args.subset, versus=args.versus, seed=args.seed, layer=args.layer)
    try:
        if not len(subset_rows(store, view)[0]):
            raise CliError(f"no finished seed is in subset {args.subset}")
        cands = load_candidates(store)
        return EXPORTS[args.table](store, view, cands)
    except (KeyError, ValueError, IndexError) as exc:
        raise CliError(str(exc).strip("'\"")) from None


EXPERIMENT_COLUMNS = ["hash", "kind", "method", "cells", "units", "finished", "device"]


def _cache_of(store: RunStore) -> Path:
    """Returns the cache directory a store sits in: experiments and lab tables live beside it."""
    return Path(str(store.path).rstrip("/")).parent


def export_experiments(store: RunStore, args: argparse.Namespace) -> pd.DataFrame:
    """Returns the run's finished experiments, or one experiment's summary or rows."""
    cache = _cache_of(store)
    if args.table == "experiments":
        return pd.DataFrame(archive.list_results(cache, store.name), columns=EXPERIMENT_COLUMNS)
    if not args.experiment:
        raise CliError(f"table {args.table} needs --experiment HASH (see: export {store.name} experiments)")
    hashes = [r["hash"] for r in archive.list_results(cache, store.name) if r["hash"].startswith(args.experiment)]
    if len(hashes) != 1:
        raise CliError(f"{'no' if not hashes else 'more than one'} finished experiment of {store.name} "
                       f"matches {args.experiment!r} (see: export {store.name} experiments)")
    result = archive.load(cache, store.name, hashes[0])
    return result.summary() if args.table == "experiment-summary" else result.frame()


def export_mechanism(store: RunStore, args: argparse.Namespace) -> pd.DataFrame:
    """Returns one of the mechanism lab's tables of a subject on the run (the Mechanism page's)."""
    from core.mechanism import lab

    cache = _cache_of(store)
    subject = args.subject or store.attrs["model"]["spec"]
    out = lab.lab_dir(cache, store.name, subject)
    name = args.table.removeprefix("mechanism-")
    if name not in lab.TABLES:
        raise CliError(f"unknown table {args.table!r}; the lab's: {', '.join('mechanism-' + t for t in lab.TABLES)}")
    try:
        return lab.TABLES[name](out)
    except FileNotFoundError as exc:
        raise CliError(f"no {name} table of subject {subject} on {store.name} ({Path(exc.filename).name} missing; "
                       f"run: python -m cache_builder mechanism {store.name} --model {subject})") from None


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip() or None
        except OSError as exc:
            raise CliError(f"cannot read token file {args.token_file}: {exc.strerror or exc}") from None
    return os.environ.get(TOKEN_ENV) or None


def serve(args: argparse.Namespace) -> int:
    from core.interventions.server import Limits, ServeError, serve as run_server

    limits = Limits(max_body_bytes=args.max_body_kb * 1024, max_units=args.max_units,
                    max_clean_forwards=args.max_clean_forwards)
    try:
        run_server(args.model, args.cache, args.host, args.port, args.token_file, args.device, args.dtype, limits)
    except ServeError as exc:
        raise CliError(str(exc)) from None
    return 0


def read_request(run: str, spec_file: str) -> ExperimentRequest:
    """Returns the request for `run` and the experiment in `spec_file` (or a whole request
    whose run is `run`)."""
    try:
        text = Path(spec_file).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {spec_file}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{spec_file} is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if isinstance(data, dict) and "experiment" in data and "kind" not in data:
        if data.get("run", run).removesuffix(".zarr") != run.removesuffix(".zarr"):
            raise CliError(f"{spec_file} is a request for run {data['run']!r}, not {run!r}")
        data = {**data, "run": run}
    else:
        data = {"run": run, "experiment": data}
    return ExperimentRequest.model_validate(data)


def _ci(mean: float, low: float, high: float) -> str:
    return "nan" if pd.isna(mean) else f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def format_summary(summary: pd.DataFrame) -> str:
    """Returns a result's summary as a short table: each cell's label, units, normalised
    effect and log-probability difference with their 95% intervals, decoded answer."""
    table = pd.DataFrame({
        "cell": summary["label"], "n_units": summary["n_units"],
        "normalized [95% CI]": [_ci(*r) for r in summary[["normalized", "normalized_low", "normalized_high"]]
                                .itertuples(index=False)],
        "logprob_diff [95% CI]": [_ci(*r) for r in summary[["logprob_diff", "logprob_diff_low",
                                                             "logprob_diff_high"]].itertuples(index=False)],
        "decoded": summary["decoded"].map(lambda v: f"{v:.4g}"),
    })
    if "shift" in summary:  # a prompt edit: how far each edit moved the answer
        table["shift [95% CI]"] = [_ci(*r) for r in summary[["shift", "shift_low", "shift_high"]]
                                   .itertuples(index=False)]
    if summary["flagged"].any():
        table["flagged"] = summary["flagged"]
    return table.to_string(index=False)


def intervene(args: argparse.Namespace) -> int:
    from core.interventions.backend import LocalBackend, open_run

    run = args.run.removesuffix("/").removesuffix(".zarr")
    request = read_request(run, args.spec)
    if args.server:
        backend = HttpBackend(args.server, _read_token(args), args.cache)
    else:
        model = None  # a result already in the results store needs no model
        if archive.load(args.cache, run, content_hash(request)) is None:
            from core.interventions.plan import plan
            from core.models import load_model

            store = open_run(args.cache, run)
            plan(store, request, store.attrs["model"])  # a bad request fails before the model loads
            model = load_model(store.attrs["model"]["spec"], args.device, args.dtype)
        backend = LocalBackend(model, args.cache)
    with fraction_bar(request.experiment.root.kind, args.quiet) as progress:
        result = backend.run(request, progress)
    print(format_summary(result.summary()))
    for note in result.notes:
        print(f"note: {note}")
    print(f"result: {archive.result_dir(args.cache, run, result.hash)}")
    return 0


@contextmanager
def fraction_bar(desc: str, quiet: bool) -> Iterator[Callable[[float, str], None]]:
    """Yields a `progress(fraction, stage)` callback drawing a tqdm bar (nothing when `quiet`)."""
    with tqdm(total=1000, desc=desc, disable=quiet, leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}") as bar:
        def progress(fraction: float, stage: str) -> None:
            bar.update(max(0, round(fraction * 1000) - bar.n))
            bar.set_postfix_str(stage, refresh=True)

        yield progress


def sweep(args: argparse.Namespace) -> int:
    from core.interventions import attribution
    from core.interventions.backend import open_run
    from core.models import load_model

    try:
        pairs = [(int(c), int(r)) for c, r in (part.split(":") for part in args.pairs.split(","))]
    except ValueError:  # a part without exactly one ':' fails the unpacking, a non-number int()
        raise CliError(f"--pairs {args.pairs!r} does not parse; use clean:corrupt seeds, e.g. 0:1,2:3") from None
    store = open_run(args.cache, args.run)
    kinds, positions = args.kinds.split(","), args.positions.split(",")
    attribution.validate(store, store.attrs["model"], pairs, kinds, positions, args.answers)  # before the model loads
    model = load_model(store.attrs["model"]["spec"], args.device, args.dtype)
    with fraction_bar("sweep", args.quiet) as progress:
        result, path = attribution.sweep_and_verify(model, store, args.cache, pairs, kinds, positions, args.answers,
                                                    top_k=args.verify_top, n_random=args.verify_random,
                                                    progress=progress)
    print(attribution.summary(result))
    print(f"sweep: {path}")
    return 0


def mechanism(args: argparse.Namespace) -> int:
    from core.mechanism import lab

    if args.seeds < 2:
        raise CliError("--seeds must be at least 2 (the intervals are over seeds)")
    if args.toys == bool(args.run):
        raise CliError("give a run, or --toys")
    tests = list(lab.TESTS) if args.tests is None else [t.strip() for t in args.tests.split(",")]
    unknown = [t for t in tests if t not in lab.TESTS]
    if unknown or not tests:
        raise CliError(f"unknown test {unknown[0] if unknown else ''!r}; known: {', '.join(lab.TESTS)}")
    if args.toys:
        bases, truths = lab.toy_bases(args.seeds)
        jobs = [(s, bases, lab.lab_dir(args.cache, lab.TOYS, s.name), None, truths) for s in lab.toy_subjects()]
    else:
        from core.mechanism.lm import READOUTS, LMSubject
        from core.models import load_model

        store = RunStore.open(resolve_run(args.run, args.cache))
        rows = np.nonzero(store.done())[0][: args.seeds].tolist()
        if len(rows) < 2:
            raise CliError(f"run {store.name} has {len(rows)} finished seeds; the lab needs at least 2")
        spec = args.model or store.attrs["model"]["spec"]
        if args.readout not in READOUTS:
            raise CliError(f"unknown --readout {args.readout!r}; use one of {', '.join(READOUTS)}")
        name = spec + ("" if args.readout == "greedy" else f"+{args.readout}")
        subject = LMSubject.of_run(load_model(spec, args.device, args.dtype), store, rows, name, args.readout)
        subject.check_tokenizer()
        jobs = [(subject, subject.bases, lab.lab_dir(args.cache, store.name, name), [store.seeds[r] for r in rows],
                 store.y_true()[rows])]
    for subject, bases, out, labels, truths in jobs:
        with fraction_bar(subject.name, args.quiet) as progress:
            card = lab.run_lab(subject, bases, out, labels, truths, tests, progress=progress)
        print(f"{subject.name}: {card['verdict']['text']}")
        for t in card["tests"]:
            tied = f"; indistinguishable from {t['tied_with']}" if t["tied_with"] else ""
            print(f"  {t['test']}: {t['winner']} ({t['member']}, distance {_ci(t['distance'], t['low'], t['high'])})"
                  f"{tied}")
        print(f"  tables: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _run(argv)
    except (CliError, UnknownName, ModelUnavailable, PromptError, StoreError, BuildError, InterventionError,
            ServerError, MechanismError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValidationError as exc:
        print(f"error: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: finished seeds are kept; run the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        what = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        print(f"error: {what} ({exc.filename or ''}); finished seeds are kept", file=sys.stderr)
        return EXIT_BAD_INPUT
