"""Builds a run store: datasets -> prompts -> model (answers + activations) + regressors -> Zarr.

Resumable (a build killed at any moment, even by kill -9, resumes from `done`) and
shardable (`--shard I/N`: N processes, on one machine or several, build disjoint
batches of one store; the last to finish, or `consolidate`, closes it).
"""

import os
import socket
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from cache_builder.host import (Copier, HostActs, batch_summaries, default_workers, regressor_pool, store_dtypes,
                                writer_pool)
from core import store as run_store
from core.capture import Captured, Recorder
from core.datasets import DATASETS
from core.candidates import SeedCandidates, build_trie, candidate_texts
from core.teacher_forcing import teacher_force
from core.generation import Decoded, Timing, greedy_answers
from core.memory import pin_mmap_threshold
from core.models import LoadedModel, check_spec, context_length, load_model, load_tokenizer, number_tokens
from core.prompts import TEMPLATE, Prompt, build_prompts, choose_format, parse_number, tokenize_prompt
from core.regressors import default_suite, get_regressor, predict_named
from core.store import (ACT_ARRAYS, FLOAT16_LIMIT, MODEL_COLUMN, ActsChoice, ActsLayout, Layout, RunStore,
                        StoreError, location)

DEFAULT_CACHE = Path("cache")
# How long a shard other than 0 waits for shard 0 to create the store.
CREATE_WAIT_S = 600


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
    # Execution only: a resumed or sharded build may use other values.
    batch_size: int | None = None  # None: the stored run's, else sized to memory
    device: str = "auto"
    dtype: str = "auto"
    shard: tuple[int, int] = (0, 1)
    # Build at most this many more seeds in this session (whole batches, at least one),
    # then return; the same spec without it resumes the rest.
    max_seeds: int | None = None
    # Which activation arrays the run stores (`--acts`; core.store.ActsChoice.parse).
    acts: str = "all"
    # Host workers (cache_builder.host): regressor processes and store-writer threads;
    # None: sized to the device, 0: inline (the serial build).
    regressor_workers: int | None = None
    write_workers: int | None = None

    def name(self) -> str:
        model = self.model.rstrip("/").replace("/", "--")
        return f"{model}__{self.dataset}__n{self.n_examples}__{self.prompt_format}"

    def params(self) -> dict:
        d = asdict(self)
        for key in ("batch_size", "device", "dtype", "shard", "max_seeds", "regressor_workers", "write_workers"):
            d.pop(key)
        d["acts"] = ActsChoice.parse(self.acts).text()
        if d["acts"] == "all":  # absent from the stores built before --acts, which keep resuming
            d.pop("acts")
        return d


def run_path(spec: BuildSpec, out_dir: str | Path) -> str:
    # file:// URLs go to Zarr's local store, which writes every file atomically.
    return f"{str(out_dir).removeprefix('file://').rstrip('/')}/{spec.name()}.zarr"


def _check_out_dir(out_dir: str | Path) -> None:
    fs, path = location(out_dir)
    probe = f"{path}/.write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except OSError as exc:
        raise BuildError(f"output directory {out_dir} cannot be written: {exc.strerror or exc}") from None


def _validate(spec: BuildSpec) -> None:
    DATASETS[spec.dataset]
    ActsChoice.parse(spec.acts)
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
    if spec.batch_size is not None and spec.batch_size < 1:
        raise BuildError("--batch-size must be at least 1")
    if spec.max_seeds is not None and spec.max_seeds < 1:
        raise BuildError("--max-seeds must be at least 1")
    for flag, value in (("--regressor-workers", spec.regressor_workers), ("--write-workers", spec.write_workers)):
        if value is not None and value < 0:
            raise BuildError(f"{flag} must be 0 (inline) or more")
    i, n = spec.shard
    if not (n >= 1 and 0 <= i < n):
        raise BuildError(f"shard {i}/{n} is out of range: use I/N with 0 <= I < N")
    check_spec(spec.model)


