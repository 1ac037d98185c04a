"""Attribution sweeps: an N-pair AtP / AtP* sweep against exact patching of the same grid, in one run.

The sweep estimates every cell (each kind's layers x heads x the named positions) from one clean
forward and one corrupt forward + backward per pair. Exact patching runs every cell of the same
grid through the executor (`core.interventions.executor.execute`, no decoding). On a CPU the
exact grid is timed on a part of it (`--exact-pairs` pairs, every `--exact-layer-step`-th layer,
`--exact-heads` heads) and scaled to the whole grid by the plan's cost model (clean-forward
equivalents, `core.interventions.plan`); the output says which. `--verify K,R` also checks the
sweep (top K + R random cells per kind, exact) and prints recall@K, Spearman and the largest
missed effect.

CPU (the demo store, embedded model):

    PYTHONPATH=. .venv/bin/python bench/bench_attribution.py [--cache cache] [--pairs 20] \
        [--kinds resid_pre,attn_out,mlp_out,head,head_q,head_k] [--positions stored] \
        [--exact-pairs 1] [--exact-layer-step 1] [--exact-heads 1] [--verify 10,10]

GPU host (a random-init model of Llama-3.1-8B's shape; builds a small store with it first):

    PYTHONPATH=. .venv/bin/python bench/bench_attribution.py --model random:meta-llama/Llama-3.1-8B \
        --device cuda --build friedman2:25:40 --cache /tmp/bench-cache --exact-pairs 20 --exact-heads 0
"""

import argparse
import time
from pathlib import Path

import torch

from core.interventions import attribution as atp
from core.interventions.executor import execute
from core.interventions.plan import plan
from core.interventions.spec import ExperimentRequest, Patching, SiteGrid
from core.models import load_model
from core.store import RunStore

DEMO = "smollm2-135m__linear-ni11__n20__aligned"


def sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def timed(model, fn):
    sync(model)
    t0 = time.perf_counter()
    out = fn()
    sync(model)
    return out, time.perf_counter() - t0


