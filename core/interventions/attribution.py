"""Attribution patching sweeps: every cell of a patching grid estimated from one forward and
one backward pass per (clean, corrupt) pair, then the top cells checked by exact patching.

The metric is the exact executor's (`core.interventions.executor`): m = log p(A) - log p(B),
A and B the clean and the corrupt seed's answers (their own clean answers, or their true
outputs), teacher-forced whole. Denoising: the corrupt prompt runs, a cell copies the clean
run's activation in; the effect of a cell is m(patched) - m(corrupt).

**AtP** (Nanda 2023; Kramar et al. 2024). For a cell (site, positions P) with activations
a_clean, a_corrupt:

    effect ~ sum over t in P of (a_clean[t] - a_corrupt[t]) . dm/da[t], at the corrupt run.

One corrupt forward + backward gives dm/da at every site; one clean forward gives a_clean.
Both forwards read the prompt and both answers as one tree-shaped sequence (prompt, A but
its last token, B but its last token; B's tokens do not see A's), so one pass scores both.
Exact for a metric linear in the site; otherwise first-order in the activation difference:
it misses what the rest of the network does non-linearly with a large difference (a whole
query's residual stream patched at once), and ranks rather than measures there.

**Sites.** `resid_pre` (layers 0..L; L: after the last layer, before the final norm),
`attn_out`, `mlp_out`, `head` (head h's output z, its slice of the input of W_O): the
executor's sites, so each cell can be verified by it. For `head`, a_clean - a_corrupt is
the exact change of the head's output: the head's own softmax is never linearised.

**AtP\\* QK fix** (Kramar et al. 2024, section 3.1.1), kinds `head_q` and `head_k`: the
effect of giving head h the clean run's *query* at P (`head_q`), or the clean run's *keys*
at P (`head_k`, as head h reads them; the other heads of its key-value group keep theirs),
everything else of the corrupt run. A query or key change passes straight through the
softmax, where plain AtP's linearisation fails when the attention is saturated (a gradient
near 0 hides a large change of the pattern). Here the head's new output is computed exactly
(one extra pass over the layer's attention only: the new attention logits, the exact
softmax, its values; keys in closed form per cell), and only what comes after the head is
linearised: effect ~ sum over queries t of dz[t] . dm/dz[t]. The column `atp` keeps plain
AtP's estimate (linearised through the softmax too) to show the correction. The executor
does not patch queries or keys, so these cells stay "estimated"; `HeadAttention` is tested
against hooked forwards. Needs Llama-style attention (q_proj, k_proj, v_proj, rotary).

**Verification** (`verify`): per kind, the k cells of largest |estimate| and a random
sample of the rest run exactly through the executor; each cell is then "estimated" or
"verified", and the sweep holds per kind recall@k (of the exact top k among the verified
cells, how many the estimate put in its top k), Spearman's rank correlation of estimate
and exact effect over the verified cells, the sign agreement on the top k, and the largest
exact effect among verified cells outside the estimate's top k (what it missed).

Sweeps are JSON files `<cache>/sweeps/<run>/<hash>.json` (never pickle), written by
`python -m cache_builder sweep` and read by the app's "Attribution sweep" page.
"""

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from core.interventions.backend import fingerprint
from core.interventions.executor import execute, unit_answers
from core.interventions.plan import Plan, aligned, expand_sites, plan
from core.interventions.positions import Spans, expand
from core.interventions.result import DENOMINATOR_MIN
from core.interventions.spec import (ExperimentRequest, InterventionError, Patching, Site, SiteGrid, code_version)
from core.models import LoadedModel
from core.store import RunStore, now

SWEEP_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "head", "head_q", "head_k")
EXACT_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "head")  # what the executor can patch
HEAD_KINDS: tuple[str, ...] = ("head", "head_q", "head_k")
SWEEPS = "sweeps"
# An executor request's fixed cost per pair, in forward passes: the clean and corrupt prompts' clean
# runs, and their baselines' scoring and greedy answers (the executor decodes baselines always).
OVERHEAD = 3.0

Progress = Callable[[float, str], None]


# --- the result -----------------------------------------------------------------------------------------------------

class Sweep(BaseModel):
    """A finished sweep: one row per cell in `cells` (columns below), the pairs' baselines,
    verification statistics per kind once verified, provenance. JSON in and out (NaN as null).

    `cells` columns: kind, layer, head (-1: none), position (a named position), label,
    estimate (mean over pairs; AtP*, AtP for all but head_q / head_k), atp (plain AtP),
    normalized (mean over pairs of estimate / (m_clean - m_corrupt), pairs whose
    |m_clean - m_corrupt| < DENOMINATOR_MIN left out), per_pair (the estimate per pair),
    status ("estimated" / "verified"), exact (mean exact effect), exact_per_pair.
    """

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")

    schema_version: Literal[1] = 1
    hash: str
    run: str
    pairs: list[tuple[int, int]]
    kinds: list[str]
    layers: list[int] | Literal["all"] = "all"
    positions: list[str]
    answers: Literal["model", "truth"] = "model"
    cells: dict[str, list[Any]]
    baselines: dict[str, list[Any]]  # pair label, m_clean, m_corrupt (this code path's)
    verification: dict[str, Any] | None = None
    provenance: dict[str, Any]
    notes: list[str] = []

    def frame(self) -> pd.DataFrame:
        """Returns one row per cell (the per-pair lists left out; NaN where JSON holds null)."""
        df = pd.DataFrame({k: v for k, v in self.cells.items() if not k.endswith("per_pair")})
        for column in ("estimate", "atp", "normalized", "exact"):
            df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
        return df

    def per_pair(self, column: str = "per_pair") -> Float[np.ndarray, "cell pair"]:
        """Returns `per_pair` (estimates) or `exact_per_pair` as a float array (NaN: none)."""
        n = len(self.pairs)
        return np.array([[np.nan] * n if row is None else [np.nan if v is None else v for v in row]
                         for row in self.cells[column]], dtype=float).reshape(-1, n)


