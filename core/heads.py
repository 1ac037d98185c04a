"""Per-head attention scores, from the attention rows of the stored positions.

Computed by the builder for every seed (the app would otherwise read every seed's
attention rows, about 1 GB, to rank the heads) and kept in `summary/head_scores`.
"""

import numpy as np
from jaxtyping import Float, Int

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


def head_scores(rows: Float[np.ndarray, "L H P T"], positions: Int[np.ndarray, " P"], tokens: Int[np.ndarray, " T"],
                x_spans: Int[np.ndarray, "n1 f 2"], y_spans: Int[np.ndarray, "n 2"]) -> Float[np.ndarray, "4 L H"]:
    """Returns the `HEAD_SCORES` of every head of one seed, in that order."""
    rows = rows.astype(np.float32)
    final = rows[:, :, -1]  # [L, H, T]
    answer = final[..., value_tokens(y_spans)].sum(-1)
    feature = final[..., value_tokens(x_spans)].sum(-1)
    p_idx = np.arange(len(positions))
    previous = rows[:, :, p_idx, positions - 1].mean(-1)
    induction, counted = np.zeros(rows.shape[:2], dtype=np.float32), 0
    for p, pos in enumerate(positions):
        follow = np.nonzero(tokens[:pos] == tokens[pos])[0] + 1
        if len(follow):
            induction += rows[:, :, p, follow].sum(-1)
            counted += 1
    return np.stack([answer, feature, previous, induction / max(counted, 1)])