def exact_grid(model, store: RunStore, kind: str, pairs: list, positions: list[str], exact_pairs: int,
               layer_step: int, n_heads_measured: int) -> tuple[float, float, str]:
    """Returns (measured seconds, seconds scaled to the whole grid and every pair, what was measured)."""
    run = store.name.removesuffix(".zarr")
    n_layers, n_heads = model.info["n_layers"], model.info["n_heads"]
    top = n_layers if kind == "resid_pre" else n_layers - 1
    heads = "all" if kind == "head" else None
    full = ExperimentRequest(run=run, experiment=Patching(
        decode=False, positions=positions, pairs=pairs,
        sites=[SiteGrid(kind=kind, layers="all", heads=heads)]))
    layers = list(range(0, top + 1, layer_step)) if layer_step > 1 else "all"
    if kind == "head" and 0 < n_heads_measured < n_heads:
        heads = list(range(n_heads_measured))
    part = ExperimentRequest(run=run, experiment=Patching(
        decode=False, positions=positions, pairs=pairs[:exact_pairs],
        sites=[SiteGrid(kind=kind, layers=layers, heads=heads)]))
    cost_full = plan(store, full, model.info).clean_forwards
    p = plan(store, part, model.info)
    _, took = timed(model, lambda: execute(model, store, part))
    what = f"{len(p.cells)} cells x {len(part.experiment.root.pairs)} pairs"
    return took, took * cost_full / p.clean_forwards, what


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--run", default=DEMO, help="run store under --cache (with --build: ignored)")
    ap.add_argument("--model", help="default: the run's own model; e.g. random:meta-llama/Llama-3.1-8B")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--build", help="DATASET:N_EXAMPLES:SEEDS: build that store with --model first (e.g. "
                    "friedman2:25:40)")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--kinds", default=",".join(atp.SWEEP_KINDS))
    ap.add_argument("--positions", default="stored")
    ap.add_argument("--exact-pairs", type=int, default=1, help="pairs the exact grid is timed on (0: all)")
    ap.add_argument("--exact-layer-step", type=int, default=1, help="exact grid timed on every k-th layer")
    ap.add_argument("--exact-heads", type=int, default=1, help="heads the exact head grid is timed on (0: all)")
    ap.add_argument("--verify", default="", help="K,R: verify the sweep (top K + R random per kind)")
    args = ap.parse_args()
    kinds, positions = args.kinds.split(","), args.positions.split(",")

    if args.build:
        from cache_builder.build import BuildSpec, build
        from cache_builder.cli import parse_seeds

        dataset, n, seeds = args.build.split(":")
        model = load_model(args.model or "smollm2-135m", args.device, args.dtype)
        spec = BuildSpec(model.spec, dataset, int(n), parse_seeds(seeds), regressors=["linear"],
                         device=args.device, dtype=args.dtype)
        (path, took) = timed(model, lambda: build(spec, args.cache, progress=False, model=model))
        store = RunStore.open(path)
        print(f"built {store.name} ({len(store.seeds)} seeds) in {took:.1f} s")
    else:
        path = Path(args.cache) / f"{args.run.removesuffix('.zarr')}.zarr"
        if not path.exists():
            raise SystemExit(f"{path} is missing: build the demo stores first (make demo), or use --build")
        store = RunStore.open(path)
        model = load_model(args.model or store.attrs["model"]["spec"], args.device, args.dtype)
    seeds = [s for s, d in zip(store.seeds, store.done()) if d]
    pairs = [(seeds[2 * i], seeds[2 * i + 1]) for i in range(min(args.pairs, len(seeds) // 2))]
    exact_pairs = args.exact_pairs or len(pairs)
    info = model.info
    print(f"{store.name}: {int(store.root['positions/n_tokens'][0])} tokens; model {model.spec} "
          f"({info['n_layers']} layers, d_model {info['d_model']}, {info['n_heads']} heads) on {model.device}, "
          f"{info['dtype']}; {len(pairs)} pairs, positions {args.positions}")

    atp.sweep(model, store, pairs[:1], kinds=["resid_pre"], positions=["final"])  # warm-up
    sw, t_all = timed(model, lambda: atp.sweep(model, store, pairs, kinds=kinds, positions=positions))
    if model.device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(model.device) / 2**30:.1f} GiB")
    df = sw.frame()
    print(f"\nsweep, {len(pairs)} pairs, {', '.join(kinds)}: {t_all:.1f} s ({t_all / len(pairs):.2f} s per pair)")
    plain = [k for k in kinds if k not in ("head_q", "head_k")]
    if plain != kinds and plain:  # what the QK fix adds, on one pair
        _, one_plain = timed(model, lambda: atp.sweep(model, store, pairs[:1], kinds=plain, positions=positions))
        _, one_all = timed(model, lambda: atp.sweep(model, store, pairs[:1], kinds=kinds, positions=positions))
        print(f"one pair: {one_plain:.2f} s without head_q / head_k, {one_all:.2f} s with them (AtP* QK fix)")
    print(f"\n{'kind':<10} {'cells/pair':>10} {'exact measured':>26} {'exact, whole grid':>18} "
          f"{'sweep':>8} {'exact / sweep':>14}")
    total = total_cells = 0.0
    for kind in kinds:
        cells = int((df["kind"] == kind).sum())
        if kind not in atp.EXACT_KINDS:
            print(f"{kind:<10} {cells:>10} {'(no exact: queries/keys)':>26} {'':>18} {t_all:>7.1f}s")
            continue
        took, scaled, what = exact_grid(model, store, kind, pairs, positions, exact_pairs, args.exact_layer_step,
                                        args.exact_heads)
        print(f"{kind:<10} {cells:>10} {f'{took:.1f} s on {what}':>26} {scaled:>17.1f}s {t_all:>7.1f}s "
              f"{scaled / t_all:>13.1f}x", flush=True)
        total, total_cells = total + scaled, total_cells + cells
    if total:
        print(f"{'all exact':<10} {int(total_cells):>10} {'':>26} {total:>17.1f}s {t_all:>7.1f}s "
              f"{total / t_all:>13.1f}x")
    print("exact, whole grid: the measured part scaled by the plan's cost (clean-forward equivalents) of the "
          "whole grid over all pairs; sweep: one pass gives every kind at once.")

    if args.verify:
        k, r = (int(v) for v in args.verify.split(","))
        checked, took = timed(model, lambda: atp.verify(model, store, sw, top_k=k, n_random=r))
        print(f"\nverification ({took:.1f} s):")
        for kind, v in checked.verification["kinds"].items():
            print(f"{kind:<10} {atp.verification_line(v)}")
    top = df.reindex(df["estimate"].abs().sort_values(ascending=False).index)
    print("\nlargest estimates:")
    print(top[["label", "estimate", "atp", "normalized"]].head(8).to_string(index=False,
                                                                           float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
