"""The Zarr v3 run store: the contract between the cache builder and the app.

One store per run (model x dataset x n_examples x prompt format), a directory
`NAME.zarr` (a local path or an fsspec URL). Seeds are the first axis of every
per-seed array. Small per-seed arrays have one chunk per seed; activation arrays
have one shard per seed holding one chunk per layer, so a writer owns whole files
(concurrent `--shard I/N` builds never write the same file; Zarr's local store
writes each file atomically) and a (seed, layer) slice reads one chunk.
`done[s]` is written last for each seed: a build that is killed resumes from it.
See DESIGN.md "The run store" for the array names.
"""

import datetime as dt
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from jaxtyping import Bool, Float, Int
from zarr.codecs import BloscCodec

from core import candidates as core_candidates
from core import summary as core_summary
from core.candidates import TRUTH, SeedCandidates
from core.heads import HEAD_SCORES
from core.prompts import NumberFormat

SCHEMA_VERSION = 2  # 2: candidates/, summary/, vocab/
MODEL_COLUMN = "model"
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")

# Largest magnitude stored as float16 (its max is 65504): headroom for later seeds.
FLOAT16_LIMIT = 8192.0
# Byte-shuffled zstd (measured on friedman2: float16 attention rows 21 MB -> 7.1 MB per seed).
ACT_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


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
    n_steps: int  # the longest answer, in tokens


ACT_ARRAYS = ("resid", "attn_out", "mlp_out", "head_out", "attn_rows")
# Which queries' attention rows `acts/attn_rows` holds: every stored position, or the final one.
ROWS_AT = ("stored", "final")


