"""Benchmark: the activation cache. Every ratio is measured side by side in this run.

1. time: a whole build (answers, activations, regressors, writes) against plain
   prefill forward passes of the same prompts in the same batches, and the prefill
   with capture hooks alone;
2. memory: peak resident memory of builds of few and many seeds (child processes),
   against the model's own size and against a TransformerLens `run_with_cache` of
   every hook on one prompt (the original's way);
3. bytes per seed of the store, per array;
4. reading one (seed, layer) residual slice from a freshly opened store;
5. on a GPU only: seeds per second for the embedded model and a random-init Llama
   with Llama-3.1-8B's shapes, against the GPU's bf16 FLOP bound.

    python bench/bench_acts.py [--dataset friedman2 --n-examples 25 --seeds 0-11]
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cache_builder.build import BuildSpec, Prepared, _batches, _prepare, build
from cache_builder.cli import parse_seeds
from core.capture import Recorder
from core.memory import pin_mmap_threshold
from core.generation import left_pad, prefill
from core.models import load_model
from core.store import RunStore

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def child_memory(args: argparse.Namespace) -> None:
    """In a child: resident memory before the build (imports done) and its peak over a build."""
    before = rss_mb()
    tmp = Path(tempfile.mkdtemp())
    spec = BuildSpec(args.model, args.dataset, args.n_examples, parse_seeds(args.seeds),
                     regressors=["mean"], batch_size=args.batch_size)
    build(spec, tmp, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shutil.rmtree(tmp)
    print(json.dumps({"before_mb": before, "peak_mb": peak}))


def child_original(args: argparse.Namespace) -> None:
    """In a child: bytes of a run_with_cache of every hook on one prompt of the run."""
    spec = BuildSpec(args.model, args.dataset, args.n_examples, [0])
    prep = _prepare(spec)
    model = load_model(args.model)
    ids = torch.as_tensor(prep.prompts[0].tokens, dtype=torch.long)[None]
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(ids)
    total = sum(v.numel() * v.element_size() for v in cache.values())
    patterns = sum(v.numel() * v.element_size() for k, v in cache.items() if "pattern" in k or "scores" in k)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cache_mb": total / 2**20, "attn_mb": patterns / 2**20, "hooks": len(cache),
                      "peak_mb": peak, "tokens": int(ids.shape[1])}))


def run_child(mode: str, args: argparse.Namespace, seeds: str) -> dict:
    cmd = [sys.executable, __file__, f"--{mode}", "--model", args.model, "--dataset", args.dataset,
           "--n-examples", str(args.n_examples), "--seeds", seeds, "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_prefill(model, prep: Prepared, batches: list[list[int]], recorder: Recorder | None) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        prompts = [prep.prompts[i] for i in batch]
        ids, mask = left_pad([p.tokens for p in prompts], 0)
        if recorder is None:
            prefill(model, ids, mask)
            continue
        pads = ids.shape[1] - torch.tensor([len(p.tokens) for p in prompts])
        positions = torch.stack([torch.as_tensor(p.answer_slots, dtype=torch.long) for p in prompts]) + pads[:, None]
        with recorder.record(positions, mask):
            prefill(model, ids, mask)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="friedman2")
    p.add_argument("--n-examples", type=int, default=25)
    p.add_argument("--seeds", default="0-11")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--memory-seeds", default="0-3,0-15", help="seed ranges of the memory builds")
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-original", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_memory:
        return child_memory(args)
    if args.child_original:
        return child_original(args)

    pin_mmap_threshold()  # as build() does: plain, hooked and built passes share the allocator
    seeds = parse_seeds(args.seeds)
    n = len(seeds)
    spec = BuildSpec(args.model, args.dataset, args.n_examples, seeds, batch_size=args.batch_size)
    prep = _prepare(spec)
    model = load_model(args.model)
    model_mb = sum(p.numel() * p.element_size() for p in model.hf_model.parameters()) / 2**20
    batches = _batches(n, args.batch_size)
    time_prefill(model, prep, batches[:1], None)  # warm-up: the first forward allocates
    plain_s = time_prefill(model, prep, batches, None)
    hooked_s = time_prefill(model, prep, batches, Recorder(model.hf_model))
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    path = build(spec, tmp, progress=False, model=model)
    build_s = time.perf_counter() - t0
    store = RunStore.open(path)
    session = store.attrs["build"]["sessions"][-1]
    tokens = len(prep.prompts[0].tokens)
    print(f"run: {args.model} {args.dataset} n={args.n_examples} seeds={n} tokens/prompt={tokens} "
          f"batch={args.batch_size} device={session['device']}")
    print("1. time (one loaded, warmed-up model for all three)")
    print(f"   plain prefill, same prompts and batches       {plain_s:7.1f} s  ({plain_s / n:.2f} s/seed)")
    print(f"   prefill with capture hooks                    {hooked_s:7.1f} s  ratio {hooked_s / plain_s:.3f}")
    cache_s = session["prefill_s"] + session["write_s"]
    print(f"   in the build: prefill+capture+host copy+write {cache_s:7.1f} s  ratio {cache_s / plain_s:.3f}"
          f"  (prefill+capture {session['prefill_s']:.1f} s, write {session['write_s']:.1f} s)")
    print(f"   whole build (prompts, activations, decode {session['decode_s']:.1f} s, regressors "
          f"{session['regressors_s']:.1f} s, writes) {build_s:.1f} s  ratio {build_s / plain_s:.3f}")

    print("2. memory (peak resident, child processes)")
    rows = []
    for spec_seeds in args.memory_seeds.split(","):
        m = run_child("child-memory", args, spec_seeds)
        rows.append((len(parse_seeds(spec_seeds)), m))
        print(f"   build of {rows[-1][0]:3d} seeds: peak {m['peak_mb']:6.0f} MB = {m['before_mb']:.0f} MB of imports "
              f"+ {m['peak_mb'] - m['before_mb']:.0f} MB (model weights {model_mb:.0f} MB; target model + 1024 MB)")
    if len(rows) > 1:
        print(f"   peak growth from {rows[0][0]} to {rows[-1][0]} seeds: {rows[-1][1]['peak_mb'] - rows[0][1]['peak_mb']:+.0f} MB")
    o = run_child("child-original", args, "0")
    print(f"   original's way, run_with_cache of all {o['hooks']} hooks on one {o['tokens']}-token prompt: "
          f"{o['cache_mb']:.0f} MB held ({o['attn_mb']:.0f} MB of it attention scores/patterns), "
          f"peak {o['peak_mb']:.0f} MB")
    stored = sum(np.prod(store.root[f"acts/{k}"].shape[1:]) * store.root[f"acts/{k}"].dtype.itemsize
                 for k in ("resid", "attn_out", "mlp_out", "head_out", "attn_rows"))
    print(f"   what the store keeps per prompt (uncompressed): {stored / 2**20:.1f} MB")

    print("3. bytes per seed on disk")
    base = Path(path)
    total = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
    for name in ("resid", "attn_out", "mlp_out", "head_out", "attn_rows"):
        size = sum(f.stat().st_size for f in (base / "acts" / name).rglob("*") if f.is_file())
        print(f"   acts/{name:<10} {size / n / 2**20:7.2f} MB/seed  ({store.root[f'acts/{name}'].dtype})")
    print(f"   whole store     {total / n / 2**20:7.2f} MB/seed, {total / 2**20:.1f} MB for {n} seeds")

    print("4. reading one (seed, layer) residual slice, freshly opened store")
    rng = np.random.default_rng(0)
    times = []
    n_layers = store.attrs["model"]["n_layers"]
    for _ in range(30):
        i, layer = int(rng.integers(n)), int(rng.integers(n_layers + 1))
        t0 = time.perf_counter()
        RunStore.open(path).resid(i, layer)
        times.append(time.perf_counter() - t0)
    print(f"   open + read: median {np.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms (target 50 ms)")
    s = RunStore.open(path)
    t0 = time.perf_counter()
    for _ in range(30):
        s.resid(int(rng.integers(n)), int(rng.integers(n_layers + 1)))
    print(f"   read on an open store: {(time.perf_counter() - t0) / 30 * 1000:.1f} ms")

    print("5. GPU")
    if not torch.cuda.is_available():
        print("   no GPU on this machine: skipped (run this benchmark on a GPU host)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