# --- the forward passes ---------------------------------------------------------------------------------------------

@dataclass
class Tree:
    """Prompt + A[:-1] + B[:-1] as one sequence: B's tokens do not attend to A's."""

    ids: Int[Tensor, "1 s"]
    pos: Int[Tensor, "1 s"]
    mask: Bool[Tensor, "s s"]
    read: Int[Tensor, " r"]  # sequence index whose logits predict each answer token
    target: Int[Tensor, " r"]
    sign: Float[Tensor, " r"]  # +1 for A's tokens, -1 for B's
    n_prompt: int


def tree(tokens: np.ndarray, a: list[int], b: list[int], device: torch.device) -> Tree:
    """Returns the sequence scoring answers `a` and `b` after the prompt `tokens` in one pass."""
    t, ea, eb = len(tokens), list(a[:-1]), list(b[:-1])
    s = t + len(ea) + len(eb)
    ids = np.concatenate([tokens, ea, eb]).astype(np.int64)
    pos = np.concatenate([np.arange(t), t + np.arange(len(ea)), t + np.arange(len(eb))])
    mask = np.tril(np.ones((s, s), dtype=bool))
    mask[t + len(ea):, t: t + len(ea)] = False
    read = [t - 1] + list(range(t, t + len(ea))) + [t - 1] + list(range(t + len(ea), s))
    as_t = lambda x, dt=torch.long: torch.as_tensor(np.asarray(x), dtype=dt, device=device)  # noqa: E731
    return Tree(as_t(ids)[None], as_t(pos)[None], as_t(mask, torch.bool), as_t(read), as_t(list(a) + list(b)),
                as_t([1.0] * len(a) + [-1.0] * len(b), torch.float32), t)


@dataclass
class Pass:
    """One forward pass: the metric, the sites' activations ([L(+1), s, ...], whole sequence)
    and, for the backward pass, their gradients; each layer's attention input (q, k, v)."""

    m: float
    acts: dict[str, list[Tensor]]  # resid_pre [s, d] x L+1; attn_out, mlp_out [s, d] x L; head [s, H*dh] x L
    grads: dict[str, list[Tensor]] | None
    qkv: list[tuple[Tensor, Tensor, Tensor]] | None  # per layer: q [H, s, dh], k, v [KV, s, dh] (rotary applied)


def _check_llama(model: LoadedModel) -> None:
    attn = model.hf_model.model.layers[0].self_attn
    if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")) or any(
            hasattr(attn, name) for name in ("q_norm", "k_norm")) or getattr(attn, "sliding_window", None):
        raise InterventionError(f"head_q / head_k need Llama-style attention (q, k, v projections and rotary "
                                f"positions); {model.info.get('architecture')} has other attention")


