"""Mechanism lab: the toys' verdicts from nothing, and test 3 (effective weights) on the
embedded model with the prompt's cache reused against 2n whole prefills, in one run.

- toys: train the linear self-attention layer, build the other three toys, run tests
  1, 3, 5, 6 on each and give four verdicts (goal: under 2 minutes);
- test 3 on the linear-ni11 demo store: the 2n edits y_i +- delta of each seed answered
  with `run_prompts` (the seed's KV cache up to each edited value reused) against the
  same 2n prompts prefilled and decoded whole (`greedy_answers`, batches of 4), on the
  first `--seeds` seeds; both must give the same answers;
- tests 4 and 7 the same way: the n dropped examples and n prefixes of each seed, prompts
  of other lengths that start on the seed's KV cache where they part from it;
- the battery (every test of `lab.TESTS`) on the first seeds of both demo stores, each
  test timed against its floor: the prompt positions it must compute (each edited
  prompt's positions past its prefix shared with the seed's, `LMSubject.positions`, and
  the seed's own prompt once) at the rate of a batch of whole prompts prefilled by the raw
  model in the same run; extrapolated to 30 seeds against the goal of 30 minutes.

    PYTHONPATH=. .venv/bin/python bench/bench_mechanism.py [--cache cache] [--seeds 3]
        [--parts toys,weights,loo-curves,battery] [--battery-seeds 3,1]
"""

import argparse
import tempfile
import time

import numpy as np
import torch

from core.generation import greedy_answers
from core.mechanism import lab, loo
from core.mechanism.edits import prefix, y_step
from core.mechanism.lm import LMSubject
from core.mechanism.weights import perturbed
from core.models import load_model
from core.prompts import parse_number
from core.store import RunStore

RUN = "smollm2-135m__linear-ni11__n20__aligned"
BATTERY_RUNS = (RUN, "smollm2-135m__friedman2__n25__aligned")


def toys() -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        subjects = lab.toy_subjects()
        trained = time.perf_counter() - t0
        for s in subjects:
            card = lab.run_lab(s, *lab.toy_bases(30)[:1], lab.lab_dir(out, lab.TOYS, s.name))
            ok = card["verdict"]["family"] == lab.TOY_TRUTH[s.name]
            print(f"  {s.name}: {card['verdict']['text']} [{'correct' if ok else 'WRONG'}]")
    print(f"toys: four verdicts from nothing in {time.perf_counter() - t0:.1f} s "
          f"(training the LSA {trained:.1f} s; goal < 120 s)")


def edits_of(test: str, task):
    """The edits a test asks the model about on one seed."""
    if test == "weights":
        return perturbed(task, y_step(task, lab.WEIGHT_REL))
    return loo.edits(task)[1:] + [prefix(task, k) for k in range(1, task.n + 1)]  # 4 and 7: other lengths


def reuse_vs_whole(cache: str, n_seeds: int, test: str) -> None:
    store = RunStore.open(f"{cache}/{RUN}.zarr")
    model = load_model(store.attrs["model"]["spec"])
    subject = LMSubject.of_run(model, store, list(range(n_seeds)))
    max_new = int(store.attrs["prompt"]["max_new_tokens"])
    reuse = whole = 0.0
    n_prompts = 0
    for k, task in enumerate(subject.bases):
        tasks = edits_of(test, task)
        t0 = time.perf_counter()
        got = subject.predict(k, tasks)
        t1 = time.perf_counter()
        prompts = [subject.prompt(t) for t in tasks]
        texts = [t for i in range(0, len(prompts), 4) for t in greedy_answers(model, prompts[i: i + 4], max_new).texts]
        t2 = time.perf_counter()
        want = np.array([parse_number(t) for t in texts])
        same = np.array_equal(np.nan_to_num(got, nan=-1e9), np.nan_to_num(want, nan=-1e9))
        reuse, whole, n_prompts = reuse + t1 - t0, whole + t2 - t1, n_prompts + len(tasks)
        print(f"  seed {store.seeds[k]}: {len(tasks)} edits, reused {t1 - t0:.1f} s, whole {t2 - t1:.1f} s, "
              f"same answers: {same}")
    what = "test 3" if test == "weights" else "tests 4 + 7 (dropped examples, prefixes)"
    print(f"{what}, {RUN}, {n_seeds} seeds x {n_prompts // n_seeds} edits ({store.attrs['prompt']['n_tokens']} "
          f"tokens): reused {reuse:.1f} s, whole prefills {whole:.1f} s: {whole / reuse:.2f}x faster "
          f"({reuse / n_prompts:.2f} s per edit)")


