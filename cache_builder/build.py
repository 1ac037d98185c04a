"""Builds a run store: datasets -> prompts -> model + regressors -> Zarr, resumable."""

import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from core import store as run_store
from core.datasets import DATASETS
from core.generation import Timing, greedy_answers
from core.models import check_spec, context_length, load_model, load_tokenizer
from core.prompts import TEMPLATE, build_prompts, choose_format, parse_number, tokenize_prompt
from core.regressors import default_suite, get_regressor, predict_all
from core.store import MODEL_COLUMN, Layout, RunStore, StoreError

DEFAULT_CACHE = Path("cache")


class BuildError(RuntimeError):
    """Bad build parameters; str() is one line."""


@dataclass
class BuildSpec:
    """What a run is: every field but the execution ones is checked on resume."""

    model: str
    dataset: str
    n_examples: int
    seeds: list[int]
    prompt_format: str = "aligned"
    regressors: list[str] = field(default_factory=default_suite)
    # Execution only: a resumed build may use other values.
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"

    def name(self) -> str:
        model = self.model.rstrip("/").replace("/", "--")
        return f"{model}__{self.dataset}__n{self.n_examples}__{self.prompt_format}"

    def params(self) -> dict:
        d = asdict(self)
        for key in ("batch_size", "device", "dtype"):
            d.pop(key)
        return d


def run_path(spec: BuildSpec, out_dir: Path) -> Path:
    return Path(out_dir) / f"{spec.name()}.zarr"


def _check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{socket.gethostname()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise BuildError(f"output directory {out_dir} cannot be written: {exc.strerror or exc}") from None


def _validate(spec: BuildSpec) -> None:
    DATASETS[spec.dataset]
    for name in spec.regressors:
        get_regressor(name)
    if MODEL_COLUMN in spec.regressors:
        raise BuildError(f"{MODEL_COLUMN!r} is the model's own column, not a regressor")
    if len(set(spec.regressors)) != len(spec.regressors):
        raise BuildError("a regressor is named twice")
    if spec.n_examples < 1:
        raise BuildError("--n-examples must be at least 1")
    if not spec.seeds:
        raise BuildError("no seeds to build")
    if len(set(spec.seeds)) != len(spec.seeds) or any(s < 0 for s in spec.seeds):
        raise BuildError("seeds must be distinct and non-negative")
    if spec.batch_size < 1:
        raise BuildError("--batch-size must be at least 1")
    check_spec(spec.model)


def _existing(path: Path, spec: BuildSpec) -> RunStore | None:
    """Returns the store at `path` to resume, None to create; refuses a different run."""
    if not path.exists():
        return None
    try:
        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    except Exception:
        raise StoreError(f"{path} exists and is not a Zarr store; move it away or choose another --out") from None
    if "params" not in group.attrs:
        # Killed while being created: it holds no finished seed, so start it again.
        if "done" in group and bool(np.any(group["done"][:])):
            raise StoreError(f"{path} is half-created yet has finished seeds; inspect it by hand")
        shutil.rmtree(path)
        return None
    store = RunStore.open(path, mode="r+")
    stored = store.attrs["params"]
    diff = [k for k, v in spec.params().items() if stored.get(k) != v]
    if diff:
        shown = "; ".join(f"{k}: stored {_short(stored.get(k))}, asked {_short(spec.params()[k])}" for k in diff)
        raise StoreError(f"existing run {path.name} was built with other parameters ({shown}); "
                         "use another --out or delete it")
    return store


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _batches(n: int, size: int) -> list[list[int]]:
    # A fixed partition of the seed list: a resumed build recomputes whole batches
    # with the same composition, so its numbers equal an uninterrupted build's.
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def build(spec: BuildSpec, out_dir: Path = DEFAULT_CACHE, command: str = "", progress: bool = True) -> Path:
    """Builds (or resumes) the run store for `spec` under `out_dir`; returns its path."""
    _validate(spec)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    path = run_path(spec, out_dir)
    store = _existing(path, spec)
    if store is not None and store.done().all():
        return path

    dataset = DATASETS[spec.dataset]
    samples = [dataset.sample(seed, spec.n_examples) for seed in spec.seeds]
    tokenizer = load_tokenizer(spec.model)
    fmt = choose_format(spec.prompt_format, samples, tokenizer)
    widest = max(len(fmt.write(v, dataset.n_features)) for s in samples for v in [*s.y_train, s.y_true])
    max_new_tokens = widest + 6
    n_ctx = context_length(spec.model)
    first = tokenize_prompt(samples[0], fmt, tokenizer)
    if len(first.tokens) + max_new_tokens > n_ctx:
        raise BuildError(f"{spec.n_examples} examples of {spec.dataset} take {len(first.tokens)} tokens; "
                         f"{spec.model} holds {n_ctx} (with {max_new_tokens} for the answer)")
    prompts = build_prompts(samples, fmt, tokenizer)
    n_tokens = max(len(p.tokens) for p in prompts)
    if n_tokens + max_new_tokens > n_ctx:
        raise BuildError(f"the longest prompt has {n_tokens} tokens; {spec.model} holds {n_ctx}")

    started = run_store.now()
    model = load_model(spec.model, spec.device, spec.dtype)
    columns = [MODEL_COLUMN, *spec.regressors]
    if store is None:
        attrs = {
            "params": spec.params(),
            "model": model.info,
            "dataset": {"name": dataset.name, "n_features": dataset.n_features,
                        "n_examples": spec.n_examples, "description": dataset.description},
            "seeds": spec.seeds,
            "regressors": columns,
            "regressor_descriptions": {n: get_regressor(n).description for n in spec.regressors},
            "prompt": {"template": TEMPLATE, "format": fmt.kind, "int_digits": list(fmt.int_digits),
                       "n_tokens": n_tokens, "max_new_tokens": max_new_tokens},
            "build": {"started": started, "finished": None, "device": _device_name(model.device),
                      "command": command, "sessions": []},
        }
        layout = Layout(len(spec.seeds), spec.n_examples, dataset.n_features, len(columns), n_tokens)
        store = run_store.create(path, layout, attrs)
    if not store.attrs["inputs_written"]:
        store.write_inputs(samples, prompts)

    done = store.done()
    regressors = [get_regressor(n) for n in spec.regressors]
    timing, regressor_s = Timing(), 0.0
    todo = [b for b in _batches(len(spec.seeds), spec.batch_size) if not done[b].all()]
    bar = tqdm(total=int((~done).sum()), desc=f"{spec.name()}", unit="seed", disable=not progress)
    for batch in todo:
        texts = greedy_answers(model, [prompts[i].tokens for i in batch], max_new_tokens, timing)
        for i, text in zip(batch, texts):
            if done[i]:
                continue
            s = samples[i]
            t0 = time.perf_counter()
            preds = predict_all(regressors, s.x_train, s.y_train, s.x_query, s.seed)
            regressor_s += time.perf_counter() - t0
            store.write_seed(i, np.concatenate([[parse_number(text)], preds]), text)
            bar.update(1)
    bar.close()

    build_attrs = store.attrs["build"]
    build_attrs["sessions"].append({
        "started": started, "finished": run_store.now(), "seeds_built": int((~done).sum()),
        "device": _device_name(model.device), "command": command, "batch_size": spec.batch_size,
        "prefill_s": round(timing.prefill_s, 3), "decode_s": round(timing.decode_s, 3),
        "regressors_s": round(regressor_s, 3), "prefill_tokens": timing.prefill_tokens,
    })
    build_attrs["finished"] = run_store.now()
    store.update_attrs(build=build_attrs)
    return path


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {socket.gethostname()})"
