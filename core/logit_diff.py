"""Logit difference between two candidate answers, by layer and by component.

For a pair (a, b) of candidates (`truth`, `model` or a regressor) and each seed, with
that seed's own answers: the first token where a's and b's tokens differ is step k;
the model, teacher-forced with their shared prefix, predicts that token at one trie
node (`core.candidates`). There:
- `lens[l]` = logit(a_k) - logit(b_k) of the logit lens on the residual stream before
  layer l (l = L: after the last layer, the model's real logits), with the model's own
  final RMSNorm applied to that residual;
- `embed`, `attn[l]`, `mlp[l]`, `heads[l, h]`: each component's direct contribution to
  the final difference (its output through the final norm's frozen scale and W_U);
  they sum to `lens[L]`;
- `answer_logprob`: log p(a) - log p(b) of the whole answers at the last layer.
"""

from dataclasses import dataclass, fields

import numpy as np
from jaxtyping import Float, Int

from core.candidates import SeedCandidates
from core.store import RunStore


@dataclass
class Candidates:
    """A store's `candidates/` arrays for its finished seeds, loaded once."""

    names: list[str]
    rows: Int[np.ndarray, " s"]  # rows of the store
    seeds: Int[np.ndarray, " s"]
    tokens: Int[np.ndarray, "s C K"]
    logprob: Float[np.ndarray, "s C K"]
    edge: Int[np.ndarray, "s C K"]
    rms: Float[np.ndarray, "s E Lp1"]
    dla_embed: Float[np.ndarray, "s E"]
    dla_heads: Float[np.ndarray, "s E L H"]
    dla_mlp: Float[np.ndarray, "s E L"]

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"no candidate {name!r}; the store has {', '.join(self.names)}")
        return self.names.index(name)


def load_candidates(store: RunStore) -> Candidates:
    """Returns the candidates of the store's finished seeds."""
    g = store.root["candidates"]
    rows = np.nonzero(store.done())[0]
    read = {f.name: g[f.name][:][rows] for f in fields(SeedCandidates)}  # the arrays the builder writes
    return Candidates(names=list(g.attrs["names"]), rows=rows, seeds=np.asarray(store.seeds)[rows], **read)


@dataclass
class PairDiff:
    """logit(a) - logit(b) per seed (NaN where `status` is not "ok"); see the module docstring."""

    a: str
    b: str
    seeds: Int[np.ndarray, " s"]
    status: list[str]  # ok | a has no answer | b has no answer | same answer | one is a prefix
    step: Int[np.ndarray, " s"]  # first differing token (-1 where none)
    token_a: Int[np.ndarray, " s"]
    token_b: Int[np.ndarray, " s"]
    lens: Float[np.ndarray, "s Lp1"]
    embed: Float[np.ndarray, " s"]
    attn: Float[np.ndarray, "s L"]
    mlp: Float[np.ndarray, "s L"]
    heads: Float[np.ndarray, "s L H"]
    answer_logprob: Float[np.ndarray, " s"]

    @property
    def ok(self) -> np.ndarray:
        return np.array([s == "ok" for s in self.status], dtype=bool)


def pair_logit_diff(c: Candidates, a: str, b: str, subset: np.ndarray | None = None) -> PairDiff:
    """Returns the logit difference of candidates a and b for every seed of `c`
    (or the boolean `subset` of them)."""
    keep = np.ones(len(c.seeds), bool) if subset is None else np.asarray(subset, bool)
    ia, ib = c.index(a), c.index(b)
    ta, tb = c.tokens[keep, ia], c.tokens[keep, ib]
    n = len(ta)
    has_a, has_b = ta[:, 0] >= 0, tb[:, 0] >= 0
    differ = ta != tb
    step = np.where(differ.any(1), differ.argmax(1), -1)
    rows = np.arange(n)
    k = np.maximum(step, 0)
    tok_a, tok_b = ta[rows, k], tb[rows, k]
    ok = has_a & has_b & (step >= 0) & (tok_a >= 0) & (tok_b >= 0)
    status = np.select([~has_a, ~has_b, step < 0, ~ok], ["a has no answer", "b has no answer", "same answer",
                                                         "one is a prefix"], "ok").tolist()
    ea, eb = c.edge[keep, ia][rows, k], c.edge[keep, ib][rows, k]
    ea, eb = np.where(ok, ea, 0), np.where(ok, eb, 0)
    pick = lambda x: np.where(ok.reshape(-1, *[1] * (x.ndim - 2)),  # noqa: E731
                              x[rows, ea] - x[rows, eb], np.nan)
    rms = c.rms[keep][rows, ea]
    embed, heads, mlp = pick(c.dla_embed[keep]), pick(c.dla_heads[keep]), pick(c.dla_mlp[keep])
    attn = heads.sum(-1)
    accumulated = embed[:, None] + np.concatenate([np.zeros((n, 1)), np.cumsum(attn + mlp, 1)], 1)
    final = rms[:, -1:]
    lp = c.logprob[keep]
    full = np.where(has_a & has_b, np.nansum(lp[:, ia], 1) - np.nansum(lp[:, ib], 1), np.nan)
    return PairDiff(a=a, b=b, seeds=c.seeds[keep], status=status, step=np.where(ok, step, -1),
                    token_a=np.where(ok, tok_a, -1), token_b=np.where(ok, tok_b, -1),
                    lens=np.where(ok[:, None], accumulated / rms, np.nan),
                    embed=embed / final[:, 0], attn=attn / final, mlp=mlp / final,
                    heads=heads / final[:, :, None], answer_logprob=full)