@torch.inference_mode()
def prefill_rate(model, tokens: np.ndarray, batch: int = 4) -> float:
    """Returns the raw model's prompt positions per second: `batch` copies of a prompt, one forward."""
    ids = torch.as_tensor(np.stack([tokens] * batch), device=model.device)
    model.hf_model(input_ids=ids[:1, :8])  # warm-up
    t0 = time.perf_counter()
    model.hf_model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return ids.numel() / (time.perf_counter() - t0)


def battery(cache: str, run: str, n_seeds: int) -> float:
    """Runs the lab (every test) on the run's first seeds, each test against its floor;
    returns the time 30 seeds would take (the first `lab.SWEEP_SEEDS` run test 3 twice over)."""
    store = RunStore.open(f"{cache}/{run}.zarr")
    model = load_model(store.attrs["model"]["spec"])
    subject = LMSubject.of_run(model, store, list(range(n_seeds)))
    t = len(subject.tokens[0])
    rate = prefill_rate(model, subject.tokens[0])
    took: dict[tuple[str, int], float] = {}  # (test, seed): s
    positions: dict[str, int] = {name: 0 for name in (*lab.TESTS, "card")}
    last: list = []  # the test (and seed) running since the last progress report, its start, positions so far

    def progress(fraction: float, message: str) -> None:
        now = time.perf_counter()
        if last:
            took[last[0]] = took.get(last[0], 0.0) + now - last[1]
            positions[last[0][0]] += subject.positions - last[2]
        seed, _, test = message.partition(": ")
        key = (test, int(seed.split()[1].split("/")[0]) - 1) if test in lab.TESTS else ("card", 0)
        last[:] = [key, now, subject.positions]

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        lab.run_lab(subject, subject.bases, out, progress=progress)
    total = time.perf_counter() - t0
    rate = min(rate, prefill_rate(model, subject.tokens[0]))  # the slower of before and after: a lower floor
    positions[lab.TESTS[0]] += n_seeds * t  # the seed's own prompt, computed once
    floor = sum(positions.values()) / rate
    est = 0.0
    for name in positions:
        times = [took.get((name, k), 0.0) for k in range(n_seeds)]
        need = positions[name] / rate
        if name == "card":  # once a run
            est += sum(times)
        elif name == "weights":  # the sweep doubles test 3 on the first seeds: the rest take half as long
            sweep = min(lab.SWEEP_SEEDS, n_seeds)
            rest = np.mean(times[sweep:]) if n_seeds > sweep else np.mean(times) / 2
            est += sum(times[:sweep]) * lab.SWEEP_SEEDS / sweep + (30 - lab.SWEEP_SEEDS) * rest
        else:
            est += 30 * np.mean(times)
        print(f"  {name}: {sum(times):.1f} s, {positions[name] / n_seeds:.0f} positions per seed, floor {need:.1f} s"
              + (f": {sum(times) / need:.2f}x" if need else ""))
    print(f"battery, {run}, {n_seeds} seeds ({t} tokens; raw prefill {rate:.0f} positions/s): {total:.1f} s, "
          f"floor {floor:.1f} s: {total / floor:.2f}x; 30 seeds: {est / 60:.1f} min")
    return est


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parts", default="toys,weights,loo-curves,battery")
    ap.add_argument("--battery-seeds", default="3,1", help="seeds of linear-ni11, friedman2 in the battery part")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if "toys" in parts:
        toys()
    for test in ("weights", "loo-curves"):
        if test in parts:
            reuse_vs_whole(args.cache, args.seeds, test)
    if "battery" in parts:
        est = [battery(args.cache, run, int(n)) for run, n in zip(BATTERY_RUNS, args.battery_seeds.split(","))]
        print(f"battery, both demo stores, 30 seeds each: {sum(est) / 60:.1f} min (goal < 30 min)")


if __name__ == "__main__":
    main()
