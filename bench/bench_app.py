"""Benchmark: each page's first render (cold caches) and the logit lens over every seed.

    python bench/bench_app.py [--cache cache] [--repeats 3]

For every run store under --cache: each page rendered by Streamlit's AppTest in this
process with every Streamlit cache cleared first (a reviewer's first visit; the server
process is warm, as it is once the app is up), against the 2 s target; then
`core.logit_diff.pair_logit_diff` for every seed x layer of one pair (truth, model),
from arrays already loaded (what the app does once per run) and including the load,
against the 0.3 s target.
"""

import argparse
import os
import time
from pathlib import Path

import streamlit as st
from streamlit.testing.v1 import AppTest

from core.logit_diff import load_candidates, pair_logit_diff
from core.store import RunStore
from core.tables import find_runs

MAIN = str(Path(__file__).resolve().parent.parent / "app" / "main.py")
PAGES = ["runs", "prompt", "leaderboard", "logit_diff", "attention", "mlp", "probes"]


def first_render(run: str, page: str) -> float:
    st.cache_resource.clear()
    st.cache_data.clear()
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.query_params["run"] = run
    at.run()  # the default page, so that switch_page knows the navigation
    st.cache_resource.clear()
    st.cache_data.clear()
    at.switch_page(f"views/{page}.py")
    t = time.perf_counter()
    at.run()
    spent = time.perf_counter() - t
    if at.exception:
        raise RuntimeError(f"{page}: {at.exception[0].value}")
    return spent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", default="cache")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    os.environ["WORKBENCH_CACHE"] = args.cache
    AppTest.from_file(MAIN, default_timeout=120).run()  # imports, once
    for path in find_runs(args.cache):
        run = path.name.removesuffix(".zarr")
        store = RunStore.open(path)
        print(f"{run}: {int(store.done().sum())} seeds, {store.attrs['model']['n_layers']} layers")
        for page in PAGES:
            times = [first_render(run, page) for _ in range(args.repeats)]
            best, worst = min(times), max(times)
            print(f"  page {page:<12} first render {best:6.2f} s (worst {worst:5.2f}); "
                  f"ratio to the 2 s target {worst / 2:5.2f}")
        t = time.perf_counter()
        cands = load_candidates(store)
        loaded = time.perf_counter()
        reps = 20
        for _ in range(reps):
            diff = pair_logit_diff(cands, "truth", "model")
        warm = (time.perf_counter() - loaded) / reps
        cold = loaded - t + warm
        print(f"  logit lens, {diff.lens.shape[0]} seeds x {diff.lens.shape[1]} layers x 1 pair: "
              f"{warm * 1000:.1f} ms from loaded arrays (ratio to 0.3 s {warm / 0.3:.3f}), "
              f"{cold * 1000:.1f} ms with the load (ratio {cold / 0.3:.2f})")


if __name__ == "__main__":
    main()
