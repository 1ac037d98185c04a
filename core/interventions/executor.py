"""The executor: every row of a plan (`core.interventions.plan`) through the model, batched.

1. Clean passes: each prompt the rows run on, or take values from, is run once
   (batched) with hooks that keep its KV cache, its residual stream from the earliest
   position any row changes, and the activations at the patched sites and positions.
2. Chunks: rows sorted by the (position, layer) from which they can change anything
   are packed into chunks whose recomputed span wastes little (`WASTE`). A chunk
   starts from the clean residual stream entering its first layer at its first
   position, with the clean KV cache for every earlier position (and every position of
   earlier layers), and runs only those layers over only those positions: what a patch
   at position p of layer l cannot change is never recomputed. Each hook point applies
   every row's patch with one indexed assignment (index tables over rows, positions,
   heads). Attention is the model's SDPA (no [T, T] pattern).
3. Answers: both answers of every row, as a trie after the prompt (tree attention), ride
   in the chunk's forward: they start at the chunk's first layer from their clean
   residual (below it they see only the clean cache). That teacher-forces them
   (log-probabilities, the first differing token's logit difference); greedy decoding
   then gives the number the model now writes, read off the trie with no decoding step
   where every row's answer stays on it.
Unpatched rows of every prompt give the clean baselines in the same machinery.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from core.candidates import TRUTH, Trie, build_trie, candidate_texts
from core.generation import NumberGrammar, answer_complete
from core.interventions.backend import fingerprint
from core.interventions.metrics import normalized_effect
from core.interventions.plan import EditPlan, Plan, plan
from core.interventions.result import Result
from core.interventions.spec import Ablation, ExperimentRequest, PromptEdit, Site, code_version, content_hash
from core.models import LoadedModel
from core.prompts import parse_number
from core.store import MODEL_COLUMN, RunStore, now

WASTE = 1.25  # a chunk may recompute at most this much more than its rows need
MAX_ROWS = 64
TOKENS = {"cpu": 4096, "cuda": 65536}  # rows x recomputed positions per chunk
KV_BYTES = 384 << 20  # a chunk's copy of its rows' clean KV caches
CLEAN_KV_BYTES = 128 << 20  # the clean KV caches held at once (units are run in groups), but
CLEAN_BATCH = {"cpu": 4, "cuda": 32}  # at least one batch of clean runs: fewer would run unbatched


@dataclass
class Clean:
    """One prompt's clean run: KV per layer ([kv, T, dh]), the residual stream entering
    each layer from position `p0` on ([L+1, T - p0, d]), and activations at `at`."""

    kv: list[tuple[Tensor, Tensor]] | None
    resid: Tensor | None
    p0: int
    vals: dict[str, Tensor]  # resid_pre [L+1, U, d], attn_out / mlp_out [L, U, d], head [L, U, H, dh]
    at: np.ndarray  # the positions U of `vals`, sorted


@dataclass
class Job:
    """One batch row: a prompt, its patches and the two answers it is scored on."""

    prompt: int  # store row
    layer: int  # first layer it can change
    pos: int  # first position it can change
    patches: list[tuple[Site, np.ndarray, Tensor]] = field(default_factory=list)  # site, positions, values
    answers: tuple[list[int], list[int]] = ([], [])
    decode: bool = True
    grammar: NumberGrammar | None = None  # decode only numbers of this pattern (else plain greedy)
    out: dict = field(default_factory=dict)


def _layers(model: LoadedModel) -> list[torch.nn.Module]:
    return list(model.hf_model.model.layers)


def _shape(model: LoadedModel) -> tuple[int, int, int]:
    info = model.info
    return info["n_layers"], info["n_heads"], info["d_head"]


def clean_batch(model: LoadedModel) -> int:
    """Returns how many prompts of one length a clean pass runs at once."""
    return CLEAN_BATCH.get(model.device.type, CLEAN_BATCH["cpu"])


@torch.inference_mode()
def clean_runs(model: LoadedModel, tokens: list[np.ndarray], keep_from: list[int | None], at: np.ndarray,
               kinds: set[str], prefix: Clean | None = None, shared: list[int] | None = None) -> list[Clean]:
    """Returns each prompt's clean run (prompts of equal length run as one batch).

    `keep_from[i]`: keep prompt i's KV cache and residual stream from that position
    (None: only its activations at `at`, for a source or a mean). `prefix`, a clean run
    with its whole KV cache, and `shared[i]`, how many leading tokens prompt i has in
    common with it: prompt i's run starts there on that cache, as causality allows.
    """
    layers = _layers(model)
    n_layers, n_heads, d_head = _shape(model)
    out: list[Clean | None] = [None] * len(tokens)
    by_length: dict[int, list[int]] = {}
    for i, t in enumerate(tokens):
        by_length.setdefault(len(t), []).append(i)
    size = clean_batch(model)
    for idx in by_length.values():
        for lo in range(0, len(idx), size):
            batch = idx[lo: lo + size]
            ids = torch.as_tensor(np.stack([tokens[i] for i in batch]), dtype=torch.long, device=model.device)
            p0 = min((keep_from[i] for i in batch if keep_from[i] is not None), default=None)
            # Every kept or read position must be computed, and at least the last one.
            start = 0 if prefix is None else min(shared[i] for i in batch)
            start = min(start, ids.shape[1] - 1, *([p0] if p0 is not None else []), *at[:1].tolist())
            kv = None if start == 0 else [tuple(t[:, :start].expand(len(batch), -1, -1, -1) for t in layer)
                                          for layer in prefix.kv]
            for i, clean in zip(batch, _clean_batch(model, layers, ids, p0, at, kinds, n_layers, n_heads, d_head,
                                                    kv, start)):
                keep = keep_from[i] is not None
                out[i] = Clean(clean.kv if keep else None, clean.resid if keep else None, clean.p0, clean.vals, at)
    return out


def _clean_batch(model, layers, ids, p0, at, kinds, n_layers, n_heads, d_head, kv=None, start=0) -> list[Clean]:
    # kv: the KV cache of positions < start, which the forward then skips.
    b = ids.shape[0]
    at_t = torch.as_tensor(at - start, dtype=torch.long, device=model.device)
    resid: list[Tensor | None] = [None] * (n_layers + 1)
    vals: dict[str, list] = {k: [None] * (n_layers + 1 if k == "resid_pre" else n_layers) for k in kinds}

    def keep_resid(i: int, h: Tensor) -> None:
        if p0 is not None:
            resid[i] = h[:, p0 - start:].clone()  # a view would keep the layer's whole [b, T, d] input alive
        if "resid_pre" in kinds:
            vals["resid_pre"][i] = h[:, at_t]

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: keep_resid(i, a[0] if a else k["hidden_states"]), with_kwargs=True))
        if "attn_out" in kinds:
            handles.append(layer.self_attn.register_forward_hook(
                lambda m, a, r, i=i: vals["attn_out"].__setitem__(i, r[0][:, at_t])))
        if "mlp_out" in kinds:
            handles.append(layer.mlp.register_forward_hook(lambda m, a, r, i=i: vals["mlp_out"].__setitem__(i, r[:, at_t])))
        if "head" in kinds:
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, i=i: vals["head"].__setitem__(i, a[0][:, at_t].unflatten(-1, (n_heads, d_head)))))
    handles.append(layers[-1].register_forward_hook(
        lambda m, a, r: keep_resid(n_layers, r[0] if isinstance(r, tuple) else r)))
    cache = DynamicCache(ddp_cache_data=kv)
    try:
        model.hf_model(input_ids=ids[:, start:], past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    stacked = {k: torch.stack(v, 1) for k, v in vals.items()}  # [b, L(+1), U, ...]
    res = torch.stack(resid, 1) if p0 is not None else None
    return [Clean(kv=[(layer.keys[j], layer.values[j]) for layer in cache.layers] if p0 is not None else None,
                  resid=res[j] if res is not None else None, p0=p0 or 0,
                  vals={k: v[j] for k, v in stacked.items()}, at=at) for j in range(b)]


def _value(clean: Clean, site: Site, pos: np.ndarray) -> Tensor:
    """Returns a clean run's activation at a site and positions: [p, d] (head: [p, dh])."""
    idx = torch.as_tensor(np.searchsorted(clean.at, pos), dtype=torch.long, device=next(iter(clean.vals.values())).device)
    v = clean.vals[site.kind][site.layer][idx]
    return v[:, site.head] if site.kind == "head" else v


