"""Activation capture at chosen token positions, inside the prefill forward pass.

Plain PyTorch hooks on a Llama-family Hugging Face model (`model.layers[i]` with
`.self_attn.{q_proj,o_proj}` and `.mlp`), so the prefill keeps running SDPA.
Activations equal the raw model's and the TransformerLens bridge's without
compatibility mode (LayerNorm not folded); the tests check both.

Only the stored positions are copied out of each hook: nothing of size
[batch, T, d_model] outlives the layer that made it. Attention rows of the stored
positions are recomputed from their rotated queries and the keys the prefill wrote
into the KV cache, `softmax(q k^T * scale + causal/padding mask)` in float32 (kept as
float16): what eager attention computes, at P/T of its cost.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv



@dataclass
class Captured:
    """One batch's activations on the model's device: the model's dtype, attention rows float16."""

    resid: Float[Tensor, "b Lp1 P d"]
    attn_out: Float[Tensor, "b L P d"]
    mlp_out: Float[Tensor, "b L P d"]
    head_out: Float[Tensor, "b L H d"]
    attn_rows: Float[Tensor, "b L H P T"]


class Recorder:
    """Records one forward pass's activations at given positions of each sequence."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.layers = list(hf_model.model.layers)
        cfg = hf_model.config
        self.d_model = int(cfg.hidden_size)
        self.dtype = next(hf_model.parameters()).dtype
        self.n_heads = int(cfg.num_attention_heads)
        self.d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)

    @contextmanager
    def record(self, positions: Int[Tensor, "b P"], key_mask: Int[Tensor, "b T"]):
        """Yields a dict; after the forward pass inside the block, its "out" is a `Captured`.

        `positions` index the (left-padded) batch; the last column is the final position,
        where per-head outputs are taken. `key_mask` is the batch's attention mask.
        """
        b, p = positions.shape
        n_layers = len(self.layers)
        rows = torch.arange(b, device=positions.device)[:, None]
        final = positions[:, -1]
        t = key_mask.shape[1]
        allowed = (torch.arange(t, device=positions.device)[None, None, :] <= positions[:, :, None]) \
            & key_mask[:, None, :].bool()  # [b, P, T]
        # Every output is allocated before the forward pass and filled layer by layer, so
        # no capture is held twice. Probabilities fit float16, what the store keeps.
        new = lambda *shape, dtype=self.dtype: torch.empty(shape, dtype=dtype, device=positions.device)  # noqa: E731
        out = Captured(resid=new(b, n_layers + 1, p, self.d_model), attn_out=new(b, n_layers, p, self.d_model),
                       mlp_out=new(b, n_layers, p, self.d_model), head_out=new(b, n_layers, self.n_heads, self.d_model),
                       attn_rows=new(b, n_layers, self.n_heads, p, t, dtype=torch.float16))
        ran: set[int] = set()
        rope: dict[int, tuple[Tensor, Tensor]] = {}
        queries: dict[int, Tensor] = {}

        def layer_pre(i):
            def hook(mod, args, kwargs):
                out.resid[:, i] = (args[0] if args else kwargs["hidden_states"])[rows, positions]
            return hook

        def attn_pre(i):
            def hook(mod, args, kwargs):
                cos, sin = kwargs["position_embeddings"]
                rope[i] = (cos.expand(b, -1, -1)[rows, positions], sin.expand(b, -1, -1)[rows, positions])
            return hook

        def q_out(i):
            def hook(mod, args, result):
                q = result[rows, positions].view(b, p, self.n_heads, self.d_head).transpose(1, 2)
                cos, sin = rope[i]
                queries[i] = apply_rotary_pos_emb(q, q, cos, sin)[0]  # [b, H, P, d_head]
            return hook

        def o_pre(i):
            def hook(mod, args):
                z = args[0][rows[:, 0], final].view(b, self.n_heads, self.d_head)
                w = mod.weight.view(mod.weight.shape[0], self.n_heads, self.d_head)
                out.head_out[:, i] = torch.einsum("bhk,dhk->bhd", z, w)
            return hook

        def attn_out(i, scaling):
            def hook(mod, args, kwargs, result):
                out.attn_out[:, i] = result[0][rows, positions]
                keys = kwargs["past_key_values"].layers[i].keys  # rotated, [b, kv, T, d_head]
                keys = repeat_kv(keys, self.n_heads // keys.shape[1])
                scores = torch.matmul(queries.pop(i).float(), keys.float().transpose(-1, -2)) * scaling
                scores = scores.masked_fill(~allowed[:, None], float("-inf"))
                out.attn_rows[:, i] = torch.softmax(scores, dim=-1)
            return hook

        def mlp_out(i):
            def hook(mod, args, result):
                out.mlp_out[:, i] = result[rows, positions]
                ran.add(i)
            return hook

        def last_out(mod, args, result):
            out.resid[:, n_layers] = (result[0] if isinstance(result, tuple) else result)[rows, positions]

        handles = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            handles += [
                layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True),
                attn.register_forward_pre_hook(attn_pre(i), with_kwargs=True),
                attn.q_proj.register_forward_hook(q_out(i)),
                attn.o_proj.register_forward_pre_hook(o_pre(i)),
                attn.register_forward_hook(attn_out(i, attn.scaling), with_kwargs=True),
                layer.mlp.register_forward_hook(mlp_out(i)),
            ]
        handles.append(self.layers[-1].register_forward_hook(last_out))
        box: dict = {}
        try:
            yield box
        finally:
            for h in handles:
                h.remove()
        if len(ran) == n_layers:
            box["out"] = out
