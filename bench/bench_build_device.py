"""Benchmark: the build on a GPU host, at the embedded model's shape, and the candidates
pass checked against plain teacher forcing on that device.

The embedded GGUF (94 MB) cannot travel to the GPU host here, so this builds
`tiny-random-llama` with its layers widened to SmolLM2-135M's shape (`--shape smollm2`:
30 layers, d_model 576, 9 heads / 3 KV, MLP 1536; random weights, so its answers are
noise but every tensor has the real model's size) with the SmolLM2 tokenizer saved as a
directory (`--save-tokenizer DIR` on a machine that has the package, `--tokenizer DIR`
on the host). Prints the build's phases per seed, the candidates pass against prefill +
decoding, and the largest difference between the stored candidates' log-probabilities
and a plain forward pass over prompt + answer.

    python bench/bench_build_device.py --save-tokenizer .whl/tok                  # here
    python bench/bench_build_device.py --tokenizer .whl/tok --shape smollm2 --seeds 0-63 --dtype bfloat16
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import core.models as models
from cache_builder.build import BuildSpec, build
from cache_builder.cli import parse_seeds
from core.store import RunStore

SHAPES = {"tiny": {}, "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                                  "num_attention_heads": 9, "num_key_value_heads": 3}}


def use(tokenizer_dir: str, shape: dict) -> None:
    """Points the tiny model at a saved tokenizer and widens it to `shape`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    models.embedded_tokenizer = lambda: tok
    models.embedded_gguf_path = lambda: Path(tokenizer_dir)  # the package's check
    tiny = models.tiny_random_llama_hf
    models.tiny_random_llama_hf = lambda seed=0: tiny(seed, **shape)


@torch.inference_mode()
def check(store: RunStore, model: models.LoadedModel, rows: int) -> float:
    """Returns the largest |stored - plain| whole-answer log-probability over candidates."""
    g = store.root["candidates"]
    worst = 0.0
    for i in range(rows):
        prompt = store.tokens(i).tolist()
        for c in range(g["tokens"].shape[1]):
            seq = [int(t) for t in g["tokens"][i, c] if t >= 0]
            if not seq:
                continue
            ids = torch.tensor([prompt + seq], device=model.device)
            lp = torch.log_softmax(model.hf_model(ids).logits[0].float(), -1)
            plain = float(sum(lp[len(prompt) - 1 + k, t] for k, t in enumerate(seq)))
            worst = max(worst, abs(plain - float(np.nansum(g["logprob"][i, c]))))
    return worst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--save-tokenizer", help="save the embedded tokenizer to this directory and stop")
    p.add_argument("--tokenizer", help="a saved tokenizer directory (the GPU host)")
    p.add_argument("--shape", choices=list(SHAPES), default="tiny")
    p.add_argument("--seeds", default="0-31")
    p.add_argument("--n-examples", type=int, default=25)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int)
    args = p.parse_args()
    if args.save_tokenizer:
        models.embedded_tokenizer().save_pretrained(args.save_tokenizer)
        return
    if args.tokenizer:
        use(args.tokenizer, SHAPES[args.shape])
    spec = BuildSpec("tiny-random-llama", "friedman2", args.n_examples, parse_seeds(args.seeds),
                     regressors=["mean", "last", "linear", "knn", "gd-k10", "ridge", "lasso", "random-forest"],
                     batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    model = models.load_model(spec.model, spec.device, spec.dtype)
    t0 = time.perf_counter()
    store = RunStore.open(build(spec, tempfile.mkdtemp(), progress=False, model=model))
    wall = time.perf_counter() - t0
    s = store.attrs["build"]["sessions"][-1]
    n = len(spec.seeds)
    print(f"{s['device']}; shape {args.shape} ({model.info['n_layers']} layers, d_model {model.info['d_model']}), "
          f"{model.info['dtype']}; {n} seeds of {store.attrs['prompt']['n_tokens']} tokens, batch {s['batch_size']}")
    for key in ("prefill_s", "decode_s", "candidates_s", "regressors_s", "write_s"):
        print(f"  {key:<13} {s[key] / n * 1000:8.1f} ms/seed")
    print(f"  whole build   {wall / n * 1000:8.1f} ms/seed")
    print(f"candidates pass / (prefill + decode) = {s['candidates_s'] / (s['prefill_s'] + s['decode_s']):.3f}")
    print(f"largest |stored - plain forward| answer log-probability: {check(store, model, min(n, 4)):.2e}")


if __name__ == "__main__":
    main()
