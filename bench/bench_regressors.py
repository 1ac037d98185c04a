"""Benchmark: the whole regressor suite, seconds per seed, per regressor and in total.

    python bench/bench_regressors.py [--dataset friedman2] [--n-examples 25] [--seeds 20]
"""

import argparse
import time

from core.datasets import DATASETS
from core.regressors import default_suite, get_regressor


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="friedman2")
    p.add_argument("--n-examples", type=int, default=25)
    p.add_argument("--seeds", type=int, default=20)
    args = p.parse_args()
    regs = [get_regressor(n) for n in default_suite()]
    spent = dict.fromkeys(default_suite(), 0.0)
    samples = [DATASETS[args.dataset].sample(s, args.n_examples) for s in range(args.seeds)]
    t0 = time.perf_counter()
    for s in samples:
        for r in regs:
            t = time.perf_counter()
            r(s.x_train, s.y_train, s.x_query, s.seed)
            spent[r.name] += time.perf_counter() - t
    total = (time.perf_counter() - t0) / args.seeds
    print(f"{args.dataset}, {args.n_examples} examples, {args.seeds} seeds, {len(regs)} regressors")
    for name, sec in sorted(spent.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {name:<24} {sec / args.seeds * 1000:8.1f} ms/seed")
    print(f"whole suite: {total:.3f} s/seed (target < 1 s: ratio {total:.2f} of the target)")


if __name__ == "__main__":
    main()