class _Patcher:
    """Every patch of a chunk, as index tables per hook point: (rows, positions[, heads]) -> values."""

    def __init__(self, jobs: list[Job], pc: int, device: torch.device, dtype: torch.dtype) -> None:
        table: dict[tuple[str, int], tuple[list, list, list, list]] = {}
        for r, job in enumerate(jobs):
            for site, pos, value in job.patches:
                rows, ps, heads, values = table.setdefault((site.kind, site.layer), ([], [], [], []))
                rows += [r] * len(pos)
                ps += (pos - pc).tolist()
                heads += [site.head or 0] * len(pos)
                values.append(value)
        as_long = lambda x: torch.as_tensor(x, dtype=torch.long, device=device)  # noqa: E731
        self.points = {key: (as_long(r), as_long(p), as_long(h), torch.cat(v).to(device=device, dtype=dtype))
                       for key, (r, p, h, v) in table.items()}

    def resid(self, layer: int, h: Tensor) -> None:
        if ("resid_pre", layer) in self.points:
            r, p, _, v = self.points["resid_pre", layer]
            h[r, p] = v

    def hooks(self, layers: list[torch.nn.Module]) -> list:
        """Registers one in-place hook per patched module (a hook returning None keeps its tensor)."""
        def put(target: Tensor, index: tuple, value: Tensor) -> None:
            target.index_put_(index, value)

        handles = []
        for (kind, layer), (r, p, hd, v) in self.points.items():
            if kind == "attn_out":
                handles.append(layers[layer].self_attn.register_forward_hook(
                    lambda m, a, out, r=r, p=p, v=v: put(out[0], (r, p), v)))
            elif kind == "mlp_out":
                handles.append(layers[layer].mlp.register_forward_hook(
                    lambda m, a, out, r=r, p=p, v=v: put(out, (r, p), v)))
            elif kind == "head":
                d_head = layers[layer].self_attn.head_dim
                handles.append(layers[layer].self_attn.o_proj.register_forward_pre_hook(
                    lambda m, a, r=r, p=p, hd=hd, v=v, k=d_head: put(a[0].view(*a[0].shape[:2], -1, k), (r, p, hd), v)))
        return handles


