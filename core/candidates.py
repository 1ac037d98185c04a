"""Candidate answers under teacher forcing: their log-probabilities, and what each
layer, head and MLP adds to the logit of every token where two candidates part.

A seed's candidates are the truth, the model's own answer and every regressor's
prediction, each written in the run's number format and tokenized. Their token
sequences form a trie rooted at the prompt's final token. One forward pass over all
trie nodes at once (tree attention: a node sees the prompt and its own ancestors, at
the position it has in its own sequence) gives, at every node, what the model would
compute had it been fed that prefix. The prompt is not run again: the pass reuses the
prefill's KV cache (`core.teacher_forcing`).

Stored per seed (group `candidates/` of the run store):
- `tokens [C, K]` each candidate's answer tokens (-1 after its end; all -1 when the
  candidate is NaN or longer than K), `logprob [C, K]` log p(token k | prompt, tokens < k).
- edges: a trie node with two or more children is where candidates part; each of its
  (node, child token) edges gets an index, and `edge [C, K]` says which edge step k of
  candidate c takes (-1 where its node has one child). Per edge: `rms [E, L+1]` the
  root mean square (with eps) of the residual stream at the node before each layer and
  after the last; `dla_embed [E]`, `dla_heads [E, L, H]`, `dla_mlp [E, L]` each
  component's output dotted with `norm_weight * W_U[:, token]`, not yet divided by rms.
The logit lens at layer l is the sum of the components before l divided by `rms[l]`;
the direct logit attribution of a component divides by `rms[L]` (the final norm's
scale, frozen). Llama's residual stream is exactly the sum of these components.
"""

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int

from core.prompts import NumberFormat, number_text

TRUTH = "truth"


@dataclass
class Trie:
    """One seed's candidates as a trie: node 0 is the prompt's final token."""

    tokens: list[list[int]]  # per candidate ([] when absent)
    node_token: list[int]  # token fed at each node (node 0: the prompt's last token)
    parent: list[int]  # -1 for the root
    step_node: list[list[int]]  # per candidate: the node predicting each of its tokens
    edges: list[tuple[int, int]]  # (node, child token) out of nodes with several children

    @property
    def branches(self) -> list[int]:
        """Returns the nodes where candidates part (two or more children), in order."""
        return sorted({n for n, _ in self.edges})

    @property
    def depth(self) -> list[int]:
        out = [0] * len(self.parent)
        for n in range(1, len(self.parent)):
            out[n] = out[self.parent[n]] + 1
        return out


def candidate_texts(y_true: float, model_text: str, regressor_values: list[float], fmt: NumberFormat,
                    y_column: int) -> list[str | None]:
    """Returns the answer texts of the truth, the model and each regressor (None: no answer).

    The model's is the number it wrote, as written; the others are written in the
    run's number format.
    """
    def write(v: float) -> str | None:
        return fmt.write(float(v), y_column) if np.isfinite(v) else None
    return [write(y_true), number_text(model_text), *map(write, regressor_values)]


def build_trie(root_token: int, answers: list[list[int] | None]) -> Trie:
    """Returns the trie of the candidates' token sequences under the prompt's last token."""
    node_token, parent, children = [root_token], [-1], [{}]
    tokens, step_node = [], []
    for seq in answers:
        seq = seq or []
        tokens.append(list(seq))
        steps, node = [], 0
        for tok in seq:
            steps.append(node)
            if tok not in children[node]:
                children[node][tok] = len(node_token)
                node_token.append(tok)
                parent.append(node)
                children.append({})
            node = children[node][tok]
        step_node.append(steps)
    edges = [(n, tok) for n, kids in enumerate(children) if len(kids) > 1 for tok in kids]
    return Trie(tokens, node_token, parent, step_node, edges)


@dataclass
class SeedCandidates:
    """What the store keeps for one seed (see the module docstring)."""

    tokens: Int[np.ndarray, "C K"]
    logprob: Float[np.ndarray, "C K"]
    edge: Int[np.ndarray, "C K"]
    rms: Float[np.ndarray, "E Lp1"]
    dla_embed: Float[np.ndarray, " E"]
    dla_heads: Float[np.ndarray, "E L H"]
    dla_mlp: Float[np.ndarray, "E L"]
