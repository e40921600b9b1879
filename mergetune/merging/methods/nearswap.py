"""NearSwap (alchemonaut 2024, "QuartetAnemoi-70B-t0.0001" model card; mergekit's ``nearswap``).

Takes the expert's value where it is near the base's and keeps the base where they are far apart,
entry by entry, with a softness t per layer group (λ of the single expert):

    w = clamp(t / max(|θ_1 − θ_0|, 1e-6), 0, 1),   θ = w θ_1 + (1 − w) θ_0 = θ_0 + w τ_1,

so entries that moved by at most t take the expert's value, larger moves only t of it (a step of
length t towards the expert). t = 0 is the base. Defined on the base and exactly one expert.
"""

from __future__ import annotations

import torch

from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import shared_t_spec
from mergetune.merging.methods.base import ChunkMethod, Prepared, WarmStart
from mergetune.merging.methods.model_space import require_nonnegative

MIN_DISTANCE = 1e-6  # mergekit's floor on |θ_1 − θ_0|


def near_swap(tau: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Δ = clamp(t / max(|τ|, 1e-6), 0, 1) τ on a chunk of the single expert's task vector."""
    (tau_1,), (t_1,) = tau.unbind(0), t.unbind(0)
    return (t_1 / tau_1.abs().clamp(min=MIN_DISTANCE)).clamp(0, 1) * tau_1


class NearSwap(ChunkMethod):
    name = "nearswap"
    citation = "alchemonaut 2024, QuartetAnemoi-70B-t0.0001 (mergekit's nearswap)"
    kernel = staticmethod(near_swap)
    experts = (1, 1)  # the base and one other model
    # t is a distance in weight units: fine-tunes move entries by 1e-4 to 1e-2
    search_weight = (0.0, 0.01)
    warm_start = WarmStart(weight=0.0001, density=1.0)  # the t of the model it was introduced with
    mergekit = shared_t_spec("nearswap")

    def validate(self, ctx: MergeContext) -> None:
        require_nonnegative(ctx, self.name, "the distance t up to which the expert's value is taken")

    def prepare(self, ctx: MergeContext) -> Prepared:
        return Prepared(row_args={"t": ctx.per_row(ctx.weight)})


METHODS = [NearSwap]
