"""The candidates' teacher-forced pass: one forward pass over every node of each seed's
trie of candidate answers (`core.candidates`), reusing the prompt's KV cache."""

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformers import DynamicCache

from core.candidates import SeedCandidates, Trie
from core.models import LoadedModel


def tree_mask(tries: list[Trie], key_mask: Int[Tensor, "b T"], width: int) -> Bool[Tensor, "b 1 N TN"]:
    """Returns the boolean attention mask of the tree pass: prompt keys, then ancestors-or-self."""
    b, t = key_mask.shape
    mask = torch.zeros((b, 1, width, t + width), dtype=torch.bool)
    mask[:, 0, :, :t] = key_mask[:, None, :].bool()
    for i, trie in enumerate(tries):
        for n in range(width):
            a = n if n < len(trie.parent) else -1
            mask[i, 0, n, t + n] = True
            while a > 0:
                a = trie.parent[a]
                mask[i, 0, n, t + a] = True
    return mask


@dataclass
class TreeActs:
    """Activations (float32) at each trie's branching nodes [b, B, ...], and the final-normed
    hidden state at every node [b, N, d] (the model's dtype)."""

    resid: Float[Tensor, "b B Lp1 d"]
    z: Float[Tensor, "b B L H dh"]
    mlp: Float[Tensor, "b B L d"]
    normed: Float[Tensor, "b N d"]


def _tree_forward(model: LoadedModel, tries: list[Trie], cache: DynamicCache, key_mask: Int[Tensor, "b T"],
                  last_pos: Int[Tensor, " b"]) -> TreeActs:
    hf = model.hf_model
    layers = list(hf.model.layers)
    n_heads = int(hf.config.num_attention_heads)
    width = max(len(t.node_token) for t in tries)
    ids = torch.zeros((len(tries), width), dtype=torch.long)
    pos = torch.zeros((len(tries), width), dtype=torch.long)
    for i, trie in enumerate(tries):
        ids[i, : len(trie.node_token)] = torch.as_tensor(trie.node_token)
        pos[i, : len(trie.node_token)] = torch.as_tensor(trie.depth)
    pos += last_pos.cpu()[:, None]
    mask = tree_mask(tries, key_mask[:, :-1].cpu(), width)
    dev = model.device
    # Only the branching nodes' activations are kept: the others are never a place
    # where two candidates part.
    n_branch = max(1, max(len(t.branches) for t in tries))
    at = torch.zeros((len(tries), n_branch), dtype=torch.long)
    for i, trie in enumerate(tries):
        at[i, : len(trie.branches)] = torch.as_tensor(trie.branches, dtype=torch.long)
    at, rows = at.to(dev), torch.arange(len(tries), device=dev)[:, None]
    got: dict[str, list] = {"resid": [None] * (len(layers) + 1), "z": [None] * len(layers), "mlp": [None] * len(layers)}

    def keep(kind, i, value):
        got[kind][i] = value[rows, at].float()

    handles = []
    for i, layer in enumerate(layers):
        handles += [
            layer.register_forward_pre_hook(
                lambda m, a, k, i=i: keep("resid", i, a[0] if a else k["hidden_states"]), with_kwargs=True),
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, i=i: keep("z", i, a[0].unflatten(-1, (n_heads, -1)))),
            layer.mlp.register_forward_hook(lambda m, a, r, i=i: keep("mlp", i, r)),
        ]
    handles.append(layers[-1].register_forward_hook(
        lambda m, a, r: keep("resid", len(layers), r[0] if isinstance(r, tuple) else r)))
    try:
        out = hf.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                       past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return TreeActs(resid=torch.stack(got["resid"], 2), z=torch.stack(got["z"], 2), mlp=torch.stack(got["mlp"], 2),
                    normed=out.last_hidden_state)


