"""LiNeS, a depth schedule of λ (Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting
and Enhances Model Merging", ICLR 2025; official code: github.com/wang-kee/LiNeS, ``LiNeS_scaling``).

The task vector of transformer block ℓ (ℓ = 0 … L−1, input side first) is scaled by

    λ_ℓ = α + β · ℓ / (L − 1),

so shallow blocks keep little of the fine-tuning (they hold general features) and deep ones more;
every tensor outside the blocks (embeddings, final norm, head) is scaled by α, as the official
code does. With one block (L = 1) every tensor gets α.

mergetune stores λ per layer group. At granularity 1 a group is one block and the schedule is the
paper's. A group that bundles blocks a … b (granularity > 1) takes the mean of its blocks' λ, which
is λ at its mean depth (a + b) / 2 (the schedule is linear): the closest one value per group can
come. A recipe holds the resulting per-group values, so it merges exactly what the search scored.

The paper sets α from the task vectors' norms for multi-task merging and searches β; here both are
searched (``space.weight.schedule: lines``, see ``mergetune.search.space``), per task or shared.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_BLOCK_GROUP = re.compile(r"^blocks\.(\d+)(?:-(\d+))?$")  # layer_groups' names: blocks.<i> or blocks.<a>-<b>


def group_depths(groups: Sequence[str]) -> np.ndarray:
    """Each group's depth ℓ/(L−1) in [0, 1]: its blocks' mean index over the last block's; 0 outside blocks.

    Outside the blocks (``embed``, ``head``) the depth is 0, so those groups get α, as in the paper.
    """
    spans = [_BLOCK_GROUP.match(g) for g in groups]
    bounds = [(int(m.group(1)), int(m.group(2) or m.group(1))) for m in spans if m is not None]
    last = max((b for _, b in bounds), default=0)
    depths = []
    for match in spans:
        if match is None or last == 0:
            depths.append(0.0)
        else:
            first, final = int(match.group(1)), int(match.group(2) or match.group(1))
            depths.append((first + final) / 2 / last)
    return np.asarray(depths, dtype=np.float64)


def lines_weights(alpha: float, beta: float, groups: Sequence[str]) -> np.ndarray:
    """λ per group: α + β · depth (``[G]`` float64)."""
    return alpha + beta * group_depths(groups)


def fit_lines(values: np.ndarray, groups: Sequence[str]) -> tuple[float, float]:
    """The (α, β) whose schedule is closest to per-group λ ``values`` (least squares; β = 0 without depth).

    Exact for values that are a LiNeS schedule; used to start a LiNeS search from another recipe.
    """
    depth = group_depths(groups)
    values = np.asarray(values, dtype=np.float64)
    if np.ptp(depth) == 0:
        return float(values.mean()), 0.0
    beta, alpha = np.polyfit(depth, values, 1)
    return float(alpha), float(beta)