def _chunks(jobs: list[Job], n_layers: int, n_tokens: int, budget_tokens: int, max_rows: int) -> list[list[Job]]:
    """Packs jobs sorted by (position, layer) into chunks that recompute at most WASTE x what they need."""
    work = lambda j: (n_layers - j.layer + 1) * (n_tokens - j.pos)  # noqa: E731
    out: list[list[Job]] = []
    for job in sorted(jobs, key=lambda j: (j.pos, j.layer)):
        if out:
            chunk = out[-1]
            lc, pc = min(j.layer for j in chunk + [job]), min(j.pos for j in chunk + [job])
            n = len(chunk) + 1
            cost = n * (n_layers - lc + 1) * (n_tokens - pc)
            if (n <= max_rows and n * (n_tokens - pc) <= budget_tokens
                    and cost <= WASTE * sum(work(j) for j in chunk + [job])):
                chunk.append(job)
                continue
        out.append([job])
    return out


class _Buffer(DynamicLayer):
    """One layer's KV cache written in place into a buffer of its final length.

    A chunk appends to its cache again and again (its recomputed positions and the
    answers' trie, then each decoded token); DynamicLayer's concatenation copies the
    whole cache at each append, and those copies, of a size that varies per chunk,
    fragmented the CPU heap: the server's memory grew with the length of a head grid."""

    def __init__(self, keys: Float[Tensor, "n kv cap dh"], values: Float[Tensor, "n kv cap dh"], length: int) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.buffers, self.length = (keys, values), length
        self._view()

    def _view(self) -> None:
        self.keys, self.values = (b[:, :, :self.length] for b in self.buffers)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        for b, new in zip(self.buffers, (key_states, value_states)):
            b[:, :, self.length:end] = new
        self.length = end
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class KVPool:
    """The KV buffers of the chunks of one prompt length, allocated once for `rows` rows
    (more if a chunk needs them) and `room` positions past the prompt; each chunk refills
    them from its rows' clean caches."""

    def __init__(self, rows: int, n_tokens: int, room: int) -> None:
        self.rows, self.cap = rows, n_tokens + room
        self.buffers: list[tuple[Tensor, Tensor]] = []

    def release(self) -> None:
        """Frees the buffers: after an out-of-memory, each chunk allocates for its own rows only."""
        self.buffers, self.rows = [], 0

    def cache(self, jobs: list[Job], clean: dict[int, Clean], lc: int, pc: int, n_tokens: int) -> Cache:
        """Returns the chunk's cache: every row's clean KV before position `pc` from layer
        `lc` on, and before `n_tokens` in the layers below."""
        if not self.buffers or self.buffers[0][0].shape[0] < len(jobs):
            self.buffers = []  # the smaller buffers go before the larger ones are made
            rows = max(self.rows, len(jobs))
            self.buffers = [tuple(torch.empty((rows, k.shape[0], self.cap, k.shape[-1]), dtype=k.dtype,
                                              device=k.device) for k in layer) for layer in clean[jobs[0].prompt].kv]
        layers = []
        for i, bufs in enumerate(self.buffers):
            cut = n_tokens if i < lc else pc
            for w, b in enumerate(bufs):
                for r, j in enumerate(jobs):
                    b[r, :, :cut] = clean[j.prompt].kv[i][w][:, :cut]
            layers.append(_Buffer(*(b[:len(jobs)] for b in bufs), cut))
        return Cache(layers=layers)


@dataclass
class _Tree:
    """Both answers of each row as a trie laid out after the prompt: node k of row r in
    slot k - 1 (pads after), at position prompt end - 1 + its depth, seeing the whole
    prompt and, among the slots, its ancestors and itself (`anc`, a pad only itself)."""

    tries: list[Trie]
    ids: Int[Tensor, "n w"]
    pos: Int[Tensor, "n w"]
    anc: Bool[Tensor, "n w w"]

    @property
    def width(self) -> int:
        return self.ids.shape[1]


def _tree(jobs: list[Job], t: int, device: torch.device) -> _Tree | None:
    """Returns the answers' trie of `jobs` after a prompt of `t` tokens (None: no answers)."""
    tries = [build_trie(0, [list(a) for a in job.answers]) for job in jobs]
    width = max(len(tr.node_token) - 1 for tr in tries)
    if not width:
        return None
    n = len(jobs)
    ids = torch.zeros((n, width), dtype=torch.long)
    pos = torch.full((n, width), t, dtype=torch.long)
    anc = torch.eye(width, dtype=torch.bool).repeat(n, 1, 1)
    for r, tr in enumerate(tries):
        for node in range(1, len(tr.node_token)):
            ids[r, node - 1] = tr.node_token[node]
            pos[r, node - 1] = t - 1 + tr.depth[node]
            a = tr.parent[node]
            while a > 0:
                anc[r, node - 1, a - 1] = True
                a = tr.parent[a]
    return _Tree(tries, ids.to(device), pos.to(device), anc.to(device))


def _tree_key(job: Job) -> tuple:
    return job.prompt, tuple(job.answers[0]), tuple(job.answers[1])


def _forward(model: LoadedModel, x: Float[Tensor, "n s d"], pos: Int[Tensor, "n s"], mask: Bool[Tensor, "n 1 s k"],
             cache: Cache, first: int, patcher: "_Patcher | None" = None,
             kept: list[Tensor] | None = None) -> Float[Tensor, "n s d"]:
    """Runs layers `first`.. on `x` over `cache`; returns the residual after the last layer.
    `patcher` patches the residual entering each layer; `kept` gets it (and the last)."""
    layers = _layers(model)
    rope = model.hf_model.model.rotary_emb(x, pos)
    for i in range(first, len(layers)):
        if patcher is not None:
            patcher.resid(i, x)
        if kept is not None:
            kept.append(x)
        x = layers[i](x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                      position_embeddings=rope)
    if kept is not None:
        kept.append(x)
    return x