def _existing(path: str, spec: BuildSpec) -> RunStore | None:
    """Returns the store at `path` to resume, None to create; refuses a different run."""
    fs, root = location(path)
    if not fs.exists(root):
        return _wait_for_creation(path) if spec.shard[0] != 0 else None
    try:
        group = zarr.open_group(path, mode="r+", zarr_format=3)
    except Exception:
        raise StoreError(f"{path} exists and is not a Zarr store; move it away or choose another --out") from None
    if "params" not in group.attrs:
        if spec.shard[0] != 0:
            return _wait_for_creation(path)
        # Killed while being created: it holds no finished seed, so start it again.
        if "done" in group and bool(np.any(group["done"][:])):
            raise StoreError(f"{path} is half-created yet has finished seeds; inspect it by hand")
        fs.rm(root, recursive=True)
        return None
    store = RunStore.open(path, mode="r+")
    # A run built before --acts (or with its default) has no "acts" parameter: it holds all.
    stored, asked = ({"acts": "all", **p} for p in (store.attrs["params"], spec.params()))
    diff = [k for k in asked | stored if stored.get(k) != asked.get(k)]
    if diff:
        shown = "; ".join(f"{k}: stored {_short(stored.get(k))}, asked {_short(asked.get(k))}" for k in diff)
        raise StoreError(f"existing run {store.name} was built with other parameters ({shown}); "
                         "use another --out or delete it")
    return store


def _wait_for_creation(path: str) -> RunStore:
    deadline = time.time() + CREATE_WAIT_S
    while time.time() < deadline:
        try:
            return RunStore.open(path, mode="r+")
        except StoreError:
            time.sleep(1.0)
    raise StoreError(f"{path}: shard 0 did not create the store within {CREATE_WAIT_S} s; start shard 0")


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _batches(n: int, size: int) -> list[list[int]]:
    # A fixed partition of the seed list: a resumed or sharded build computes whole
    # batches with the same composition, so its numbers equal an uninterrupted build's.
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def _first_seeds(todo: list[list[int]], done: np.ndarray, max_seeds: int) -> list[list[int]]:
    """Returns the first batches of `todo` holding at most `max_seeds` unfinished seeds
    (at least the first batch: a build always makes progress)."""
    out, n = [], 0
    for batch in todo:
        k = int((~done[batch]).sum())
        if out and n + k > max_seeds:
            break
        out.append(batch)
        n += k
    return out


@dataclass
class Prepared:
    """Everything a build computes before touching the model."""

    samples: list
    prompts: list[Prompt]
    fmt: object
    n_tokens: int
    max_new_tokens: int


def _prepare(spec: BuildSpec) -> Prepared:
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
    return Prepared(samples, prompts, fmt, n_tokens, max_new_tokens)


class BatchRunner:
    """Runs one batch: prefill with activation capture, then greedy answers; then the
    candidates' teacher-forced pass."""

    def __init__(self, model: LoadedModel, prep: Prepared, timing: Timing, n_columns: int) -> None:
        self.model, self.prep, self.timing, self.n_columns = model, prep, timing, n_columns
        self.recorder = Recorder(model.hf_model)

    def __call__(self, batch: list[int]) -> tuple[Decoded, Captured, list[int]]:
        """Returns the answers, the activations (left-padded coordinates) and the pads."""
        prompts = [self.prep.prompts[i] for i in batch]
        width = max(len(p.tokens) for p in prompts)
        pads = [width - len(p.tokens) for p in prompts]
        positions = torch.as_tensor(np.stack([p.answer_slots + pad for p, pad in zip(prompts, pads)]),
                                    dtype=torch.long, device=self.model.device)
        captured: dict = {}
        decoded = greedy_answers(self.model, [p.tokens for p in prompts], self.prep.max_new_tokens,
                                 self.timing, capture=(self.recorder, positions, captured))
        return decoded, captured["out"], pads

    def candidates(self, batch: list[int], decoded: Decoded, preds: list[np.ndarray]) -> list[SeedCandidates]:
        """Returns each seed's candidate arrays; `preds[j]` is row j's columns (model first)."""
        tok, fmt = self.model.tokenizer, self.prep.fmt
        tries = []
        for i, text, values in zip(batch, decoded.texts, preds):
            s = self.prep.samples[i]
            answers = candidate_texts(s.y_true, text, values[1:], fmt, s.x_train.shape[1])
            tries.append(build_trie(int(self.prep.prompts[i].tokens[-1]),
                                    [None if a is None else tok.encode(a, add_special_tokens=False) for a in answers]))
        return teacher_force(self.model, tries, decoded.cache, decoded.prompt_mask,
                             self.prep.max_new_tokens, 2 * (self.n_columns + 1))


