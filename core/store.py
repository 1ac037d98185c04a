"""The Zarr v3 run store: the contract between the cache builder and the app.

One store per run (model x dataset x n_examples x prompt format), a directory
`NAME.zarr`. Seeds are the first axis of every per-seed array; every per-seed array
is chunked one seed per chunk, so a seed is written (atomically, file by file) without
touching any other seed's data. `done[s]` is written last for each seed: a build
that is killed resumes from it. See DESIGN.md "The run store" for the array names.
"""

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from jaxtyping import Bool, Float, Int

SCHEMA_VERSION = 1
MODEL_COLUMN = "model"


class StoreError(RuntimeError):
    """A store that cannot be used as asked; str() is one line."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _per_seed(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any, fill: Any) -> zarr.Array:
    return group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype, fill_value=fill)


@dataclass(frozen=True)
class Layout:
    """The shapes of a run: seeds, examples, features, regressor columns, token length."""

    n_seeds: int
    n_examples: int
    n_features: int
    n_columns: int
    n_tokens: int


def create(path: Path, layout: Layout, attrs: dict) -> "RunStore":
    """Creates an empty run store at `path` (which must not exist) and returns it."""
    s, n, f, r, t = layout.n_seeds, layout.n_examples, layout.n_features, layout.n_columns, layout.n_tokens
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    _per_seed(root, "x_train", (s, n, f), "float64", np.nan)
    _per_seed(root, "y_train", (s, n), "float64", np.nan)
    _per_seed(root, "x_query", (s, f), "float64", np.nan)
    _per_seed(root, "y_true", (s,), "float64", np.nan)
    _per_seed(root, "tokens", (s, t), "int32", -1)
    pos = root.create_group("positions")
    pos.attrs["doc"] = ("[start, stop) token spans of each value with the space before it; "
                        "x: [seed, example (query last), feature, 2]; y: [seed, example, 2]; "
                        "answer_slots: token of the space after 'Output:' (query's = final)")
    _per_seed(pos, "x", (s, n + 1, f, 2), "int32", -1)
    _per_seed(pos, "y", (s, n, 2), "int32", -1)
    _per_seed(pos, "answer_slots", (s, n + 1), "int32", -1)
    _per_seed(pos, "final", (s,), "int32", -1)
    _per_seed(pos, "n_tokens", (s,), "int32", 0)
    _per_seed(root, "predictions", (s, r), "float64", np.nan)
    _per_seed(root, "llm_text", (s,), str, "")
    _per_seed(root, "done", (s,), "bool", False)
    root.attrs.update({"schema_version": SCHEMA_VERSION, "inputs_written": False, **attrs})
    return RunStore(path, root)


class RunStore:
    """Read (and, for the builder, write) access to one run store."""

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = Path(path)
        self.root = root

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "RunStore":
        """Opens a store, refusing a missing one or one of another schema version."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path} is not a run store (no zarr.json)")
        try:
            root = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as exc:  # zarr raises several types for a corrupt group
            raise StoreError(f"{path} cannot be opened as a Zarr v3 group: {exc}") from None
        version = root.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path} has schema version {version}; this code reads {SCHEMA_VERSION}")
        return cls(path, root)

    @property
    def attrs(self) -> dict:
        return dict(self.root.attrs)

    @property
    def seeds(self) -> list[int]:
        return list(self.root.attrs["seeds"])

    @property
    def columns(self) -> list[str]:
        """Returns the prediction column names, in order (the model's is `model`)."""
        return list(self.root.attrs["regressors"])

    def array(self, name: str) -> zarr.Array:
        return self.root[name]

    def done(self) -> Bool[np.ndarray, " s"]:
        return self.root["done"][:]

    def predictions(self) -> Float[np.ndarray, "s R"]:
        return self.root["predictions"][:]

    def y_true(self) -> Float[np.ndarray, " s"]:
        return self.root["y_true"][:]

    def llm_text(self) -> np.ndarray:
        return self.root["llm_text"][:]

    def tokens(self, index: int) -> Int[np.ndarray, " T"]:
        n = int(self.root["positions/n_tokens"][index])
        return self.root["tokens"][index, :n]

    # Writing, for the builder.

    def write_inputs(self, samples: list, prompts: list) -> None:
        """Writes every seed's data, tokens and positions (deterministic; safe to repeat)."""
        r = self.root
        r["x_train"][:] = np.stack([s.x_train for s in samples])
        r["y_train"][:] = np.stack([s.y_train for s in samples])
        r["x_query"][:] = np.stack([s.x_query for s in samples])
        r["y_true"][:] = np.array([s.y_true for s in samples])
        tokens = np.full(r["tokens"].shape, -1, dtype=np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p.tokens)] = p.tokens
        r["tokens"][:] = tokens
        r["positions/x"][:] = np.stack([p.x_spans for p in prompts])
        r["positions/y"][:] = np.stack([p.y_spans for p in prompts])
        r["positions/answer_slots"][:] = np.stack([p.answer_slots for p in prompts])
        r["positions/final"][:] = np.array([p.final for p in prompts], dtype=np.int32)
        r["positions/n_tokens"][:] = np.array([len(p.tokens) for p in prompts], dtype=np.int32)
        self.root.attrs["inputs_written"] = True

    def write_seed(self, index: int, predictions: Float[np.ndarray, " R"], text: str) -> None:
        """Writes one seed's predictions and raw answer, then marks it done."""
        self.root["predictions"][index] = predictions
        self.root["llm_text"][index] = text
        self.root["done"][index] = True

    def update_attrs(self, **attrs: Any) -> None:
        self.root.attrs.update(attrs)


def describe(store: RunStore) -> str:
    """Returns a human-readable description of a store: provenance and contents."""
    a = store.attrs
    done = store.done()
    model, data, prompt, build = a.get("model", {}), a.get("dataset", {}), a.get("prompt", {}), a.get("build", {})
    lines = [
        f"run store   {store.path}",
        f"schema      {a.get('schema_version')}",
        f"model       {model.get('spec')} ({model.get('name')}; {model.get('n_layers')} layers, "
        f"d_model {model.get('d_model')}, {model.get('n_heads')} heads / {model.get('n_kv_heads')} kv, "
        f"{model.get('dtype')}, compat mode {model.get('compatibility_mode')})",
        f"dataset     {data.get('name')}: {data.get('n_features')} features, {data.get('n_examples')} examples",
        f"prompt      {prompt.get('format')} format, {prompt.get('n_tokens')} tokens, "
        f"integer digits {prompt.get('int_digits')}",
        f"seeds       {int(done.sum())}/{len(done)} done ({_ranges(store.seeds)})",
        f"columns     {len(store.columns)}: {', '.join(store.columns)}",
        f"built       {build.get('started')} -> {build.get('finished') or 'unfinished'} on {build.get('device')}",
        f"command     {build.get('command')}",
        "arrays:",
    ]
    def walk(group: zarr.Group, prefix: str = "") -> None:
        for name, item in sorted(group.members()):
            if isinstance(item, zarr.Group):
                walk(item, f"{prefix}{name}/")
            else:
                lines.append(f"  {prefix + name:<26} {str(item.shape):<18} {item.dtype}")
    walk(store.root)
    return "\n".join(lines)


def _ranges(seeds: list[int]) -> str:
    out, start = [], None
    for i, s in enumerate(seeds):
        if start is None:
            start = s
        if i + 1 == len(seeds) or seeds[i + 1] != s + 1:
            out.append(str(start) if start == s else f"{start}-{s}")
            start = None
    return ",".join(out)
