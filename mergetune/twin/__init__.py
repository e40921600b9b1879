"""Twin-Merging (Lu et al., 2024, "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging").

A dynamic merge: one shared model plus each expert's compressed exclusive knowledge, mixed per input
by a router.

- θ* = the shared merge of the experts (any static method; the paper's: Task Arithmetic, λ = 0.3);
- v_t = θ_t − θ*, per 2-D tensor v_t ≈ U_t S_t V_tᵀ (truncated SVD, rank r = 10% of min(m, n) by default);
- w(x) = softmax(router(h(x)) / T), h(x) the mean-pooled last hidden state of θ* (optionally top-k);
- θ(x) = θ* + Σ_t w_t(x) v_t, computed in batches as θ*·x + Σ_t w_t(x) U_t S_t V_tᵀ·x per layer.

Modules, one concern each: :mod:`.exclusive` (v_t and its SVD compression), :mod:`.router` (features,
training, routing weights), :mod:`.adapters` (the batched low-rank forward hooks), :mod:`.model`
(building a Twin and running it on task models), :mod:`.reference` (the naive per-example path),
:mod:`.io` (the Twin folder) and :mod:`.workflow` (what ``mergetune twin build|eval`` do). The recipe
side (``method: twin`` and its options) is :mod:`mergetune.merging.methods.twin`.
"""

from mergetune.twin.model import RoutedModel, Twin, TwinCache, build_twin

__all__ = ["RoutedModel", "Twin", "TwinCache", "build_twin"]
