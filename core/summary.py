"""Per-seed summaries of the activations that the app reads for every seed at once.

Each is a documented function of the stored activations of that seed (so it can be
recomputed from the store), kept in `summary/` because reading the activations of
every seed takes seconds: `final_resid [L+1, d]` the residual stream at the final
position (probes), `mlp_norm [L, P]` the MLP output's L2 norm at the stored positions,
`head_scores [4, L, H]` (`core.heads.head_scores`).
"""

import numpy as np

from core.heads import head_scores
from core.prompts import Prompt


def seed_summary(acts: dict[str, np.ndarray], prompt: Prompt) -> dict[str, np.ndarray]:
    """Returns one seed's summaries from its stored activations (`acts/` arrays of that seed)."""
    rows = acts["attn_rows"][..., : len(prompt.tokens)]
    return {
        "final_resid": acts["resid"][:, -1].astype(np.float32),
        "mlp_norm": np.linalg.norm(acts["mlp_out"].astype(np.float32), axis=-1),
        "head_scores": head_scores(rows, prompt.answer_slots, prompt.tokens, prompt.x_spans, prompt.y_spans),
    }
