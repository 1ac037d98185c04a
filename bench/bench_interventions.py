"""Interventions: the batched executor against a naive one-forward-per-cell loop, in one run.

On the demo stores (embedded model, CPU), for one seed pair:
- a full `resid_pre` patching grid (every layer x every stored position): the executor's
  time, the naive loop's (one forward per cell over prompt + both answers, the patch
  hooked in; timed on a sample of cells and scaled to the grid: its cost per cell is
  the same for every cell), and the compute that can actually change (the sum over
  cells of (L - l)/L x (T - p)/T clean forwards, times one clean forward timed before
  the grid and again after the naive loop);
- a 20-pair head-patching grid (all layers x heads, final position): seconds, rows per
  forward, and the peak resident memory above the loaded model (its weights paged in by
  one forward).

    PYTHONPATH=. .venv/bin/python bench/bench_interventions.py [--cache cache] [--sample 24]
"""

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch

from core.interventions.executor import execute
from core.interventions.plan import plan
from core.interventions.positions import Spans
from core.interventions.spec import ExperimentRequest
from core.models import load_model
from core.store import RunStore

RUNS = ["smollm2-135m__linear-ni11__n20__aligned", "smollm2-135m__friedman2__n25__aligned"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakRss:
    """Samples this process's resident memory every 20 ms while in the block."""

    def __enter__(self):
        self.peak, self.stop = rss_mb(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


@torch.inference_mode()
def naive_cell(model, tokens: np.ndarray, answers, layer: int, pos: np.ndarray, value: torch.Tensor) -> float:
    """One cell the naive way: prompt + each answer in one batch, the residual entering
    `layer` overwritten at `pos`; returns log p(A) - log p(B)."""
    hf = model.hf_model
    seqs = [np.concatenate([tokens, a[:-1]]) for a in answers]
    width = max(map(len, seqs))
    ids = torch.zeros((2, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s)

    def patch(h: torch.Tensor) -> None:
        h[:, pos] = value  # in place: the hook returns None

    if layer < len(hf.model.layers):
        handle = hf.model.layers[layer].register_forward_pre_hook(
            lambda m, a, k: patch(a[0] if a else k["hidden_states"]), with_kwargs=True)
    else:
        handle = hf.model.norm.register_forward_pre_hook(lambda m, a: patch(a[0]))
    try:
        logp = torch.log_softmax(hf(input_ids=ids).logits.float(), -1)
    finally:
        handle.remove()
    t = len(tokens)
    total = [sum(float(logp[i, t - 1 + k, tok]) for k, tok in enumerate(a)) for i, a in enumerate(answers)]
    return total[0] - total[1]


def clean_forward_s(model, tokens: np.ndarray, repeat: int = 3) -> float:
    ids = torch.as_tensor(tokens, dtype=torch.long)[None]
    with torch.inference_mode():
        model.hf_model(input_ids=ids, logits_to_keep=1)
        t0 = time.perf_counter()
        for _ in range(repeat):
            model.hf_model(input_ids=ids, logits_to_keep=1)
    return (time.perf_counter() - t0) / repeat


def resid_grid(model, store: RunStore, sample: int, decodes: tuple[bool, ...] = (False, True),
               layer_step: int = 1) -> None:
    run = store.name.removesuffix(".zarr")
    seeds = [s for s, d in zip(store.seeds, store.done()) if d]
    clean, corrupt = seeds[0], seeds[1]
    n_layers = model.info["n_layers"]
    layers = "all" if layer_step == 1 else list(range(0, n_layers + 1, layer_step))
    which = "every layer" if layer_step == 1 else f"every {layer_step}th layer"
    print(f"\n== {run}: resid_pre grid, {which} x every stored position, pair {clean}->{corrupt}")
    # One clean forward is timed before the grid and after the naive loop: a shared VM's
    # speed drifts over the minutes between, and each side of the ratio should see the same machine.
    one_before = clean_forward_s(model, store.tokens(store.index(corrupt)))
    for decode in decodes:
        exp = {"kind": "patching", "direction": "denoising", "answers": "truth", "decode": decode,
               "sites": [{"kind": "resid_pre", "layers": layers}], "positions": ["stored"],
               "pairs": [[clean, corrupt]]}
        request = ExperimentRequest.model_validate({"run": run, "experiment": exp})
        p = plan(store, request, model.info)
        t0 = time.perf_counter()
        result = execute(model, store, request)
        took = time.perf_counter() - t0
        print(f"executor (decode={decode}): {len(p.cells)} cells, {took:.1f} s, {result.provenance['chunks']} chunks")
        if not decode:
            batched, grid = took, result
    # The naive loop on a sample of cells: the same metric, one forward (prompt + both answers) per cell.
    row_c, row_r = store.index(clean), store.index(corrupt)
    tokens = store.tokens(row_r)
    a = store.attrs
    fmt = store.number_format()
    enc = lambda v: model.tokenizer.encode(fmt.write(v, a["dataset"]["n_features"]), add_special_tokens=False)  # noqa: E731
    answers = (enc(store.y_true()[row_c]), enc(store.y_true()[row_r]))
    spans = Spans(store)
    src_ids = torch.as_tensor(store.tokens(row_c), dtype=torch.long)[None]
    with torch.inference_mode():
        hidden = model.hf_model(input_ids=src_ids, output_hidden_states=True).hidden_states  # [L+1] x [1, T, d]
    # hidden_states[L] is after the final norm in HF; the residual after the last layer is taken by hook instead.
    last = {}
    handle = model.hf_model.model.norm.register_forward_pre_hook(lambda m, args: last.setdefault("h", args[0]))
    with torch.inference_mode():
        model.hf_model(input_ids=src_ids, logits_to_keep=1)
    handle.remove()
    resid = [hidden[l][0] for l in range(n_layers)] + [last["h"][0]]
    cells = grid.cells
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(len(cells), size=min(sample, len(cells)), replace=False))
    t0 = time.perf_counter()
    naive = []
    for c in picked:
        cell = cells[c]
        pos = spans.resolve(row_r, cell.positions[0])
        layer = cell.sites[0].layer
        naive.append(naive_cell(model, tokens, answers, layer, pos, resid[layer][pos]))
    per_cell = (time.perf_counter() - t0) / len(picked)
    got = grid.frame().set_index("cell").loc[picked, "logprob_diff"].to_numpy()
    one = clean_forward_s(model, tokens)
    can_change = sum((n_layers - c.sites[0].layer) / n_layers
                     * (len(tokens) - spans.resolve(row_r, c.positions[0]).min()) / len(tokens) for c in cells)
    print(f"naive loop: {per_cell:.2f} s per cell (timed on {len(picked)} cells) -> {per_cell * len(cells):.0f} s "
          f"for the grid; executor without decoding {batched:.1f} s: {per_cell * len(cells) / batched:.1f}x faster")
    print(f"executor vs naive on the sampled cells: max |difference| of log p(A) - log p(B) "
          f"{np.max(np.abs(got - np.array(naive))):.2e}")
    for when, sec in (("before the grid", one_before), ("after the naive loop", one)):
        print(f"compute that can change: {can_change:.1f} clean forwards x {sec:.2f} s ({when}) = "
              f"{can_change * sec:.1f} s; executor / that = {batched / (can_change * sec):.2f}")


def head_grid(model, store: RunStore, n_pairs: int, decodes: tuple[bool, ...] = (False, True)) -> None:
    run = store.name.removesuffix(".zarr")
    seeds = [s for s, d in zip(store.seeds, store.done()) if d]
    pairs = [[seeds[2 * i], seeds[2 * i + 1]] for i in range(min(n_pairs, len(seeds) // 2))]
    exp = {"kind": "patching", "direction": "denoising", "sites": [{"kind": "head", "heads": "all"}],
           "positions": ["final"], "pairs": pairs}
    print(f"\n== {run}: head grid (all layers x heads, final position), {len(pairs)} pairs")
    # The model's weights are paged in by its first forward: "the model" is its resident size after one.
    clean_forward_s(model, store.tokens(0), repeat=1)
    base = rss_mb()
    for decode in decodes:
        request = ExperimentRequest.model_validate({"run": run, "experiment": {**exp, "decode": decode}})
        with PeakRss() as peak:
            t0 = time.perf_counter()
            result = execute(model, store, request)
            took = time.perf_counter() - t0
        rows = result.provenance["jobs"]
        print(f"decode={decode}: {took:.1f} s, {result.provenance['rows']} rows in {result.provenance['chunks']} "
              f"chunks ({rows / result.provenance['chunks']:.1f} rows per forward); peak RSS "
              f"{peak.peak - base:+.0f} MB above the loaded model ({base:.0f} MB)")
    s = result.summary().sort_values("normalized", ascending=False)
    print("top heads by normalised effect:")
    print(s[["label", "normalized", "normalized_low", "normalized_high", "n_units"]].head(5).to_string(index=False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--sample", type=int, default=24, help="cells of the naive loop timed")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated demo runs")
    ap.add_argument("--friedman-layer-step", type=int, default=1,
                    help="friedman2's grid over every k-th layer (its full grid takes ~20 min on 2 cores)")
    ap.add_argument("--parts", default="resid,heads", help="resid (the resid_pre grids), heads (the head grid)")
    ap.add_argument("--head-decode", default="0,1", help="the head grid without (0) and with (1) decoding")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m")
    for run in args.runs.split(","):
        path = Path(args.cache) / f"{run}.zarr"
        if not path.exists():
            print(f"{path} is missing: build the demo stores first (make demo)")
            continue
        store = RunStore.open(path)
        # friedman2's grid is ~800 cells of 1500-token prompts: timed without decoding only.
        if "resid" in parts:
            if run == RUNS[0]:
                resid_grid(model, store, args.sample)
            else:
                resid_grid(model, store, args.sample, (False,), args.friedman_layer_step)
        if run == RUNS[0] and "heads" in parts:
            head_grid(model, store, args.pairs, tuple(bool(int(d)) for d in args.head_decode.split(",")))


if __name__ == "__main__":
    main()