@dataclass
class CleanTree:
    """One prompt's answers' trie run clean: its residual stream entering each layer and
    after the last ([L+1, w, d]) and its KV per layer ([kv, w, dh])."""

    resid: Tensor
    kv: list[tuple[Tensor, Tensor]]


@torch.inference_mode()
def tree_residuals(model: LoadedModel, jobs: list[Job], clean: dict[int, Clean], t: int) -> dict[tuple, CleanTree]:
    """Returns, per (prompt, answers) of `jobs` (prompts of `t` tokens), its answers' trie
    run on the prompt's clean cache: what a row patched from layer l on feeds its trie
    at layer l, and the trie's keys and values below l."""
    keys = list(dict.fromkeys(_tree_key(j) for j in jobs if any(j.answers)))
    n_layers = len(_layers(model))
    out = {}
    size = clean_batch(model)
    for lo in range(0, len(keys), size):
        batch = [Job(k[0], n_layers, t - 1, answers=(list(k[1]), list(k[2]))) for k in keys[lo: lo + size]]
        tree = _tree(batch, t, model.device)
        cache = KVPool(len(batch), t, tree.width).cache(batch, clean, n_layers, t - 1, t)
        mask = torch.cat([torch.ones((len(batch), 1, tree.width, t), dtype=torch.bool, device=model.device),
                          tree.anc[:, None]], -1)
        kept: list[Tensor] = []
        _forward(model, model.hf_model.get_input_embeddings()(tree.ids), tree.pos, mask, cache, 0, kept=kept)
        stacked = torch.stack(kept, 1)  # [b, L+1, w, d]
        for j, (key, tr) in enumerate(zip(keys[lo: lo + size], tree.tries)):
            w = len(tr.node_token) - 1
            out[key] = CleanTree(stacked[j, :, :w].clone(),
                                 [(layer.keys[j, :, t:t + w].clone(), layer.values[j, :, t:t + w].clone())
                                  for layer in cache.layers])
    return out


@torch.inference_mode()
def run_chunk(model: LoadedModel, jobs: list[Job], clean: dict[int, Clean], n_tokens: int,
              max_new_tokens: int, pool: KVPool, trees: dict[tuple, CleanTree]) -> None:
    """Runs one chunk; fills each job's `out` with its metrics and decoded answer.

    The answers' trie rides in the chunk's own forward, after the recomputed positions:
    below the chunk's first layer it reads the prompt's clean cache only, so it starts
    there from its clean residual (`tree_residuals`, kept in `trees` for the next chunks),
    and a row costs one forward of its positions and its trie instead of a second pass
    of every layer for the trie alone."""
    hf = model.hf_model
    n_layers = len(_layers(model))
    n, t, dev = len(jobs), n_tokens, model.device
    lc, pc = min(j.layer for j in jobs), min(j.pos for j in jobs)
    dtype = next(hf.parameters()).dtype
    if lc > 0:
        trees.update(tree_residuals(model, [j for j in jobs if _tree_key(j) not in trees], clean, t))
    cache = pool.cache(jobs, clean, lc, pc, t)
    h = torch.stack([clean[j.prompt].resid[lc, pc - clean[j.prompt].p0:] for j in jobs])
    patcher = _Patcher(jobs, pc, dev, dtype)
    tree = _tree(jobs, t, dev)
    w, s = (tree.width if tree else 0), t - pc
    if tree is not None:
        if lc == 0:
            xt = hf.get_input_embeddings()(tree.ids)
        else:
            rows = [(r, trees[_tree_key(j)]) for r, j in enumerate(jobs) if any(j.answers)]
            xt = torch.zeros((n, w, h.shape[-1]), dtype=h.dtype, device=dev)
            for r, clean_tree in rows:
                xt[r, :clean_tree.resid.shape[1]] = clean_tree.resid[lc]
            # The layers below get the trie's clean keys and values: decoding goes on from its nodes.
            for i, layer in enumerate(cache.layers[:lc]):
                kv = [torch.zeros_like(b[:, :, :w]) for b in layer.buffers]
                for r, clean_tree in rows:
                    for new, old in zip(kv, clean_tree.kv[i]):
                        new[r, :, :old.shape[1]] = old
                layer.update(*kv)
        h = torch.cat([h, xt], 1)
    if lc < n_layers:
        pos = torch.arange(pc, t, device=dev)[None].expand(n, -1)
        mask = torch.zeros((n, 1, s + w, t + w), dtype=torch.bool, device=dev)
        mask[:, 0, :s, :t] = torch.arange(t, device=dev)[None, :] <= torch.arange(pc, t, device=dev)[:, None]
        if tree is not None:
            pos = torch.cat([pos, tree.pos], 1)
            mask[:, 0, s:, :t] = True
            mask[:, 0, s:, t:] = tree.anc
        handles = patcher.hooks(_layers(model))
        try:
            h = _forward(model, h, pos, mask, cache, lc, patcher)
        finally:
            for handle in handles:
                handle.remove()
    patcher.resid(n_layers, h)
    logp = model.logprobs(hf.model.norm(h[:, s - 1:]))  # [n, 1 + w, V]: the prompt's last position, the trie
    _score(jobs, tree, logp)
    if any(j.decode for j in jobs):
        _decode(model, jobs, cache, logp, tree, t, max_new_tokens)


