"""Mechanism lab: the toys' verdicts from nothing, and test 3 (effective weights) on the
embedded model with the prompt's cache reused against 2n whole prefills, in one run.

- toys: train the linear self-attention layer, build the other three toys, run tests
  1, 3, 5, 6 on each and give four verdicts (goal: under 2 minutes);
- test 3 on the linear-ni11 demo store: the 2n edits y_i +- delta of each seed answered
  with `run_prompts` (the seed's KV cache up to each edited value reused) against the
  same 2n prompts prefilled and decoded whole (`greedy_answers`, batches of 4), on the
  first `--seeds` seeds; both must give the same answers;
- tests 4 and 7 the same way: the n dropped examples and n prefixes of each seed, prompts
  of other lengths that start on the seed's KV cache where they part from it.

    PYTHONPATH=. .venv/bin/python bench/bench_mechanism.py [--cache cache] [--seeds 3] [--skip-toys]
"""

import argparse
import tempfile
import time

import numpy as np

from core.generation import greedy_answers
from core.mechanism import lab, loo
from core.mechanism.edits import prefix, y_step
from core.mechanism.lm import LMSubject
from core.mechanism.weights import perturbed
from core.models import load_model
from core.prompts import parse_number
from core.store import RunStore

RUN = "smollm2-135m__linear-ni11__n20__aligned"


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip-toys", action="store_true")
    args = ap.parse_args()
    if not args.skip_toys:
        toys()
    for test in ("weights", "loo-curves"):
        reuse_vs_whole(args.cache, args.seeds, test)


if __name__ == "__main__":
    main()
