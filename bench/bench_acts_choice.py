"""Benchmark: bytes per seed of each `--acts` choice, side by side in one run.

For each choice: the raw float16 bytes per seed of its activation arrays at Llama-3.1-8B's
shape (32 layers, d_model 4096, 32 heads; friedman2 with 25 examples: 1499 tokens, 26 stored
positions) from the store's own layout (`core.store.ActsLayout`), and, measured, the bytes
per seed on disk of a real build of the embedded model with that choice (compressed, every
array of the store), with its build time.

    PYTHONPATH=. .venv/bin/python bench/bench_acts_choice.py [--seeds 0-3]
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_builder.build import BuildSpec, build  # noqa: E402
from cache_builder.cli import parse_seeds  # noqa: E402
from core.models import load_model  # noqa: E402
from core.store import ActsChoice, ActsLayout, RunStore  # noqa: E402

CHOICES = ("all", "resid,attn_out,mlp_out,head_out,attn_rows:final", "resid,mlp_out,attn_rows:final", "resid",
           "none")
LLAMA_8B = dict(n_layers=32, d_model=4096, n_heads=32, n_positions=26)
LLAMA_8B_TOKENS = 1499


def raw_bytes(layout: ActsLayout, n_tokens: int) -> int:
    """Returns the float16 bytes of one seed's stored activation arrays."""
    total = 0
    for shape in layout.shapes(1, n_tokens).values():
        n = 1
        for k in shape:
            n *= k
        total += 2 * n
    return total


def disk_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="friedman2")
    p.add_argument("--n-examples", type=int, default=25)
    p.add_argument("--seeds", default="0-3")
    args = p.parse_args()
    model = load_model(args.model)
    seeds = parse_seeds(args.seeds)
    print(f"{'--acts':52} {'8B raw MB/seed':>15} {args.model + ' disk MB/seed':>26} {'build s/seed':>13}")
    for text in CHOICES:
        choice = ActsChoice.parse(text)
        at_8b = raw_bytes(ActsLayout(**LLAMA_8B, dtypes={}, choice=choice), LLAMA_8B_TOKENS) / 1e6
        out = Path(tempfile.mkdtemp(prefix="bench-acts-"))
        try:
            t0 = time.perf_counter()
            path = build(BuildSpec(args.model, args.dataset, args.n_examples, seeds, regressors=["mean"], acts=text),
                         out, progress=False, model=model)
            seconds = (time.perf_counter() - t0) / len(seeds)
            assert RunStore.open(path).done().all()
            print(f"{choice.text():52} {at_8b:15.1f} {disk_bytes(path) / len(seeds) / 1e6:26.2f} {seconds:13.2f}")
        finally:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
