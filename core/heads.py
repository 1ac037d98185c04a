"""Per-head attention scores, from the attention rows of the stored positions.

Computed by the builder for every seed (the app would otherwise read every seed's
attention rows, about 1 GB, to rank the heads) and kept in `summary/head_scores`.
"""

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

HEAD_SCORES = ("answer_values", "feature_values", "previous_token", "induction")
HEAD_SCORE_DOC = {
    "answer_values": "attention of the final position to the in-context answer values (y), summed",
    "feature_values": "attention of the final position to every feature value (x, the query's too), summed",
    "previous_token": "attention of each stored position to the token before it, mean over stored positions",
    "induction": "attention of each stored position to the tokens that followed earlier occurrences of its "
                 "own token, summed over them, mean over stored positions that have one",
}


def value_tokens(spans: Int[np.ndarray, "... 2"]) -> Int[np.ndarray, " n"]:
    """Returns the token positions of the values in `spans`, without the space before each."""
    flat = spans.reshape(-1, 2)
    return np.concatenate([np.arange(a + 1 if b - a > 1 else a, b) for a, b in flat])


def head_scores(rows: Float[Tensor, "L H P T"], positions: Int[np.ndarray, " P"], tokens: Int[np.ndarray, " T"],
                x_spans: Int[np.ndarray, "n1 f 2"], y_spans: Int[np.ndarray, "n 2"]) -> Float[Tensor, "4 L H"]:
    """Returns the `HEAD_SCORES` of every head of one seed, in that order, in float32 on the rows' device.

    Only the attention weights each score reads are gathered and widened, so a batch of
    float16 rows on a GPU is scored in place, without a float32 copy of them.
    """
    def at(index: np.ndarray) -> Tensor:
        return torch.as_tensor(index, dtype=torch.long, device=rows.device)

    final = rows[:, :, -1]  # [L, H, T]
    answer = final[..., at(value_tokens(y_spans))].float().sum(-1)
    feature = final[..., at(value_tokens(x_spans))].float().sum(-1)
    previous = rows[:, :, at(np.arange(len(positions))), at(positions - 1)].float().mean(-1)
    follows = [(p, np.nonzero(tokens[:pos] == tokens[pos])[0] + 1) for p, pos in enumerate(positions)]
    follows = [(np.full(len(f), p), f) for p, f in follows if len(f)]
    if follows:
        p_idx, t_idx = (np.concatenate(part) for part in zip(*follows))
        induction = rows[:, :, at(p_idx), at(t_idx)].float().sum(-1) / len(follows)
    else:
        induction = torch.zeros(rows.shape[:2], dtype=torch.float32, device=rows.device)
    return torch.stack([answer, feature, previous, induction])
