"""Benchmark: a prediction build against prompt prefill alone, side by side in one run.

Builds `--model` on `--dataset` for `--seeds` into a fresh store (timing the whole
command: load, prompts, prefill, decoding, regressors, writes), then times plain
prefill forward passes of the very same prompts in the same batches, and one prompt
through the TransformerLens bridge against the SDPA model the builder runs.

    python bench/bench_predictions.py --seeds 0-99 --n-examples 25 --dataset friedman2
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cache_builder.build import BuildSpec, _batches, build
from cache_builder.cli import parse_seeds
from core.generation import left_pad, prefill
from core.models import load_model
from core.store import RunStore


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="friedman2")
    p.add_argument("--n-examples", type=int, default=25)
    p.add_argument("--seeds", default="0-99")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--keep", type=Path, help="copy the built store into this directory")
    args = p.parse_args()
    spec = BuildSpec(args.model, args.dataset, args.n_examples, parse_seeds(args.seeds),
                     batch_size=args.batch_size)
    tmp = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    path = build(spec, tmp, command="bench/bench_predictions.py")
    build_s = time.perf_counter() - t0
    store = RunStore.open(path)
    session = store.attrs["build"]["sessions"][-1]

    model = load_model(args.model)
    n = len(spec.seeds)
    prompts = [store.tokens(i) for i in range(n)]
    t0 = time.perf_counter()
    for batch in _batches(n, args.batch_size):
        ids, mask = left_pad([prompts[i] for i in batch], 0)
        prefill(model, ids, mask)
    prefill_s = time.perf_counter() - t0

    ids = torch.as_tensor(prompts[0], dtype=torch.long)[None]
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.hf_model(ids)
    sdpa_one = time.perf_counter() - t0
    bridge = model.bridge  # wraps the HF modules in place: eager, hooked attention
    t0 = time.perf_counter()
    with torch.inference_mode():
        bridge(ids)
    bridge_one = time.perf_counter() - t0

    print(f"run: {args.model} {args.dataset} n={args.n_examples} seeds={n} "
          f"tokens/prompt={len(prompts[0])} batch={args.batch_size} device={session['device']}")
    print(f"whole build (load, prompts, prefill, decode, regressors, writes): {build_s:8.1f} s "
          f"({build_s / 60:.1f} min, {build_s / n:.2f} s/seed)")
    print(f"  inside it: prefill {session['prefill_s']:.1f} s, decode {session['decode_s']:.1f} s, "
          f"regressors {session['regressors_s']:.1f} s ({session['regressors_s'] / n:.3f} s/seed)")
    print(f"prefill alone, same prompts and batches:                          {prefill_s:8.1f} s")
    print(f"ratio whole build / prefill alone:                                {build_s / prefill_s:8.2f}")
    print(f"one prompt: SDPA HF model {sdpa_one:.2f} s, TransformerBridge {bridge_one:.2f} s "
          f"(ratio {bridge_one / sdpa_one:.2f})")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        dest = args.keep / Path(path).name
        if not dest.exists():
            shutil.copytree(path, dest)
        print(f"kept {dest}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