def _peaks(c: Captured) -> dict[str, float]:
    return {name: float(getattr(c, name).abs().max()) for name in ACT_ARRAYS}


def _dtypes(peaks: dict[str, float]) -> dict[str, str]:
    """float16 for each array whose first batch stays well inside its range, else float32."""
    return {name: "float16" if peak < FLOAT16_LIMIT else "float32" for name, peak in peaks.items()}


def _seed_acts(host: dict[str, np.ndarray], j: int, pad: int, n_tokens: int) -> dict[str, np.ndarray]:
    """Returns row j's activations; attention rows over the seed's own tokens (the batch's
    left padding cut off, the run's length filled with 0)."""
    out = {name: host[name][j] for name in ("resid", "attn_out", "mlp_out", "head_out")}
    rows = host["attn_rows"][j, ..., pad:]
    full = np.zeros((*rows.shape[:-1], n_tokens), dtype=rows.dtype)
    full[..., : rows.shape[-1]] = rows
    out["attn_rows"] = full
    return out


def _write_seed(store: RunStore, i: int, preds: np.ndarray, text: str, cands: SeedCandidates, host: HostActs,
                summaries: dict[str, np.ndarray], j: int, pad: int, n_tokens: int, bar: tqdm) -> None:
    """Writes seed row `i` (row j of its batch); a writer thread's task."""
    acts = _seed_acts(host.numpy(), j, pad, n_tokens)
    store.write_seed(i, preds, text, store.acts_choice.keep(acts), cands,
                     {name: s[j] for name, s in summaries.items()})
    bar.update(1)


def _drain(pending: list[Future]) -> float:
    """Waits for `pending` (raising the first failure); returns the seconds waited."""
    t0 = time.perf_counter()
    for f in pending:
        f.result()
    return time.perf_counter() - t0


def _unembed(store: RunStore, model: LoadedModel) -> None:
    hf = model.hf_model
    ids, text = number_tokens(model.tokenizer)
    w_u = hf.lm_head.weight[torch.as_tensor(ids, device=hf.lm_head.weight.device)].T
    norm = hf.model.norm
    store.write_unembed(norm.weight.detach().float().cpu().numpy(), norm.variance_epsilon,
                        w_u.detach().float().cpu().numpy(), np.asarray(ids), text)


