"""Per-seed summaries of the activations that the app reads for every seed at once.

Each is a documented function of the stored activations of that seed (so it can be
recomputed from the store), kept in `summary/` because reading the activations of
every seed takes seconds: `final_resid [L+1, d]` the residual stream at the final
position (probes), `mlp_norm [L, P]` the MLP output's L2 norm at the stored positions,
`head_scores [4, L, H]` (`core.heads.head_scores`).
"""

import torch
from torch import Tensor

from core.heads import head_scores
from core.prompts import Prompt


def seed_summary(acts: dict[str, Tensor], prompt: Prompt) -> dict[str, Tensor]:
    """Returns one seed's summaries, float32 on the activations' device.

    `acts`: that seed's activations in the store's dtypes: its `acts/` arrays as stored
    (`torch.from_numpy`), or the builder's batch row on the model's device before the copy.
    """
    rows = acts["attn_rows"][..., : len(prompt.tokens)]
    return {
        "final_resid": acts["resid"][:, -1].float(),
        "mlp_norm": torch.linalg.vector_norm(acts["mlp_out"].float(), dim=-1),
        "head_scores": head_scores(rows, prompt.answer_slots, prompt.tokens, prompt.x_spans, prompt.y_spans),
    }