def forward(model: LoadedModel, tr: Tree, grad: bool, qkv: bool) -> Pass:
    """Runs the tree through the model with hooks on every site; with `grad`, also dm/d(site)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf = model.hf_model
    layers = list(hf.model.layers)
    n = len(layers)
    n_heads, n_kv, d_head = model.info["n_heads"], model.info["n_kv_heads"], model.info["d_head"]
    acts: dict[str, list] = {"resid_pre": [None] * (n + 1), "attn_out": [None] * n, "mlp_out": [None] * n,
                             "head": [None] * n}
    attn_in: list = [None] * n

    def put(kind: str, i: int, x: Tensor) -> None:
        acts[kind][i] = x

    handles = []
    for i, layer in enumerate(layers):
        handles += [
            layer.register_forward_pre_hook(
                lambda m, a, k, i=i: put("resid_pre", i, a[0] if a else k["hidden_states"]), with_kwargs=True),
            layer.self_attn.register_forward_hook(lambda m, a, r, i=i: put("attn_out", i, r[0])),
            layer.mlp.register_forward_hook(lambda m, a, r, i=i: put("mlp_out", i, r)),
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: put("head", i, a[0])),
        ]
        if qkv:
            handles.append(layer.self_attn.register_forward_pre_hook(
                lambda m, a, k, i=i: attn_in.__setitem__(i, ((a[0] if a else k["hidden_states"]).detach(),
                                                             k["position_embeddings"])), with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(
        lambda m, a, r: put("resid_pre", n, r[0] if isinstance(r, tuple) else r)))
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            emb = hf.model.embed_tokens(tr.ids)
            if grad:  # a leaf here puts every site in the graph whether or not the weights want gradients
                emb = emb.detach().requires_grad_(True)
            out = hf.model(inputs_embeds=emb, attention_mask=tr.mask[None, None], position_ids=tr.pos,
                           use_cache=False)
            logp = model.logprobs(out.last_hidden_state[0, tr.read])
            m = (logp[torch.arange(len(tr.read), device=logp.device), tr.target] * tr.sign).sum()
            grads = None
            if grad:
                flat = [x for k in acts for x in acts[k]]
                g = torch.autograd.grad(m, flat)
                grads, j = {}, 0
                for k in acts:
                    grads[k] = [x[0].detach() for x in g[j: j + len(acts[k])]]
                    j += len(acts[k])
    finally:
        for h in handles:
            h.remove()
    qkvs = None
    if qkv:
        qkvs = []
        with torch.no_grad():
            for layer, (x, (cos, sin)) in zip(layers, attn_in):
                att = layer.self_attn
                shape = (*x.shape[:-1], -1, d_head)
                q = att.q_proj(x).view(shape).transpose(1, 2)
                k = att.k_proj(x).view(shape).transpose(1, 2)
                v = att.v_proj(x).view(shape).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                qkvs.append((q[0], k[0], v[0]))
        assert qkvs[0][0].shape[0] == n_heads and qkvs[0][1].shape[0] == n_kv
    return Pass(float(m.detach()), {k: [x[0].detach() for x in v] for k, v in acts.items()}, grads, qkvs)


# --- the QK fix -----------------------------------------------------------------------------------------------------

def _wide(x: Tensor) -> Tensor:
    """float32 for bfloat16 / float16 / float32 activations, float64 kept (the tests' exact checks)."""
    return x if x.dtype == torch.float64 else x.float()


class HeadAttention:
    """One layer's attention in the corrupt run, per query head, in float32: the new output
    of each head when its query at some positions, or the keys it reads at some positions,
    are the clean run's, exactly through the softmax and linearised (plain AtP)."""

    def __init__(self, q: Float[Tensor, "H s dh"], k: Float[Tensor, "KV s dh"], v: Float[Tensor, "KV s dh"],
                 mask: Bool[Tensor, "s s"], scale: float) -> None:
        group = q.shape[0] // k.shape[0]
        self.q, self.scale, self.mask = _wide(q), scale, mask
        self.k = _wide(k).repeat_interleave(group, 0)
        self.v = _wide(v).repeat_interleave(group, 0)
        logits = (self.q @ self.k.transpose(1, 2) * scale).masked_fill(~mask, -torch.inf)
        self.lse = torch.logsumexp(logits, -1, keepdim=True)  # [H, s, 1]
        self.a = torch.exp(logits - self.lse)  # [H, s, s]
        self.z = self.a @ self.v  # [H, s, dh]

    def query_patch(self, q_new: Float[Tensor, "H r dh"], rows: Int[Tensor, " r"],
                    ) -> tuple[Float[Tensor, "H r dh"], Float[Tensor, "H r dh"]]:
        """Returns (exact, linearised) change of z at query positions `rows` given queries `q_new` there.
        A query changes only its own row, so the rows are independent patches as well as one."""
        mask = self.mask[rows]
        new = (_wide(q_new) @ self.k.transpose(1, 2) * self.scale).masked_fill(~mask, -torch.inf)
        exact = torch.softmax(new, -1) @ self.v - self.z[:, rows]
        dl = ((_wide(q_new) - self.q[:, rows]) @ self.k.transpose(1, 2) * self.scale).masked_fill(~mask, 0)
        w = self.a[:, rows] * dl  # softmax Jacobian: da = a * (dl - sum(a * dl))
        linear = w @ self.v - w.sum(-1, keepdim=True) * self.z[:, rows]
        return exact, linear

    def key_patch(self, k_new: Float[Tensor, "H c dh"], cols: Int[Tensor, " c"],
                  ) -> tuple[Float[Tensor, "H s dh"], Float[Tensor, "H s dh"]]:
        """Returns (exact, linearised) change of z at every query when the keys at `cols` are `k_new`.

        Closed form per query t: only the logits of columns `cols` move, so with the row's
        old log-normaliser lse and d = exp(l' - lse) - a over those columns,
        z' - z = (d @ v_cols - sum(d) z) / (1 + sum(d)); scaled by exp(-c) against overflow."""
        mask = self.mask[:, cols]
        new = (self.q @ _wide(k_new).transpose(1, 2) * self.scale).masked_fill(~mask, -torch.inf)  # [H, s, c]
        old = self.a[:, :, cols]
        shift = (new - self.lse).amax(-1, keepdim=True).clamp_min(0)
        d = torch.exp(new - self.lse - shift) - old * torch.exp(-shift)
        exact = (d @ self.v[:, cols] - d.sum(-1, keepdim=True) * self.z) / (torch.exp(-shift) + d.sum(-1, keepdim=True))
        dl = (self.q @ (_wide(k_new) - self.k[:, cols]).transpose(1, 2) * self.scale).masked_fill(~mask, 0)
        w = old * dl
        linear = w @ self.v[:, cols] - w.sum(-1, keepdim=True) * self.z
        return exact, linear

    def key_effects(self, k_new: Float[Tensor, "H u dh"], cols: Int[Tensor, " u"], member: Float[Tensor, "n u"],
                    g: Float[Tensor, "H s dh"], budget: int = 1 << 25) -> tuple[Float[Tensor, "H n"], Float[Tensor, "H n"]]:
        """Returns (exact, linearised) sum over queries t of dz[t] . g[t] for each of n key patches,
        patch j giving the keys at columns `cols` where member[j] is 1 their `k_new`: `key_patch`'s
        closed form with the dh axis contracted first (v_c . g_t and z_t . g_t), all patches at once."""
        mask = self.mask[:, cols]
        x = ((self.q @ _wide(k_new).transpose(1, 2) * self.scale).masked_fill(~mask, -torch.inf)
             - self.lse)  # [H, s, u]: the new logits against the old log-normaliser
        old = self.a[:, :, cols]
        vg = g @ self.v[:, cols].transpose(1, 2) - (self.z * g).sum(-1, keepdim=True)  # (v_c - z_t) . g_t
        dl = (self.q @ (_wide(k_new) - self.k[:, cols]).transpose(1, 2) * self.scale).masked_fill(~mask, 0)
        linear = ((old * dl * vg).sum(1) @ member.T.to(vg.dtype))  # [H, n]
        on = member.bool()
        step = max(1, budget // max(1, x.numel()))  # patches per chunk: [H, s, step, u] at most `budget`
        exact = []
        for lo in range(0, len(on), step):
            m = on[lo: lo + step]  # [k, u]
            xm = x[:, :, None, :].masked_fill(~m, -torch.inf)  # [H, s, k, u]
            shift = xm.amax(-1, keepdim=True).clamp_min(0)
            d = torch.exp(xm - shift) - old[:, :, None, :] * m * torch.exp(-shift)
            num = (d * vg[:, :, None, :]).sum(-1)  # [H, s, k]
            exact.append((num / (torch.exp(-shift[..., 0]) + d.sum(-1))).sum(1))
        return torch.cat(exact, -1), linear


# --- the sweep ------------------------------------------------------------------------------------------------------

@dataclass
class Grid:
    """What a sweep covers: cells (kind, layer, head, position name), the token positions each
    name covers, and the answers of every pair (the executor's)."""

    kinds: list[str]
    layers: dict[str, list[int]]
    heads: int
    names: list[str]
    tokens: dict[str, np.ndarray]
    rows: list[tuple[int, int]]  # (clean, corrupt) store rows
    answers: list[tuple[list[int], list[int]]]
    request: ExperimentRequest


def validate(store: RunStore, model_info: dict, pairs: list[tuple[int, int]], kinds: list[str],
             positions: list[str], answers: str = "model", layers: list[int] | str = "all",
             ) -> tuple[ExperimentRequest, dict[str, list[int]], Plan]:
    """Returns the executor's request behind the sweep, each kind's layers and its plan; raises
    InterventionError (one line) for what cannot run. Needs no model: the CLI checks first."""
    unknown = [k for k in kinds if k not in SWEEP_KINDS]
    if unknown or not kinds:
        raise InterventionError(f"unknown site kind {unknown[0] if unknown else '(none)'!r}; use "
                                f"{', '.join(SWEEP_KINDS)}")
    if not pairs:
        raise InterventionError("no pair given; give clean:corrupt seed pairs, e.g. 0:1,2:3")
    for clean, corrupt in pairs:
        if clean == corrupt:
            raise InterventionError(f"pair {clean}:{corrupt} patches a seed into itself: its effects are all zero")
    if not aligned(store):
        raise InterventionError(f"attribution patching needs every seed at the same token positions; run "
                                f"{store.name} has prompts of different lengths (use an aligned run)")
    n_layers, n_heads = int(model_info["n_layers"]), int(model_info["n_heads"])
    chosen = {k: sorted({s.layer for s in expand_sites(SiteGrid(
        kind="head" if k in HEAD_KINDS else k, layers=layers, heads="all" if k in HEAD_KINDS else None),
        n_layers, n_heads)}) for k in kinds}
    request = ExperimentRequest(run=store.name.removesuffix(".zarr"), experiment=Patching(
        answers=answers, decode=False, sites=[SiteGrid(kind="resid_pre", layers=[0])], positions=positions,
        pairs=pairs))
    # seeds, positions, alignment: the executor's own checks
    return request, chosen, plan(store, request, model_info)


def grid(model: LoadedModel, store: RunStore, pairs: list[tuple[int, int]], kinds: list[str],
         positions: list[str], answers: str = "model", layers: list[int] | str = "all") -> Grid:
    """Returns the sweep's grid; raises InterventionError (one line) for what cannot run."""
    request, chosen, p = validate(store, model.info, pairs, kinds, positions, answers, layers)
    if {"head_q", "head_k"} & set(kinds):
        _check_llama(model)
    names = expand(positions, store.attrs["dataset"]["n_examples"])
    spans = Spans(store)
    target = p.units[0].target
    return Grid(list(kinds), chosen, int(model.info["n_heads"]), names,
                {n: spans.resolve(target, n) for n in names}, [tuple(u.prompts) for u in p.units],
                unit_answers(store, request, p, model.tokenizer), request)


def _cells(g: Grid) -> pd.DataFrame:
    rows = []
    for kind in g.kinds:
        for layer in g.layers[kind]:
            for head in range(g.heads) if kind in HEAD_KINDS else [-1]:
                for name in g.names:
                    site = f"L{layer}" + (f"H{head}" if head >= 0 else "")
                    rows.append((kind, layer, head, name, f"{kind} {site} @ {name}"))
    return pd.DataFrame(rows, columns=["kind", "layer", "head", "position", "label"])


def _pair(model: LoadedModel, store: RunStore, g: Grid, i: int, at: np.ndarray, member: Tensor,
          ) -> tuple[dict[str, Tensor], dict[str, Tensor], float, float]:
    """Returns one pair's (AtP*, AtP) per kind: [layers, names] or [layers, heads, names], and m_clean, m_corrupt."""
    clean_row, corrupt_row = g.rows[i]
    a, b = g.answers[i]
    if not a or not b:  # a candidate without a number has no log-probability (the executor's NaN)
        nan = {k: torch.full((len(g.layers[k]), *([g.heads] if k in HEAD_KINDS else []), len(g.names)), torch.nan)
               for k in g.kinds}
        return nan, nan, np.nan, np.nan
    dev = model.device
    qk = bool({"head_q", "head_k"} & set(g.kinds))
    tr_clean = tree(store.tokens(clean_row), a, b, dev)
    tr_corrupt = tree(store.tokens(corrupt_row), a, b, dev)
    clean = forward(model, tr_clean, grad=False, qkv=qk)
    corrupt = forward(model, tr_corrupt, grad=True, qkv=qk)
    at_t = torch.as_tensor(at, dtype=torch.long, device=dev)
    wide = _wide(torch.zeros((), dtype=next(model.hf_model.parameters()).dtype)).dtype
    member = member.to(device=dev, dtype=wide)  # [names, U]: which stored token each name covers
    d_head = model.info["d_head"]
    est: dict[str, Tensor] = {}
    for kind in [k for k in EXACT_KINDS if k in g.kinds]:
        delta = torch.stack([_wide(clean.acts[kind][l][at_t]) - _wide(corrupt.acts[kind][l][at_t])
                             for l in g.layers[kind]])
        grad = torch.stack([_wide(corrupt.grads[kind][l][at_t]) for l in g.layers[kind]])
        if kind == "head":  # per head: [L, U, H, dh]
            e = (delta.unflatten(-1, (-1, d_head)) * grad.unflatten(-1, (-1, d_head))).sum(-1)
            est[kind] = torch.einsum("luh,nu->lhn", e, member)
        else:
            est[kind] = (delta * grad).sum(-1) @ member.T
    atp = dict(est)
    if qk:
        scale_of = lambda l: float(model.hf_model.model.layers[l].self_attn.scaling)  # noqa: E731
        for kind in ("head_q", "head_k"):
            if kind not in g.kinds:
                continue
            fixed, linear = [], []
            for l in g.layers[kind]:
                q, k, v = corrupt.qkv[l]
                qc, kc, _ = clean.qkv[l]
                att = HeadAttention(q, k, v, tr_corrupt.mask, scale_of(l))
                gz = _wide(corrupt.grads["head"][l]).unflatten(-1, (-1, d_head)).transpose(0, 1)  # [H, s, dh]
                if kind == "head_q":
                    dz, dz_lin = att.query_patch(qc[:, at_t], at_t)
                    fixed.append((dz * gz[:, at_t]).sum(-1) @ member.T)
                    linear.append((dz_lin * gz[:, at_t]).sum(-1) @ member.T)
                else:
                    kc_h = _wide(kc).repeat_interleave(att.q.shape[0] // kc.shape[0], 0)
                    f, li = att.key_effects(kc_h[:, at_t], at_t, member, gz)
                    fixed.append(f)
                    linear.append(li)
            est[kind], atp[kind] = torch.stack(fixed), torch.stack(linear)
    return ({k: v.cpu() for k, v in est.items()}, {k: v.cpu() for k, v in atp.items()}, clean.m, corrupt.m)


def _mean(x: Float[np.ndarray, "cell pair"]) -> Float[np.ndarray, " cell"]:
    """Returns the mean over pairs of the finite values (NaN where none is), without warnings."""
    ok = np.isfinite(x)
    with np.errstate(all="ignore"):
        return np.where(ok.any(1), np.where(ok, x, 0).sum(1) / ok.sum(1), np.nan)


def sweep_hash(model_info: dict, run: str, pairs: list[tuple[int, int]], kinds: list[str], positions: list[str],
               answers: str, layers: list[int] | str) -> str:
    """Returns the name of a sweep: same model, run, grid and code = same sweep."""
    body = json.dumps({"model": fingerprint(model_info)["config_hash"], "run": run.removesuffix(".zarr"),
                       "pairs": [list(p) for p in pairs], "kinds": list(kinds), "positions": list(positions),
                       "answers": answers, "layers": layers, "code": code_version()}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def sweep(model: LoadedModel, store: RunStore, pairs: list[tuple[int, int]], kinds: list[str] = SWEEP_KINDS,
          positions: list[str] = ("stored",), answers: Literal["model", "truth"] = "model",
          layers: list[int] | Literal["all"] = "all", progress: Progress | None = None) -> Sweep:
    """Returns the AtP / AtP* estimate of every cell of the grid (see the module docstring),
    per pair and averaged; every cell "estimated"."""
    say = progress or (lambda f, s: None)
    started, t0 = now(), time.perf_counter()
    kinds, positions, pairs = list(kinds), list(positions), [tuple(map(int, p)) for p in pairs]
    g = grid(model, store, pairs, kinds, positions, answers, layers)
    cells = _cells(g)
    at = np.unique(np.concatenate(list(g.tokens.values())))
    member = torch.zeros((len(g.names), len(at)))
    for j, name in enumerate(g.names):
        member[j, np.searchsorted(at, g.tokens[name])] = 1.0
    per_pair, per_pair_atp, m_clean, m_corrupt = [], [], [], []
    for i in range(len(pairs)):
        say(i / len(pairs), f"pair {i + 1}/{len(pairs)}: clean forward, corrupt forward and backward")
        est, atp, mc, mr = _pair(model, store, g, i, at, member)
        per_pair.append(torch.cat([est[k].flatten() for k in kinds]).numpy().astype(float))
        per_pair_atp.append(torch.cat([atp[k].flatten() for k in kinds]).numpy().astype(float))
        m_clean.append(mc)
        m_corrupt.append(mr)
    say(1.0, "done")
    e = np.stack(per_pair, 1)  # [cells, pairs]
    den = np.asarray(m_clean) - np.asarray(m_corrupt)
    ok = np.abs(den) >= DENOMINATOR_MIN
    with np.errstate(all="ignore"):
        normalized = np.where(ok[None], e / den[None], np.nan)
    cells["estimate"] = _mean(e)
    cells["atp"] = _mean(np.stack(per_pair_atp, 1))
    cells["normalized"] = _mean(normalized)
    cells["status"] = "estimated"
    cells["exact"] = np.nan
    table = {c: cells[c].tolist() for c in cells.columns}
    table["per_pair"] = e.tolist()
    table["exact_per_pair"] = [None] * len(cells)
    notes = ["Estimates are first-order (AtP): exact where the metric is linear in the site, a ranking to "
             "verify elsewhere; head_q / head_k use the exact softmax (AtP* QK fix) and cannot be verified by "
             "the executor, which does not patch queries or keys."]
    if (~ok).any():
        notes.append(f"{int((~ok).sum())} pairs have |m_clean - m_corrupt| < {DENOMINATOR_MIN}: left out of "
                     "the normalised estimate.")
    provenance = {"model": fingerprint(model.info), "code_version": code_version(), "device": str(model.device),
                  "dtype": str(next(model.hf_model.parameters()).dtype).removeprefix("torch."), "store": store.name,
                  "started": started, "finished": now(), "seconds_sweep": round(time.perf_counter() - t0, 3),
                  "torch": torch.__version__, "forward_backward_per_pair": "1 clean forward, 1 corrupt forward + "
                  "backward"}
    run = store.name.removesuffix(".zarr")
    return Sweep(hash=sweep_hash(model.info, run, pairs, kinds, positions, answers, layers), run=run, pairs=pairs,
                 kinds=kinds, layers=layers, positions=g.names, answers=answers, cells=table,
                 baselines={"pair": [f"{c}->{r}" for c, r in pairs], "m_clean": m_clean, "m_corrupt": m_corrupt},
                 provenance=provenance, notes=notes)


# --- verification by exact patching ---------------------------------------------------------------------------------

def _requests(chosen: pd.DataFrame, first: dict[str, int], n_layers: int, n_tokens: int,
              ) -> list[tuple[list[Site], list[str]]]:
    """Groups cells into executor requests (each a grid: its sites x its positions), starting
    from one per position and merging two while that saves work (clean runs vs extra cells)."""
    def site(r) -> Site:
        return Site(kind=r.kind, layer=int(r.layer), head=int(r.head) if r.head >= 0 else None)

    def weight(s: Site, name: str) -> float:
        return (n_layers + 1 - s.layer) / (n_layers + 1) * (n_tokens - first[name]) / n_tokens

    def cost(sites: set, names: set) -> float:
        return OVERHEAD + sum(weight(s, n) for s in sites for n in names)

    groups: dict[str, set] = {}
    for r in chosen.itertuples():
        groups.setdefault(r.position, set()).add(site(r))
    parts = [({*sites}, {name}) for name, sites in groups.items()]
    while len(parts) > 1:
        best, pair = 0.0, None
        for i in range(len(parts)):
            for j in range(i + 1, len(parts)):
                merged = cost(parts[i][0] | parts[j][0], parts[i][1] | parts[j][1])
                saving = cost(*parts[i]) + cost(*parts[j]) - merged
                if saving > best:
                    best, pair = saving, (i, j)
        if pair is None:
            break
        i, j = pair
        parts[i] = (parts[i][0] | parts[j][0], parts[i][1] | parts[j][1])
        del parts[j]
    key = lambda s: (s.kind, s.layer, -1 if s.head is None else s.head)  # noqa: E731
    return [(sorted(sites, key=key), sorted(names, key=lambda n: first[n])) for sites, names in parts]


def exact_effects(model: LoadedModel, store: RunStore, sw: Sweep, chosen: pd.DataFrame,
                  progress: Progress | None = None) -> tuple[dict[tuple, np.ndarray], np.ndarray]:
    """Returns the executor's exact effect m(patched) - m(corrupt) per pair of every chosen
    cell, keyed (kind, layer, head, position), and its m_corrupt per pair."""
    say = progress or (lambda f, s: None)
    spans = Spans(store)
    target = store.seeds.index(sw.pairs[0][1])
    first = {n: int(spans.resolve(target, n).min()) for n in sw.positions}
    groups = _requests(chosen, first, int(model.info["n_layers"]), int(spans.n_tokens[target]))
    out: dict[tuple, np.ndarray] = {}
    m_corrupt = None
    for gi, (sites, names) in enumerate(groups):
        request = ExperimentRequest(run=sw.run, experiment=Patching(
            answers=sw.answers, decode=False, positions=names, pairs=sw.pairs,
            sites=[SiteGrid(kind=s.kind, layers=[s.layer], heads=None if s.head is None else [s.head])
                   for s in sites]))
        lo, hi = gi / len(groups), (gi + 1) / len(groups)
        result = execute(model, store, request, lambda f, s: say(lo + f * (hi - lo), f"exact {gi + 1}/"
                                                                 f"{len(groups)}: {s}"))
        m_corrupt = np.asarray(result.baselines["m_corrupt"], float)
        units = {u: j for j, u in enumerate(result.baselines["unit"])}
        table = pd.DataFrame(result.table)
        for c, cell in enumerate(result.cells):
            s = cell.sites[0]
            rows = table[table["cell"] == c]
            effect = np.full(len(sw.pairs), np.nan)
            for unit, m in zip(rows["unit"], rows["logprob_diff"]):
                effect[units[unit]] = m - m_corrupt[units[unit]]
            out[s.kind, s.layer, -1 if s.head is None else s.head, cell.positions[0]] = effect
    return out, m_corrupt


def stats(df: pd.DataFrame, top: set[str], k: int) -> dict[str, Any]:
    """Returns the verification statistics of one kind: `df` its verified cells (estimate,
    exact), `top` the labels of the estimate's top k."""
    from scipy.stats import spearmanr

    d = df[np.isfinite(df["exact"]) & np.isfinite(df["estimate"])]
    exact_top = d.reindex(d["exact"].abs().sort_values(ascending=False).index)[:k]
    est_top = d[d["label"].isin(top)]
    missed = d[~d["label"].isin(top)]
    worst = missed.loc[missed["exact"].abs().idxmax()] if len(missed) else None
    rho = float(spearmanr(d["estimate"], d["exact"]).statistic) if len(d) > 2 else np.nan
    return {
        "k": int(k), "n_verified": int(len(d)), "n_random": int(len(d) - len(est_top)),
        "recall_at_k": float(exact_top["label"].isin(top).mean()) if len(exact_top) else np.nan,
        "spearman": rho if np.isfinite(rho) else None,
        "sign_agreement_top_k": float((np.sign(est_top["estimate"]) == np.sign(est_top["exact"])).mean())
        if len(est_top) else None,
        "max_exact": float(d["exact"].abs().max()) if len(d) else None,
        "max_missed": float(worst["exact"]) if worst is not None else None,
        "max_missed_cell": str(worst["label"]) if worst is not None else None,
        "max_missed_estimate": float(worst["estimate"]) if worst is not None else None,
    }


def verify(model: LoadedModel, store: RunStore, sw: Sweep, top_k: int = 10, n_random: int = 10, seed: int = 0,
           progress: Progress | None = None) -> Sweep:
    """Returns the sweep with, per verifiable kind, its top-k cells by |estimate| and `n_random`
    others drawn at random run exactly (marked "verified") and the statistics in `verification`."""
    if top_k < 1 or n_random < 0:
        raise InterventionError(f"verification needs top k >= 1 and a random sample >= 0 (got {top_k}, {n_random})")
    if store.name.removesuffix(".zarr") != sw.run:
        raise InterventionError(f"sweep {sw.hash} is of run {sw.run}, not {store.name}")
    df = sw.frame()
    rng = np.random.default_rng(seed)
    chosen, tops = [], {}
    for kind in [k for k in sw.kinds if k in EXACT_KINDS]:
        part = df[(df["kind"] == kind) & np.isfinite(df["estimate"])]
        order = part["estimate"].abs().sort_values(ascending=False, kind="stable").index
        top = order[:top_k]
        rest = order[top_k:]
        sample = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else []
        tops[kind] = (df.loc[top, "label"], min(top_k, len(top)))
        chosen.append(df.loc[list(top) + list(sample)])
    if not chosen:
        raise InterventionError("nothing to verify: the sweep has only head_q / head_k cells, which the executor "
                                "cannot patch")
    chosen = pd.concat(chosen)
    exact, m_corrupt = exact_effects(model, store, sw, chosen, progress)
    cells = {k: list(v) for k, v in sw.cells.items()}
    for i in chosen.index:
        r = df.loc[i]
        effect = exact[r["kind"], int(r["layer"]), int(r["head"]), r["position"]]
        cells["exact_per_pair"][i] = effect.tolist()
        cells["exact"][i] = float(_mean(effect[None])[0])
        cells["status"][i] = "verified"
    out = sw.model_copy(update={"cells": cells})
    sample = out.frame().loc[chosen.index]
    verification: dict[str, Any] = {
        "top_k": top_k, "n_random": n_random, "seed": seed,
        # the executor's own corrupt baseline next to this code path's: the same metric, two implementations
        "baseline_max_abs_diff": float(np.nanmax(np.abs(m_corrupt - np.asarray(sw.baselines["m_corrupt"],
                                                                                  float)))),
        # this sample only: cells verified by an earlier verification keep their exact values, not a say here
        "kinds": {kind: stats(sample[sample["kind"] == kind], set(top), k) for kind, (top, k) in tops.items()},
        "finished": now(),
    }
    return out.model_copy(update={"verification": verification})


# --- sweep, verify, save: what the command line runs --------------------------------------------------------------

def sweep_and_verify(model: LoadedModel, store: RunStore, cache_dir: str | Path, pairs: list[tuple[int, int]],
        kinds: list[str] = SWEEP_KINDS, positions: list[str] = ("stored",), answers: str = "model",
        layers: list[int] | str = "all", top_k: int = 0, n_random: int = 0, seed: int = 0,
        progress: Progress | None = None) -> tuple[Sweep, Path]:
    """Returns the sweep of this grid and where it is saved: the saved one when this code swept
    it before, else a new one; verified (`verify`) when `top_k` > 0 unless already verified alike."""
    say = progress or (lambda f, s: None)
    name = store.name.removesuffix(".zarr")
    path = sweep_path(cache_dir, name, sweep_hash(model.info, name, pairs, list(kinds), list(positions), answers,
                                                 layers))
    sw = load(path) if path.exists() else None
    share = 0.5 if top_k else 1.0
    if sw is None:
        sw = sweep(model, store, pairs, kinds, positions, answers, layers, lambda f, s: say(share * f, s))
        save(sw, cache_dir)
    done = sw.verification or {}
    if top_k and (done.get("top_k"), done.get("n_random"), done.get("seed")) != (top_k, n_random, seed):
        sw = verify(model, store, sw, top_k, n_random, seed, lambda f, s: say(share + (1 - share) * f, s))
        save(sw, cache_dir)
    say(1.0, "done")
    return sw, path


# --- files ----------------------------------------------------------------------------------------------------------

def sweep_path(cache_dir: str | Path, run: str, hash_: str) -> Path:
    return Path(cache_dir) / SWEEPS / run.removesuffix(".zarr") / f"{hash_}.json"


def save(sw: Sweep, cache_dir: str | Path) -> Path:
    """Writes the sweep as JSON (a temporary file renamed into place); returns its path."""
    path = sweep_path(cache_dir, sw.run, sw.hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{sw.hash}-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(sw.model_dump_json())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> Sweep:
    return Sweep.model_validate_json(Path(path).read_text())


def list_sweeps(cache_dir: str | Path, run: str) -> list[dict]:
    """Returns the run's sweeps, newest first: hash, pairs, kinds, cells, verified cells, when."""
    root = Path(cache_dir) / SWEEPS / run.removesuffix(".zarr")
    out = []
    for path in root.glob("*.json") if root.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        status = data["cells"]["status"]
        out.append({"hash": data["hash"], "pairs": len(data["pairs"]), "kinds": ",".join(data["kinds"]),
                    "cells": len(status), "verified": sum(s == "verified" for s in status),
                    "finished": data["provenance"].get("finished", ""), "device": data["provenance"].get("device", ""),
                    "path": str(path)})
    return sorted(out, key=lambda r: r["finished"], reverse=True)


def summary(sw: Sweep, n: int = 8) -> str:
    """Returns a short text summary: per kind the n cells of largest |estimate| (with exact
    effects where verified) and the verification statistics."""
    df = sw.frame()
    lines = [f"sweep {sw.hash} of {sw.run}: {len(sw.pairs)} pairs, {len(df)} cells "
             f"({int((df['status'] == 'verified').sum())} verified), {sw.provenance.get('seconds_sweep')} s"]
    for kind in sw.kinds:
        part = df[df["kind"] == kind]
        top = part.reindex(part["estimate"].abs().sort_values(ascending=False).index)[:n]
        lines.append(f"\n{kind}: top {len(top)} by |estimate|")
        lines.append(top[["label", "estimate", "atp", "normalized", "status", "exact"]].to_string(
            index=False, float_format=lambda v: f"{v:.4g}"))
        v = (sw.verification or {}).get("kinds", {}).get(kind)
        if v:
            lines.append(verification_line(v))
        elif kind not in EXACT_KINDS:
            lines.append("estimated only: the executor does not patch queries or keys")
    return "\n".join(lines)


def verification_line(v: dict[str, Any]) -> str:
    """Returns one kind's verification statistics as one line."""
    f = lambda x, spec: "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)  # noqa: E731
    return (f"verified {v['n_verified']} cells: recall@{v['k']} {f(v['recall_at_k'], '.2f')}, Spearman "
            f"{f(v['spearman'], '.3f')}, sign agreement on the top {v['k']} {f(v['sign_agreement_top_k'], '.2f')}, "
            f"largest effect missed {f(v['max_missed'], '.4g')} ({v['max_missed_cell'] or 'none'}) of largest "
            f"{f(v['max_exact'], '.4g')}")