def run_halving(model: LoadedModel, jobs: list[Job], clean: dict[int, Clean], n_tokens: int,
                max_new_tokens: int, pool: KVPool, trees: dict[tuple, CleanTree]) -> None:
    """Runs a chunk; out of memory, runs its halves (down to one row, which then fails the job)."""
    try:
        run_chunk(model, jobs, clean, n_tokens, max_new_tokens, pool, trees)
    except torch.OutOfMemoryError:
        if len(jobs) == 1:
            raise
        pool.release()
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(jobs) // 2
        for part in (jobs[:half], jobs[half:]):
            run_halving(model, part, clean, n_tokens, max_new_tokens, pool, trees)


def chunk_budget(model: LoadedModel, kv_row: int) -> tuple[int, int]:
    """Returns (rows x positions, rows) a chunk may hold: fixed on the CPU, a share of the
    free memory on a GPU (activations ~ (3 x MLP width + 8 x d_model) per position)."""
    if model.device.type != "cuda":
        return TOKENS["cpu"], max(1, min(MAX_ROWS, KV_BYTES // max(kv_row, 1)))
    free, _ = torch.cuda.mem_get_info(model.device)
    per_position = (3 * int(model.hf_model.config.intermediate_size) + 8 * model.info["d_model"]) * model.dtype_bytes
    tokens = max(1, int(0.3 * free // per_position))
    return min(tokens, TOKENS["cuda"]), max(1, min(4 * MAX_ROWS, int(0.3 * free // max(kv_row, 1))))


def run_by_length(model: LoadedModel, jobs: list[Job], clean: dict[int, Clean], length: Callable[[Job], int],
                  max_new_tokens: int, say: Callable[[int, int, int], None] | None = None) -> int:
    """Runs jobs in chunks of one prompt length each (sized by `chunk_budget`, packed by
    `_chunks`, out of memory halved); `say(k, n_chunks, rows)` before chunk k. Returns the
    number of chunks."""
    n_layers = len(_layers(model))
    by_length: dict[int, list[Job]] = {}
    for job in jobs:
        by_length.setdefault(length(job), []).append(job)
    chunks = [(t, c) for t, part in by_length.items()
              for c in _chunks(part, n_layers, t, *chunk_budget(model, model.kv_bytes_per_token * t))]
    # Room past the prompt for the answers' trie (both answers' tokens at most), then the decoded tokens.
    room = max_new_tokens + max(len(j.answers[0]) + len(j.answers[1]) for j in jobs)
    for k, (t, chunk) in enumerate(chunks):
        if say is not None:
            say(k, len(chunks), len(chunk))
        if k == 0 or chunks[k - 1][0] != t:  # chunks come length by length: the last length's buffers go
            pool, trees = KVPool(max(len(c) for u, c in chunks if u == t), t, room), {}
        run_halving(model, chunk, clean, t, max_new_tokens, pool, trees)
    return len(chunks)


def _score(jobs: list[Job], tree: _Tree | None, logp: Float[Tensor, "n 1+w V"]) -> None:
    """Reads both answers' teacher-forced log-probabilities of every job off its trie."""
    for r, job in enumerate(jobs):
        if tree is None:  # no answers to score
            job.out["logprob_diff"] = job.out["logit_diff"] = np.nan
            continue
        tr = tree.tries[r]
        totals = []
        for seq, steps in zip(tr.tokens, tr.step_node):
            totals.append(float(sum(logp[r, s][tok] for s, tok in zip(steps, seq))) if seq else np.nan)
        a, b = job.answers
        job.out["logprob_diff"] = totals[0] - totals[1]
        k = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        node = tr.step_node[0][k] if k is not None else None
        job.out["logit_diff"] = float(logp[r, node][a[k]] - logp[r, node][b[k]]) if node is not None else np.nan


def _pick(logits: Float[Tensor, "n V"], jobs: list[Job], texts: list[str]) -> Int[Tensor, " n"]:
    """Returns each row's greedy next token after its answer so far `texts[r]`, among those
    its grammar allows where it has one."""
    if all(job.grammar is None for job in jobs):
        return logits.argmax(-1)
    logits = logits.clone()
    for r, job in enumerate(jobs):
        if job.grammar is not None:
            logits[r, ~job.grammar.mask(texts[r])] = -torch.inf
    return logits.argmax(-1)


def _whole(job: Job, token: int, text: str, eos: int | None) -> bool:
    """True once a row's answer so far `text` (ending with `token`) holds a whole number."""
    return token == eos or (job.grammar.complete(text) if job.grammar else answer_complete(text))


def _decode(model: LoadedModel, jobs: list[Job], cache: Cache, logp: Float[Tensor, "n 1+w V"], tree: _Tree | None,
            t: int, max_new_tokens: int) -> None:
    """Greedy answers from the patched cache (the prompt, then the answers' trie), stopped
    once each holds a whole number. A row's answer is read off the trie, whose logits the
    chunk has, as long as it follows it, and decoded from the node where it leaves it."""
    tok = model.tokenizer
    n, w = len(jobs), (tree.width if tree is not None else 0)
    generated: list[list[int]] = [[] for _ in jobs]
    texts = [""] * n  # each row's answer so far, decoded once per token
    done = [not job.decode for job in jobs]  # a row that skips decoding needs no answer

    def add(r: int, token: int) -> None:
        generated[r].append(token)
        texts[r] = tok.decode(generated[r])
        done[r] = _whole(jobs[r], token, texts[r], tok.eos_token_id) or len(generated[r]) == max_new_tokens

    at = [0] * n  # the trie node each row's last token was predicted from
    for r, job in enumerate(jobs):
        child = {} if tree is None else {(tree.tries[r].parent[k], tree.tries[r].node_token[k]): k
                                         for k in range(1, len(tree.tries[r].node_token))}
        while not done[r]:
            add(r, int(_pick(logp[r, at[r]][None], [job], texts[r:r + 1])[0]))
            if done[r] or (at[r], generated[r][-1]) not in child:
                break
            at[r] = child[at[r], generated[r][-1]]
    # A row's next token sits after its node, seeing the prompt, that node's ancestors and
    # its own tokens decoded since (the cache's rows are the rows').
    depth = torch.tensor([tree.tries[r].depth[v] if tree is not None else 0 for r, v in enumerate(at)],
                         device=model.device)
    seen = torch.ones((n, 1, 1, t + w + max_new_tokens), dtype=torch.bool, device=model.device)
    if tree is not None:
        seen[:, 0, 0, t:t + w] = torch.stack([tree.anc[r, v - 1] if v else torch.zeros_like(tree.anc[r, 0])
                                             for r, v in enumerate(at)])
    step = 0
    while not all(done):
        ids = torch.tensor([[g[-1] if g else 0] for g in generated], device=model.device)
        out = model.hf_model(input_ids=ids, position_ids=(t + depth + step)[:, None],
                             attention_mask=seen[..., :t + w + step + 1], past_key_values=cache, use_cache=True)
        nxt = _pick(out.logits[:, -1], jobs, texts).tolist()
        for r in range(n):
            if not done[r]:
                add(r, nxt[r])
        step += 1
    for job, g in zip(jobs, generated):
        if job.decode:
            job.out["decoded_text"] = tok.decode(g, skip_special_tokens=True)


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Returns the number of leading tokens two prompts have in common."""
    m = min(len(a), len(b))
    differ = np.nonzero(a[:m] != b[:m])[0]
    return int(differ[0]) if len(differ) else m


def whole_run(model: LoadedModel, tokens: Int[np.ndarray, " T"]) -> Clean:
    """Returns a prompt's clean run with its whole KV cache and residual stream: the run
    `run_prompts` starts every edit of it on, whichever position it first changes."""
    return clean_runs(model, [tokens], [0], np.zeros(0, dtype=np.int64), set())[0]


@torch.inference_mode()
def run_prompts(model: LoadedModel, base: Int[np.ndarray, " T"], prompts: list[np.ndarray], max_new_tokens: int,
                answers: list[tuple[list[int], list[int]]] | None = None,
                progress: Callable[[float, str], None] | None = None,
                grammars: list[NumberGrammar | None] | None = None, draft: list[int] | None = None,
                clean: Clean | None = None) -> list[dict]:
    """Returns, per prompt, its greedy answer text (`decoded_text`; decoded within
    `grammars[i]` where given), whether it reused the base's cache (`reused`) and, given
    `answers` (A, B tokens per prompt), the teacher-forced `logprob_diff` and `logit_diff`
    of A against B. Without answers, `draft` (tokens the answers likely start with, e.g.
    the base's own answer) is run as the answers' trie: an answer is read off it as far
    as it follows it, with no decoding step. `clean`: the base's `whole_run`, where the
    caller keeps it for several calls on one base.

    Prompts are edits of `base`. One of the base's length is run as a patch of the
    residual stream entering layer 0 (its token embeddings where its tokens differ):
    the base's clean KV cache serves every position before its first differing token,
    so only the rest is recomputed. A prompt of another length gets its own clean run,
    started on the base's KV cache at its first token that differs from the base's.
    """
    say = progress or (lambda f, s: None)
    n_layers = len(_layers(model))
    embed = model.hf_model.get_input_embeddings()
    pairs = answers or [(list(draft or []), [])] * len(prompts)
    grammars = grammars or [None] * len(prompts)
    prompts = [np.asarray(p) for p in prompts]
    t = len(base)
    same = [i for i, p in enumerate(prompts) if len(p) == t]
    diffs = {i: np.nonzero(prompts[i] != base)[0] for i in same}
    jobs: dict[int, Job] = {}
    for i in same:
        d = diffs[i]
        ids = torch.as_tensor(prompts[i][d], dtype=torch.long, device=model.device)
        jobs[i] = (Job(-1, 0, int(d[0]), patches=[(Site(kind="resid_pre", layer=0), d, embed(ids))], answers=pairs[i],
                       grammar=grammars[i])
                   if len(d) else Job(-1, n_layers, t - 1, answers=pairs[i], grammar=grammars[i]))
    # Groups of prompts whose clean caches fit CLEAN_KV_BYTES: first the base's edits (one
    # clean run of the base), then the other lengths (a clean run each, kept only at its
    # last position, and a chunk that merely scores and decodes from there).
    per_group = max(clean_batch(model), CLEAN_KV_BYTES // max(model.kv_bytes_per_token * t, 1))
    others = [i for i in range(len(prompts)) if len(prompts[i]) != t]
    groups = ([same] if same else []) + [others[g: g + per_group] for g in range(0, len(others), per_group)]
    none = np.zeros(0, dtype=np.int64)
    base_run = clean or whole_run(model, base)
    for g, group in enumerate(groups):
        say(g / len(groups), f"group {g + 1}/{len(groups)}: {len(group)} prompts")
        if group is same:
            runs = {-1: base_run}
        else:
            runs = dict(zip(group, clean_runs(model, [prompts[i] for i in group], [len(prompts[i]) - 1 for i in group],
                                              none, set(), prefix=base_run,
                                              shared=[shared_prefix(prompts[i], base) for i in group])))
            jobs.update({i: Job(i, n_layers, len(prompts[i]) - 1, answers=pairs[i], grammar=grammars[i])
                         for i in group})
        run_by_length(model, [jobs[i] for i in group], runs,
                      lambda j: t if j.prompt == -1 else len(prompts[j.prompt]), max_new_tokens)
        del runs
    say(1.0, "done")
    return [{"decoded_text": jobs[i].out["decoded_text"], "reused": len(prompts[i]) == t,
             **({k: jobs[i].out[k] for k in ("logprob_diff", "logit_diff")} if answers else {})}
            for i in range(len(prompts))]


def unit_answers(store: RunStore, request: ExperimentRequest, p: Plan | EditPlan,
                 tokenizer) -> list[tuple[list[int], list[int]]]:
    """Returns each unit's answers A and B as tokens ([] for a candidate with no number)."""
    exp = request.experiment.root
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False) if text else []  # noqa: E731
    a = store.attrs
    fmt = store.number_format()
    texts, preds, y_true = store.llm_text(), store.predictions(), store.y_true()

    def candidate(row: int, name: str) -> list[int]:
        cands = candidate_texts(y_true[row], texts[row], preds[row, 1:], fmt, a["dataset"]["n_features"])
        return encode(cands[[TRUTH, *store.columns].index(name)])

    if isinstance(exp, Ablation | PromptEdit):
        return [tuple(candidate(u.target, name) for name in exp.pair) for u in p.units]
    name = TRUTH if exp.answers == "truth" else MODEL_COLUMN
    return [(candidate(u.prompts[0], name), candidate(u.prompts[1], name)) for u in p.units]


def execute(model: LoadedModel, store: RunStore, request: ExperimentRequest,
            progress: Callable[[float, str], None] | None = None) -> Result:
    """Runs an experiment on a run store and returns its result (see `core.interventions.result`)."""
    started, t0 = now(), time.perf_counter()
    say = progress or (lambda f, s: None)
    p = plan(store, request, model.info)
    exp = request.experiment.root
    decode = exp.decode
    spans = p.spans
    answers = unit_answers(store, request, p, model.tokenizer)
    n_layers = p.n_layers

    # Every position a cell covers on a prompt, every position a value is read at.
    covers: dict[tuple[int, int], np.ndarray] = {}

    def where(c: int, row: int) -> np.ndarray:
        if (c, row) not in covers:
            covers[c, row] = np.unique(np.concatenate([spans.resolve(row, n) for n in p.cells[c].positions]))
        return covers[c, row]

    at = np.unique(np.concatenate([where(c, u.target) for c in range(len(p.cells)) for u in p.units]))
    kinds = {s.kind for cell in p.cells for s in cell.sites}

    # Where each prompt's rows start: its clean residual stream is kept from there on.
    starts: dict[int, int] = {}
    for r in p.rows:
        target = p.units[r.unit].target
        starts[target] = min(starts.get(target, p.n_tokens), p.start(r)[1])
    mean = None
    if isinstance(exp, Ablation) and exp.method == "mean":
        seeds = np.nonzero(store.done())[0].tolist()
        say(0.0, f"clean runs of the {len(seeds)} seeds the mean is taken over")
        runs = clean_runs(model, [store.tokens(q) for q in seeds], [None] * len(seeds), at, kinds)
        mean = Clean(None, None, 0, {k: torch.stack([r.vals[k] for r in runs]).float().mean(0) for k in kinds}, at)
        del runs

    # Jobs: the baselines of every prompt, then every row (their values are set group by group).
    jobs: list[Job] = []
    baseline: dict[tuple[int, int], Job] = {}
    for u, unit in enumerate(p.units):
        for q in unit.prompts:
            job = Job(q, n_layers, int(spans.n_tokens[q]) - 1, answers=answers[u])
            baseline[u, q] = job
            jobs.append(job)
    row_jobs = [Job(p.units[r.unit].target, *p.start(r), answers=answers[r.unit], decode=decode) for r in p.rows]
    jobs += row_jobs

    # Units in groups whose prompts' clean KV caches fit CLEAN_KV_BYTES: a group's clean
    # runs are made, its chunks run, then they are freed (memory stays bounded for many pairs).
    kv_row = model.kv_bytes_per_token * p.n_tokens
    per_unit = len(p.units[0].prompts)
    per_group = max(-(-clean_batch(model) // per_unit), CLEAN_KV_BYTES // (kv_row * per_unit))
    groups = [range(g, min(g + per_group, len(p.units))) for g in range(0, len(p.units), per_group)]
    max_new = int(store.attrs["prompt"]["max_new_tokens"])
    n_chunks = 0
    for g, units in enumerate(groups):
        mine = [i for i, r in enumerate(p.rows) if r.unit in units]
        prompts = sorted({q for u in units for q in p.units[u].prompts})
        sources = sorted({p.rows[i].source for i in mine if p.rows[i].source >= 0} - set(prompts))
        needed = prompts + sources
        keep = [min(starts.get(q, p.n_tokens - 1), int(spans.n_tokens[q]) - 1) if q in prompts else None
                for q in needed]
        say(g / len(groups), f"clean runs of {len(needed)} prompts")
        clean = dict(zip(needed, clean_runs(model, [store.tokens(q) for q in needed], keep, at, kinds)))
        for i in mine:
            r, job = p.rows[i], row_jobs[i]
            pos = where(r.cell, job.prompt)
            for site in p.cells[r.cell].sites:
                if r.source >= 0:
                    value = _value(clean[r.source], site, pos)
                elif mean is not None:
                    value = _value(mean, site, pos)
                else:
                    width = model.info["d_head"] if site.kind == "head" else model.info["d_model"]
                    value = torch.zeros((len(pos), width), device=model.device)
                job.patches.append((site, pos, value))
        group_jobs = [baseline[u, q] for u in units for q in p.units[u].prompts] + [row_jobs[i] for i in mine]
        n_chunks += run_by_length(
            model, group_jobs, clean, lambda j: int(spans.n_tokens[j.prompt]), max_new,
            lambda k, n, rows: say((g + k / n) / len(groups), f"group {g + 1}/{len(groups)}: chunk {k + 1}/{n} "
                                   f"({rows} rows)"))
        del clean
    say(1.0, "done")
    return _result(request, store, model, p, jobs, row_jobs, baseline, started, t0, n_chunks, decode)


def _result(request, store, model, p: Plan, jobs, row_jobs, baseline, started, t0, n_chunks, decode) -> Result:
    exp = request.experiment.root
    y_true = store.y_true()
    seeds = store.seeds
    is_ablation = isinstance(exp, Ablation)
    m_clean, m_corrupt, base = [], [], {"unit": [], "target_seed": [], "truth": [], "clean_text": [],
                                        "clean_decoded": []}
    for u, unit in enumerate(p.units):
        target = baseline[u, unit.target]
        if is_ablation:
            m_clean.append(target.out["logprob_diff"])
            m_corrupt.append(0.0)
        else:
            m_clean.append(baseline[u, unit.prompts[0]].out["logprob_diff"])
            m_corrupt.append(baseline[u, unit.prompts[1]].out["logprob_diff"])
        text = target.out.get("decoded_text", "")
        base["unit"].append(unit.label)
        base["target_seed"].append(seeds[unit.target])
        base["truth"].append(float(y_true[unit.target]))
        base["clean_text"].append(text)
        base["clean_decoded"].append(parse_number(text))
    base.update(m_clean=m_clean, m_corrupt=m_corrupt)
    units = np.array([r.unit for r in p.rows], dtype=int)
    m = np.array([j.out["logprob_diff"] for j in row_jobs], dtype=float)
    norm, flagged = normalized_effect(m, np.asarray(m_clean)[units], np.asarray(m_corrupt)[units])
    texts = [j.out.get("decoded_text", "") for j in row_jobs]
    decoded = np.array([parse_number(t) for t in texts], dtype=float)
    truth = np.array([y_true[p.units[r.unit].target] for r in p.rows], dtype=float)
    table = {
        "cell": [r.cell for r in p.rows], "unit": [p.units[r.unit].label for r in p.rows],
        "target_seed": [seeds[p.units[r.unit].target] for r in p.rows],
        "source_seed": [seeds[r.source] if r.source >= 0 else -1 for r in p.rows], "draw": [r.draw for r in p.rows],
        "logprob_diff": m.tolist(), "logit_diff": [j.out["logit_diff"] for j in row_jobs],
        "decoded_text": texts, "decoded": decoded.tolist(), "abs_error": np.abs(decoded - truth).tolist(),
        "normalized": norm.tolist(), "flagged": flagged.tolist(),
    }
    notes = []
    if is_ablation and exp.method == "zero":
        notes.append("Zero ablation sets activations to 0, a value the model never sees there: its effects are "
                     "off-distribution; mean or resample ablation stay on the data's distribution.")
    if is_ablation:
        notes.append("Normalised effect of an ablation: m_ablated / m_clean (no corrupt run: m_corrupt = 0); "
                     "1 = no effect, 0 = no preference left between the pair.")
    else:
        notes.append(f"{exp.direction.capitalize()}: normalised effect (m - m_corrupt) / (m_clean - m_corrupt); "
                     + ("1 = the patch restores the clean answer's preference." if exp.direction == "denoising"
                        else "0 = the patch destroys the clean answer's preference."))
    if flagged.any():
        notes.append(f"{int(flagged.sum())} rows have |m_clean - m_corrupt| below the threshold: their normalised "
                     "effect is left out (NaN), never divided.")
    if not decode:
        notes.append("Decoding was skipped: decoded answers are empty.")
    return Result(hash=content_hash(request), request=request, cells=p.cells, table=table, baselines=base,
                  provenance=provenance(model, store, p, started, t0, jobs=len(jobs), chunks=n_chunks), notes=notes)


def provenance(model: LoadedModel, store: RunStore, p: Plan | EditPlan, started: str, t0: float, **extra) -> dict:
    """Returns a result's provenance: the model's fingerprint, code, device, times, what ran."""
    return {
        "model": fingerprint(model.info), "code_version": code_version(), "device": str(model.device),
        "dtype": str(next(model.hf_model.parameters()).dtype).removeprefix("torch."),
        "started": started, "finished": now(), "rows": len(p.rows), **extra,
        "clean_forwards": round(p.clean_forwards, 3), "seconds_executor": round(time.perf_counter() - t0, 3),
        "store": store.name, "torch": torch.__version__,
    }