@torch.inference_mode()
def teacher_force(model: LoadedModel, tries: list[Trie], cache: DynamicCache, key_mask: Int[Tensor, "b T"],
                  n_steps: int, n_edges: int) -> list[SeedCandidates]:
    """Runs the tree pass for a batch whose prompts fill `cache` (left-padded, mask
    `key_mask`); returns each seed's candidate arrays.

    The cache may hold decoded tokens too: it is cut back to the prompt without its
    last token, which the tree pass feeds again as the root.
    """
    hf = model.hf_model
    if any(layer.self_attn.o_proj.bias is not None for layer in hf.model.layers):
        # The heads' attributions would not add up to the attention output.
        raise NotImplementedError(f"{model.spec}: attention output biases are not attributed to heads")
    cache.crop(-(cache.get_seq_length() - (key_mask.shape[1] - 1)))
    last_pos = key_mask.sum(-1) - 1
    acts = _tree_forward(model, tries, cache, key_mask, last_pos)
    eps = float(hf.model.norm.variance_epsilon)
    n_heads = int(hf.config.num_attention_heads)
    # Every seed's edges at once: the row of its branching node in `acts`, and its token.
    seed_of, node_of, token_of = [], [], []
    for i, trie in enumerate(tries):
        if len(trie.edges) > n_edges:
            raise RuntimeError(f"{len(trie.edges)} edges exceed the {n_edges} the store holds")
        branch = {n: j for j, n in enumerate(trie.branches)}
        for n, t in trie.edges:
            seed_of.append(i)
            node_of.append(branch[n])
            token_of.append(t)
    at = tuple(torch.as_tensor(x, dtype=torch.long, device=acts.resid.device) for x in (seed_of, node_of))
    w_u = hf.lm_head.weight
    u = w_u[torch.as_tensor(token_of, dtype=torch.long, device=w_u.device)].float() * hf.model.norm.weight.float()
    resid, z = acts.resid[at], acts.z[at]  # [E, L+1, d], [E, L, H, dh]
    rms = torch.sqrt(resid.pow(2).mean(-1) + eps)
    embed = torch.einsum("ed,ed->e", resid[:, 0], u)
    mlp = torch.einsum("eld,ed->el", acts.mlp[at], u)
    # Head h adds z_h . (W_O[:, h]^T u): one product with each layer's W_O, no copy of them all.
    heads = torch.stack([(z[:, l] * (u @ layer.self_attn.o_proj.weight.float()).unflatten(-1, (n_heads, -1))).sum(-1)
                         for l, layer in enumerate(hf.model.layers)], 1)  # [E, L, H]
    out, first = [], 0
    for i, trie in enumerate(tries):
        # One seed's nodes at a time, unembedded in float32 (`LoadedModel.logprobs`).
        logp = model.logprobs(acts.normed[i])
        c = len(trie.tokens)
        tokens = np.full((c, n_steps), -1, dtype=np.int32)
        logprob = np.full((c, n_steps), np.nan, dtype=np.float32)
        edge = np.full((c, n_steps), -1, dtype=np.int32)
        index = {e: j for j, e in enumerate(trie.edges)}
        for k, (seq, steps) in enumerate(zip(trie.tokens, trie.step_node)):
            if not seq or len(seq) > n_steps:
                continue
            tokens[k, : len(seq)] = seq
            node, tok = torch.as_tensor(steps), torch.as_tensor(seq)
            logprob[k, : len(seq)] = logp[node, tok].float().cpu().numpy()
            edge[k, : len(seq)] = [index.get((n, t), -1) for n, t in zip(steps, seq)]
        mine = slice(first, first + len(trie.edges))
        first = mine.stop
        out.append(SeedCandidates(tokens=tokens, logprob=logprob, edge=edge, rms=_pad(rms[mine], n_edges),
                                  dla_embed=_pad(embed[mine], n_edges), dla_heads=_pad(heads[mine], n_edges),
                                  dla_mlp=_pad(mlp[mine], n_edges)))
    return out


def _pad(x: Tensor, n: int) -> np.ndarray:
    full = np.full((n, *x.shape[1:]), np.nan, dtype=np.float32)
    full[: x.shape[0]] = x.cpu().numpy()
    return full