def build(spec: BuildSpec, out_dir: str | Path = DEFAULT_CACHE, command: str = "", progress: bool = True,
          model: LoadedModel | None = None) -> str:
    """Builds (or resumes) the run store for `spec` under `out_dir`; returns its location.

    `model`: an already loaded model of `spec.model` to use instead of loading one.
    """
    _validate(spec)
    _check_out_dir(out_dir)
    path = run_path(spec, out_dir)
    store = _existing(path, spec)
    if store is not None and store.done().all():
        _finish(store)
        return path
    pin_mmap_threshold()

    prep = _prepare(spec)
    started = run_store.now()
    model = model or load_model(spec.model, spec.device, spec.dtype)
    timing, regressor_s, candidates_s, write_s = Timing(), 0.0, 0.0, 0.0
    run_batch = BatchRunner(model, prep, timing, 1 + len(spec.regressors))
    batch_size = (spec.batch_size or (store.attrs["build"]["batch_size"] if store is not None else None)
                  or auto_batch_size(model, prep.n_tokens, spec.n_examples + 1))
    batches = _batches(len(spec.seeds), batch_size)
    mine = [b for k, b in enumerate(batches) if k % spec.shard[1] == spec.shard[0]]
    first = None
    if store is None:
        try:
            first = run_batch(mine[0])
        except DEVICE_FAILURES as exc:
            raise _device_failed(exc, model, batch_size, 0, len(spec.seeds)) from None
        store = _create(path, spec, prep, model, _dtypes(_peaks(first[1])), started, batch_size)

    done = store.done()
    todo = [b for b in mine if not done[b].all()]
    if spec.max_seeds is not None:
        todo = _first_seeds(todo, done, spec.max_seeds)
    n_todo = int(sum((~done[b]).sum() for b in todo))
    auto = default_workers(model.device)
    n_procs = auto[0] if spec.regressor_workers is None else spec.regressor_workers
    n_threads = auto[1] if spec.write_workers is None else spec.write_workers
    bar = tqdm(total=n_todo, desc=spec.name(), unit="seed", disable=not progress)
    t_start = time.perf_counter()
    procs, writers = regressor_pool(n_procs), writer_pool(n_threads)
    failure = None
    try:
        # Worker processes get every batch's samples at once: the regressors need no model.
        # Inline, each batch's regressors run when the batch needs them, as the serial build did.
        regressed: dict[int, Future] = {}

        def feed(batches: list[list[int]]) -> None:
            for i in (i for b in batches for i in b if i not in regressed):
                s = prep.samples[i]
                regressed[i] = procs.submit(predict_named, spec.regressors, s.x_train, s.y_train, s.x_query, s.seed)

        if n_procs:
            feed(todo)
        pending: list[Future] = []
        copier = Copier()
        for batch in todo:
            decoded, captured, pads = first if first is not None and batch == mine[0] else run_batch(batch)
            first = None
            peaks = _peaks(captured)
            if _overflows(store, peaks):
                write_s += _drain(pending)  # no write may land in an array being rewritten
                _check_range(store, peaks)
            t0 = time.perf_counter()
            dtypes = store.act_dtypes()
            feed([batch])
            preds = [np.concatenate([[parse_number(text)], regressed.pop(i).result()])
                     for text, i in zip(decoded.texts, batch)]
            t1 = time.perf_counter()
            cands = run_batch.candidates(batch, decoded, preds)
            t2 = time.perf_counter()
            regressor_s, candidates_s = regressor_s + t1 - t0, candidates_s + t2 - t1
            # The previous batch's writes ran beside this batch's passes; a failed one stops
            # the build before more are queued, and the copier's buffers are free again.
            _drain(pending)
            converted = store_dtypes(captured, dtypes)
            del captured
            summaries = batch_summaries(converted, [prep.prompts[i] for i in batch], pads)
            host = copier(converted)
            del converted
            pending = [writers.submit(_write_seed, store, i, preds[j], decoded.texts[j], cands[j], host, summaries,
                                      j, pads[j], prep.n_tokens, bar)
                       for j, i in enumerate(batch) if not done[i]]
            del decoded
            write_s += time.perf_counter() - t2
        write_s += _drain(pending)
    except DEVICE_FAILURES as exc:
        failure = exc
    finally:
        # Queued regressors are dropped; the writes in flight finish (they are finished seeds).
        procs.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True)
    bar.close()
    if failure is not None:
        raise _device_failed(failure, model, batch_size, int(store.done().sum()), len(spec.seeds)) from None
    wall_s = time.perf_counter() - t_start

    session = {
        "started": started, "finished": run_store.now(), "seeds_built": n_todo,
        "shard": f"{spec.shard[0]}/{spec.shard[1]}", "device": _device_name(model.device),
        "command": command, "batch_size": batch_size,
        "prefill_s": round(timing.prefill_s, 3), "decode_s": round(timing.decode_s, 3),
        "regressors_s": round(regressor_s, 3), "candidates_s": round(candidates_s, 3), "write_s": round(write_s, 3),
        "wall_s": round(wall_s, 3), "regressor_workers": n_procs, "write_workers": n_threads,
        "prefill_tokens": timing.prefill_tokens,
    }
    store.root.require_group("sessions").create_group(
        f"{started.replace(':', '')}-{spec.shard[0]}of{spec.shard[1]}-{socket.gethostname()}-{os.getpid()}",
    ).attrs.update(session)
    if store.done().all():
        _finish(store)
    return path


# What a GPU raises when it runs out of memory or fails (an Xid error, a GPU fallen off
# the bus); the process cannot go on with it, but the finished seeds are safe.
DEVICE_FAILURES = (torch.OutOfMemoryError, torch.AcceleratorError)


