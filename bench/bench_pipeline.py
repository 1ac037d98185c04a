"""Benchmark: the pipelined build against the serial one, side by side in one run.

Builds the same run twice into fresh directories: serial (every host stage inline:
`--regressor-workers 0 --write-workers 0`) and pipelined (the device's defaults, or the
counts given), checks the two stores are equal array for array, and prints each build's
phases, its wall time, the ratio, the share of the wall time the model was busy and the
bytes stored per seed. On a GPU it also prints the prefill's FLOP bound (2 x parameters x
prompt tokens at the stated peak) and the build's multiple of it.

    python bench/bench_pipeline.py                       # CPU: the embedded model, both demo runs
    python bench/bench_pipeline.py --model random:meta-llama/Llama-3.1-8B-Instruct \\
        --runs friedman2:25 --seeds 0-295 --dtype bfloat16 --peak-tflops 790     # a GPU host
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_builder.build import BuildSpec, build  # noqa: E402
from cache_builder.cli import parse_seeds  # noqa: E402
from core.models import load_model  # noqa: E402
from core.regressors import default_suite  # noqa: E402
from core.store import RunStore, every_array  # noqa: E402


def disk_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def one(spec: BuildSpec, out: Path, model) -> tuple[str, dict, float]:
    t0 = time.perf_counter()
    path = build(spec, out, progress=False, model=model)
    wall = time.perf_counter() - t0
    (session,) = RunStore.open(path).attrs["build"]["sessions"]
    return path, session, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", default="friedman2:25,linear-ni11:20", help="DATASET:N_EXAMPLES,...")
    p.add_argument("--seeds", default="0-11")
    p.add_argument("--regressors", help="comma-separated (default: the whole suite)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--regressor-workers", type=int, help="the pipelined build's (default: the device's)")
    p.add_argument("--write-workers", type=int, help="the pipelined build's (default: the device's)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the GPU's dense peak for the FLOP bound")
    args = p.parse_args()

    model = load_model(args.model, args.device, args.dtype)
    n_params = sum(t.numel() for t in model.hf_model.parameters())
    regressors = args.regressors.split(",") if args.regressors else default_suite()
    print(f"{args.model} on {model.device} ({model.hf_model.dtype}), {n_params / 1e6:.0f}M parameters, "
          f"{len(regressors)} regressors, {os.cpu_count()} cores")
    for run in args.runs.split(","):
        dataset, n = run.split(":")
        base = dict(model=args.model, dataset=dataset, n_examples=int(n), seeds=parse_seeds(args.seeds),
                    regressors=regressors, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
        tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
        try:
            with torch.no_grad():  # warm-up: the first build would pay for it
                model.hf_model(torch.ones((1, 8), dtype=torch.long, device=model.device))
            rows = {}
            for label, rw, ww in (("serial", 0, 0), ("pipelined", args.regressor_workers, args.write_workers)):
                spec = BuildSpec(**base, regressor_workers=rw, write_workers=ww)
                rows[label] = one(spec, tmp / label, model)
            a, b = every_array(rows["serial"][0]), every_array(rows["pipelined"][0])
            same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
            n_seeds = len(base["seeds"])
            tokens = RunStore.open(rows["serial"][0]).attrs["prompt"]["n_tokens"]
            print(f"\n{dataset}, {n} examples ({tokens} tokens), {n_seeds} seeds; stores equal array for array: {same}")
            print(f"{'':10} {'workers':>8} {'prefill':>8} {'decode':>8} {'cands':>8} {'regr.':>8} {'writes':>8} "
                  f"{'wall':>8} {'busy':>6}   (ms per seed; regr./writes: time the model waited)")
            for label, (path, s, wall) in rows.items():
                busy = (s["prefill_s"] + s["decode_s"] + s["candidates_s"]) / wall
                ms = lambda x: f"{1000 * x / n_seeds:8.1f}"  # noqa: E731
                print(f"{label:10} {s['regressor_workers']:>3}/{s['write_workers']:<4} {ms(s['prefill_s'])} "
                      f"{ms(s['decode_s'])} {ms(s['candidates_s'])} {ms(s['regressors_s'])} {ms(s['write_s'])} "
                      f"{ms(wall)} {busy:6.0%}")
            print(f"pipelined / serial wall time: {rows['pipelined'][2] / rows['serial'][2]:.3f}; "
                  f"{disk_bytes(rows['serial'][0]) / n_seeds / 1e6:.1f} MB stored per seed")
            if model.device.type == "cuda":
                bound = 2 * n_params * tokens / (args.peak_tflops * 1e12)
                print(f"prefill FLOP bound {1000 * bound:.1f} ms per seed at {args.peak_tflops:.0f} TFLOP/s; "
                      f"pipelined build {rows['pipelined'][2] / n_seeds / bound:.1f}x it, "
                      f"serial {rows['serial'][2] / n_seeds / bound:.1f}x")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