@dataclass(frozen=True)
class ActsChoice:
    """Which activation arrays a run stores (`--acts`), and the attention rows of which positions."""

    arrays: tuple[str, ...] = ACT_ARRAYS
    rows_at: str = "stored"

    @classmethod
    def parse(cls, text: str) -> "ActsChoice":
        """Parses `all`, `none` or a comma list of array names, `attn_rows:final` for the final
        position's attention rows only; raises StoreError (one line) for an unknown name."""
        if text.strip() == "all":
            return cls()
        if text.strip() == "none":
            return cls(())
        arrays, rows_at = [], "stored"
        for part in (p.strip() for p in text.split(",")):
            name, _, at = part.partition(":")
            if name not in ACT_ARRAYS or (at and (name != "attn_rows" or at not in ROWS_AT)):
                raise StoreError(f"--acts: unknown array {part!r}; use all, none or some of "
                                 f"{', '.join(ACT_ARRAYS)} (attn_rows:final for the final position's rows)")
            arrays.append(name)
            rows_at = at or rows_at
        return cls(tuple(n for n in ACT_ARRAYS if n in arrays), rows_at)

    def keep(self, acts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Returns what a run with this choice stores of one seed's activations (every array)."""
        out = {name: acts[name] for name in self.arrays}
        if "attn_rows" in out and self.rows_at == "final":
            out["attn_rows"] = out["attn_rows"][..., -1:, :]
        return out

    def text(self) -> str:
        """Returns the `--acts` value that gives this choice."""
        if self == ActsChoice():
            return "all"
        return ",".join(n + (":final" if n == "attn_rows" and self.rows_at == "final" else "")
                        for n in self.arrays) or "none"


@dataclass(frozen=True)
class ActsLayout:
    """The shapes of the activation arrays: layers, width, heads, stored positions, dtypes,
    and which arrays the run keeps."""

    n_layers: int
    d_model: int
    n_heads: int
    n_positions: int
    dtypes: dict  # act name -> "float16" | "float32"
    choice: ActsChoice = ActsChoice()

    def shapes(self, n_seeds: int, n_tokens: int) -> dict[str, tuple[int, ...]]:
        """Returns the shape of each array the run keeps."""
        s, L, d, h, p = n_seeds, self.n_layers, self.d_model, self.n_heads, self.n_positions
        rows = p if self.choice.rows_at == "stored" else 1
        every = {"resid": (s, L + 1, p, d), "attn_out": (s, L, p, d), "mlp_out": (s, L, p, d),
                 "head_out": (s, L, h, d), "attn_rows": (s, L, h, rows, n_tokens)}
        return {name: every[name] for name in self.choice.arrays}


def location(url: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """Returns the filesystem and path of a store location (local path or fsspec URL)."""
    return fsspec.core.url_to_fs(str(url))


def create(path: str | Path, layout: Layout, acts: ActsLayout, attrs: dict) -> "RunStore":
    """Creates an empty run store at `path` (which must not exist) and returns it.

    `attrs` should not hold "params": the builder sets it once the inputs are written,
    and a store without it is taken for one killed while being created.
    """
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
    group = root.create_group("acts")
    group.attrs["doc"] = ("activations at the stored token positions acts/positions [seed, P] "
                          "(every answer slot, the query's = the final position, last); "
                          "head_out at the final position; attn_rows over the seed's own tokens")
    _per_seed(group, "positions", (s, acts.n_positions), "int32", -1)
    for name, shape in acts.shapes(s, t).items():
        chunk = (1, 1, *shape[2:])
        group.create_array(name, shape=shape, chunks=chunk, shards=(1, *shape[1:]),
                           dtype=acts.dtypes[name], fill_value=0, compressors=ACT_CODEC)
    # The dtypes of the arrays not kept too: the builder converts them alike before summarising.
    group.attrs.update(kept={"arrays": list(acts.choice.arrays), "attn_rows_at": acts.choice.rows_at},
                       dtypes=dict(acts.dtypes))
    _create_candidates(root, layout, acts, [TRUTH, *attrs["regressors"]])
    summary = root.create_group("summary")
    summary.attrs["doc"] = core_summary.__doc__
    summary.attrs["head_scores"] = list(HEAD_SCORES)
    _per_seed(summary, "final_resid", (s, acts.n_layers + 1, acts.d_model), "float32", np.nan)
    _per_seed(summary, "mlp_norm", (s, acts.n_layers, acts.n_positions), "float32", np.nan)
    _per_seed(summary, "head_scores", (s, len(HEAD_SCORES), acts.n_layers, acts.n_heads), "float32", np.nan)
    root.attrs.update({"schema_version": SCHEMA_VERSION, **attrs})
    return RunStore(path, root)


def _create_candidates(root: zarr.Group, layout: Layout, acts: ActsLayout, names: list[str]) -> None:
    s, c, k, n_layers, h = layout.n_seeds, len(names), layout.n_steps, acts.n_layers, acts.n_heads
    e = 2 * c  # a trie with c leaves has at most 2(c - 1) edges out of its branching nodes
    g = root.create_group("candidates")
    g.attrs.update({"names": names, "doc": core_candidates.__doc__})
    _per_seed(g, "tokens", (s, c, k), "int32", -1)
    _per_seed(g, "logprob", (s, c, k), "float32", np.nan)
    _per_seed(g, "edge", (s, c, k), "int32", -1)
    for name, shape in {"rms": (s, e, n_layers + 1), "dla_embed": (s, e), "dla_heads": (s, e, n_layers, h),
                        "dla_mlp": (s, e, n_layers)}.items():
        g.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype="float32", fill_value=np.nan,
                       compressors=ACT_CODEC)


class RunStore:
    """Read (and, for the builder, write) access to one run store."""

    def __init__(self, path: str | Path, root: zarr.Group) -> None:
        self.path = path if "://" in str(path) else Path(path)
        self.root = root

    @property
    def name(self) -> str:
        return str(self.path).rstrip("/").rsplit("/", 1)[-1]

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "RunStore":
        """Opens a store, refusing a missing, half-created or other-schema one."""
        fs, root_path = location(path)
        if not fs.exists(f"{root_path}/zarr.json"):
            raise StoreError(f"{path} is not a run store (no zarr.json)")
        try:
            # Writers must see groups added since the last consolidation (build sessions).
            root = zarr.open_group(str(path), mode=mode, zarr_format=3,
                                   use_consolidated=None if mode == "r" else False)
        except Exception as exc:  # zarr raises several types for a corrupt group
            raise StoreError(f"{path} cannot be opened as a Zarr v3 group: {exc}") from None
        version = root.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path} has schema version {version}; this code reads {SCHEMA_VERSION}: "
                             "build it again (its command is in its attrs, build.command)")
        if "params" not in root.attrs:
            raise StoreError(f"{path} is half-created (killed while being set up); "
                             "run its build command again to recreate it")
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

    def number_format(self) -> NumberFormat:
        """Returns the number format the run's prompts are written in."""
        a = self.attrs["prompt"]
        return NumberFormat(a["format"], tuple(a["int_digits"]))

    def llm_text(self) -> np.ndarray:
        return self.root["llm_text"][:]

    def tokens(self, index: int) -> Int[np.ndarray, " T"]:
        n = int(self.root["positions/n_tokens"][index])
        return self.root["tokens"][index, :n]

    def index(self, seed: int) -> int:
        """Returns the row of `seed` in every per-seed array."""
        try:
            return self.seeds.index(seed)
        except ValueError:
            raise StoreError(f"seed {seed} is not in {self.name}") from None

    # Activations: every accessor reads only the slice asked for, as float32.

    @cached_property
    def acts_choice(self) -> ActsChoice:
        """Which activation arrays the run holds (every one in a store built before `--acts`)."""
        kept = self.root["acts"].attrs.get("kept")
        return ActsChoice() if kept is None else ActsChoice(tuple(kept["arrays"]), kept["attn_rows_at"])

    def _act(self, name: str) -> zarr.Array:
        choice = self.acts_choice
        if name not in choice.arrays:
            raise StoreError(f"run {self.name} holds no acts/{name}: it was built with --acts {choice.text()}")
        return self.root[f"acts/{name}"]

    def act_positions(self, index: int) -> Int[np.ndarray, " P"]:
        """Returns the token positions the activations of row `index` are stored at."""
        return self.root["acts/positions"][index]

    def resid(self, index: int, layer: int) -> Float[np.ndarray, "P d"]:
        """Residual stream before `layer` (layer n_layers: after the last), stored positions."""
        return self._act("resid")[index, layer].astype(np.float32)

    def attn_out(self, index: int, layer: int) -> Float[np.ndarray, "P d"]:
        return self._act("attn_out")[index, layer].astype(np.float32)

    def mlp_out(self, index: int, layer: int) -> Float[np.ndarray, "P d"]:
        return self._act("mlp_out")[index, layer].astype(np.float32)

    def head_out(self, index: int, layer: int) -> Float[np.ndarray, "H d"]:
        """Each head's output (its slice of W_O applied) at the final position."""
        return self._act("head_out")[index, layer].astype(np.float32)

    def attn_rows(self, index: int, layer: int) -> Float[np.ndarray, "H P T"]:
        """Attention probabilities of the stored positions (the final one only in a run built
        with `--acts attn_rows:final`) over the seed's tokens."""
        return self._act("attn_rows")[index, layer].astype(np.float32)

    def final_resid(self, layer: int) -> Float[np.ndarray, "s d"]:
        """Residual stream before `layer` at the final position, every seed."""
        return self._act("resid")[:, layer, -1].astype(np.float32)

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
        r["acts/positions"][:] = np.stack([p.answer_slots for p in prompts])

    def write_vocab(self, ids: Int[np.ndarray, " V"], text: list[str]) -> None:
        """Writes the text of the tokens the run uses (every prompt token, every number
        token), so that reading a store needs no tokenizer."""
        g = self.root.create_group("vocab", overwrite=True)
        g.create_array("ids", data=np.asarray(ids, dtype=np.int32))
        g.create_array("text", shape=(len(text),), dtype=str, fill_value="")[:] = np.array(text)

    def decode(self, ids: Int[np.ndarray, " n"]) -> list[str]:
        """Returns each token's text (`<id>` for a token the store does not know)."""
        known = dict(zip(self.root["vocab/ids"][:].tolist(), self.root["vocab/text"][:].tolist()))
        return [known.get(int(i), f"<{int(i)}>") for i in ids]

    def write_unembed(self, norm_weight: np.ndarray, eps: float, w_u: np.ndarray,
                      token_ids: np.ndarray, token_text: list[str]) -> None:
        """Writes what the logit lens needs: final norm and the unembedding of number tokens."""
        g = self.root.create_group("unembed", overwrite=True)
        g.attrs.update({"eps": float(eps), "norm": "RMSNorm: x / sqrt(mean(x^2) + eps) * norm_weight",
                        "doc": "W_U columns of the tokens token_ids (digits, signs, number chunks)"})
        g.create_array("norm_weight", data=norm_weight.astype(np.float32))
        g.create_array("W_U", data=w_u.astype(np.float32))
        g.create_array("token_ids", data=token_ids.astype(np.int32))
        g.create_array("token_text", shape=(len(token_text),), dtype=str, fill_value="")[:] = np.array(token_text)

    def write_seed(self, index: int, predictions: Float[np.ndarray, " R"], text: str,
                   acts: dict[str, np.ndarray], candidates: SeedCandidates, summary: dict[str, np.ndarray]) -> None:
        """Writes one seed's activations, candidates, summaries, predictions and raw answer,
        then marks it done."""
        for name, value in acts.items():
            self.root[f"acts/{name}"][index] = value
        for name, value in summary.items():
            self.root[f"summary/{name}"][index] = value
        for name, value in vars(candidates).items():
            self.root[f"candidates/{name}"][index] = value
        self.root["predictions"][index] = predictions
        self.root["llm_text"][index] = text
        self.root["done"][index] = True

    def act_dtypes(self) -> dict[str, str]:
        """Returns the dtype of every activation array, stored or not (the builder's conversions)."""
        stored = self.root["acts"].attrs.get("dtypes", {})
        return {name: str(self.root[f"acts/{name}"].dtype) if name in self.acts_choice.arrays else stored[name]
                for name in ACT_ARRAYS}

    def promote_to_float32(self, name: str, reason: str) -> None:
        """Rewrites activation array `name` as float32 (a float16 one overflowed); for an array
        the run does not keep, records float32 as the dtype its summaries are computed in."""
        if name not in self.acts_choice.arrays:
            group = self.root["acts"]
            group.attrs["dtypes"] = {**group.attrs["dtypes"], name: "float32"}
            return
        old = self.root[f"acts/{name}"]
        done = np.nonzero(self.done())[0]
        kept = {int(i): old[int(i)] for i in done}
        new = self.root["acts"].create_array(
            name, shape=old.shape, chunks=old.chunks, shards=old.shards, dtype="float32",
            fill_value=0, compressors=ACT_CODEC, overwrite=True)
        for i, value in kept.items():
            new[i] = value.astype(np.float32)
        new.attrs["float32_because"] = reason

    def update_attrs(self, **attrs: Any) -> None:
        self.root.attrs.update(attrs)


def every_array(path: str | Path) -> dict[str, np.ndarray]:
    """Returns every array of the Zarr group at `path`, keyed by its path in the group (to
    compare two stores array for array)."""
    out = {}

    def walk(group: zarr.Group, prefix: str = "") -> None:
        for name, item in group.members():
            if isinstance(item, zarr.Group):
                walk(item, f"{prefix}{name}/")
            else:
                out[prefix + name] = item[:]
    walk(zarr.open_group(str(path), mode="r"))
    return out


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
        f"activations --acts {store.acts_choice.text()}",
        f"built       {build.get('started')} -> {build.get('finished') or 'unfinished'} on {build.get('device')}",
        f"command     {build.get('command')}",
        f"sessions    {len(build.get('sessions', []))}: "
        + "; ".join(f"{x.get('shard')} {x.get('seeds_built')} seeds on {x.get('device')}" for x in build.get("sessions", [])),
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