def _device_failed(exc: BaseException, model: LoadedModel, batch_size: int, done: int, total: int) -> BuildError:
    """Returns the one-line error of a device that failed mid-build."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    kept = f"{done} of {total} seeds are finished and kept"
    if isinstance(exc, torch.OutOfMemoryError):
        return BuildError(f"out of memory on {model.device} in a batch of {batch_size} seeds ({first_line}); {kept}; "
                          "run the same command with a smaller --batch-size to resume")
    return BuildError(f"the device {model.device} failed mid-build ({first_line}); {kept}; "
                      "run the same command to resume once it is back")


def _create(path: str, spec: BuildSpec, prep: Prepared, model: LoadedModel, dtypes: dict, started: str,
            batch_size: int) -> RunStore:
    dataset = DATASETS[spec.dataset]
    info = model.info
    columns = [MODEL_COLUMN, *spec.regressors]
    attrs = {
        "model": info,
        "dataset": {"name": dataset.name, "n_features": dataset.n_features,
                    "n_examples": spec.n_examples, "description": dataset.description},
        "seeds": spec.seeds,
        "regressors": columns,
        "regressor_descriptions": {n: get_regressor(n).description for n in spec.regressors},
        "prompt": {"template": TEMPLATE, "format": prep.fmt.kind, "int_digits": list(prep.fmt.int_digits),
                   "n_tokens": prep.n_tokens, "max_new_tokens": prep.max_new_tokens},
        # A resumed build reuses this batch size unless told otherwise: the same batches
        # give the same numbers.
        "build": {"started": started, "finished": None, "device": _device_name(model.device),
                  "command": "", "sessions": [], "batch_size": batch_size},
    }
    layout = Layout(len(spec.seeds), spec.n_examples, dataset.n_features, len(columns), prep.n_tokens,
                    prep.max_new_tokens)
    acts = ActsLayout(info["n_layers"], info["d_model"], info["n_heads"], spec.n_examples + 1, dtypes,
                      ActsChoice.parse(spec.acts))
    store = run_store.create(path, layout, acts, attrs)
    store.write_inputs(prep.samples, prep.prompts)
    _unembed(store, model)
    used = np.union1d(np.concatenate([p.tokens for p in prep.prompts]), number_tokens(model.tokenizer)[0])
    store.write_vocab(used, model.tokenizer.batch_decode([[int(i)] for i in used]))
    store.update_attrs(params=spec.params())  # last: its presence says the store is set up
    return store


def _overflows(store: RunStore, peaks: dict[str, float]) -> list[str]:
    """Returns the float16 arrays that this batch's peaks overflow."""
    dtypes = store.act_dtypes()
    return [name for name, peak in peaks.items()
            if dtypes[name] == "float16" and not peak < float(np.finfo(np.float16).max)]


def _check_range(store: RunStore, peaks: dict[str, float]) -> None:
    for name in _overflows(store, peaks):
        store.promote_to_float32(name, f"a value of magnitude {peaks[name]:.4g} overflows float16")


def _finish(store: RunStore) -> None:
    """Gathers every session's record into the root attrs and consolidates metadata."""
    sessions = [dict(g.attrs) for _, g in sorted(store.root.require_group("sessions").groups())]
    build_attrs = store.attrs["build"]
    if build_attrs.get("sessions") != sessions or not build_attrs.get("finished"):
        build_attrs.update(sessions=sessions, finished=max(s["finished"] for s in sessions),
                           command=sessions[0]["command"] if sessions else "")
        store.update_attrs(build=build_attrs)
        zarr.consolidate_metadata(store.root.store)


def consolidate(path: str) -> RunStore:
    """Closes a sharded build: checks every seed is done, merges the shards' records."""
    store = RunStore.open(path, mode="r+")
    missing = int((~store.done()).sum())
    if missing:
        raise StoreError(f"{store.name}: {missing} seeds are not done yet; finish every shard first")
    _finish(store)
    return store


CPU_BATCH = 4


def auto_batch_size(model: LoadedModel, n_tokens: int, n_positions: int) -> int:
    """Returns a batch size: 4 on the CPU; on a GPU, what 60% of its free memory holds.

    Per sequence: the KV cache, the MLP's widest temporaries and the attention rows of
    the stored positions, counted at 4 bytes for their float32 scores though they are
    kept as float16 (the eager pattern is never materialised: SDPA).
    """
    if model.device.type != "cuda":
        return CPU_BATCH
    cfg, info = model.hf_model.config, model.info
    width = model.dtype_bytes
    kv = model.kv_bytes_per_token
    temps = (3 * int(cfg.intermediate_size) + 6 * info["d_model"]) * width
    rows = info["n_layers"] * info["n_heads"] * n_positions * 4
    per_seq = n_tokens * (kv + temps + rows)
    free, _ = torch.cuda.mem_get_info(model.device)
    return max(1, min(256, int(0.6 * free // per_seq)))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {socket.gethostname()})"
