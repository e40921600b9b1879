"""The merge-method interface.

A method is a pure function of the task vectors and the candidate's parameters. To be fast it is
split in two:

- ``prepare(ctx)`` turns the candidate (weights λ[t, g], densities d[t, g], options, seed) into
  small per-row tensors (``[T or 1, n_rows]``: coefficients, thresholds looked up in precomputed
  order statistics, random keys) and names any precomputed per-entry tensors it needs
  (``[T, D]``, e.g. PCB's scores); nothing here streams over the weights;
- ``kernel(tau, base, **args)`` is a pure tensor function on one chunk of whole rows: ``tau`` is
  ``[T, R, L]``, ``base`` ``[R, L]``, per-row arguments arrive as ``[T or 1, R, 1]`` and per-entry
  ones as ``[T, R, L]``; it returns the merged chunk ``[R, L]``. The engine runs it eagerly or
  through ``torch.compile`` (one fused pass over the chunk).

Rules that keep kernels compilable and reproducible: every candidate-dependent number is a tensor
argument (a Python float would be baked into the compiled graph and force a recompile); only
structural options (strings, booleans) go in ``static``; no randomness but the counter-based hash
in ``ops.uniform`` (the same bits on any device, chunking or backend).

Methods that need a whole matrix at once (TSV-M's SVDs) subclass ``TensorMethod`` instead.

Everything the rest of mergetune needs to know about a method is declared on its class, so that
adding a method touches its module and the registry's list only: its options (``Options``), where
its λ and density are worth searching (``search_weight``, ``search_density``), its paper's default
recipe (``warm_start``), and how mergekit runs it or why it cannot (``mergekit``, see
``mergekit_spec.py``). The search space, the search loop, the exporter and the importer read these.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mergetune.errors import RecipeError
from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import MergekitRefusal, MergekitSpec
from mergetune.strict import StrictModel


class MethodOptions(StrictModel):
    """Options of a method that are not per task and per group. Unknown keys are errors."""


@dataclass
class Prepared:
    """What one candidate needs, besides the resident task vectors."""

    row_args: dict[str, torch.Tensor] = field(default_factory=dict)  # [T or 1, n_rows]
    element_args: dict[str, torch.Tensor] = field(default_factory=dict)  # [T or 1, D]
    static: dict[str, Any] = field(default_factory=dict)  # structural options only


Range = tuple[float, float]


@dataclass(frozen=True)
class WarmStart:
    """The paper's default recipe (its untuned λ and density): what a search evaluates first."""

    weight: float = 1.0
    density: float = 0.5  # used only where the method (with these options) uses a density
    options: Mapping[str, Any] = field(default_factory=dict)


class MergeMethod(ABC):
    """Base of every method. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    uses_density: ClassVar[bool] = False
    random: ClassVar[bool] = False
    dynamic: ClassVar[bool] = False  # True: the merged weights depend on the input (Twin-Merging's router)
    needs_data: ClassVar[bool] = False  # True: the merge reads task data (a router; activation statistics: RegMean)
    citation: ClassVar[str] = ""
    # Where λ and density are meaningful (the papers' tuned grids); None: the search config's range.
    # A search config's per-method range overrides both.
    search_weight: ClassVar[Range | None] = None
    search_density: ClassVar[Range | None] = None
    warm_start: ClassVar[WarmStart] = WarmStart()
    mergekit: ClassVar[MergekitSpec | MergekitRefusal] = MergekitRefusal("no mergekit translation declared")
    # How many experts the method merges (min, max; None: no maximum): SLERP and its kin are defined on
    # the base and exactly one other model. ``check_recipe`` refuses other counts before any work.
    experts: ClassVar[tuple[int, int | None]] = (1, None)
    # Whether λ = 0 for every task gives the base. Not for methods whose λ is not a task-vector
    # coefficient (linear without normalisation, NuSLERP's interpolation ratio, passthrough's scale).
    zero_weight_is_base: ClassVar[bool] = True
    # Whether the method's own rule may leave a whole small tensor at the base at any λ (Arcee Fusion's
    # outlier cut can select no entry of a 4-entry tensor), which the contract tests then allow.
    may_keep_nothing: ClassVar[bool] = False

    def validate(self, ctx: MergeContext) -> None:  # noqa: B027 (optional hook)
        """Raise a RecipeError for parameter combinations the method cannot run."""

    def check_experts(self, count: int) -> None:
        """A RecipeError naming the method and ``count`` when it cannot merge that many experts."""
        low, high = self.experts
        if low <= count and (high is None or count <= high):
            return
        wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        raise RecipeError(
            f"{self.name} merges {wanted} expert(s) with the base, got {count}; "
            f"give the recipe {wanted} expert(s), or use a method defined on any number (e.g. task_arithmetic)"
        )

    def density_used(self, option_spec: Mapping[str, Any]) -> bool:
        """Whether recipes with these options (fixed values, or lists searched among) use ``density``."""
        return self.uses_density

    def linear_in_weight(self, options: MethodOptions) -> bool:
        """Whether, with these options, Δ = Σ_t Σ_g λ[t, g] u_t|g with u_t independent of λ.

        Then ∂Δ/∂λ[t, g] is the merge with λ = 1 for task t and 0 elsewhere, restricted to group g,
        and λ can be tuned by gradient descent through the merge (``search.gradient``). False unless
        a method proves it: masks chosen by λ-weighted sums, or weights normalised per group, are not.
        """
        return False


class ChunkMethod(MergeMethod):
    """A method that merges a chunk of whole rows at a time, entry by entry within each row."""

    @abstractmethod
    def prepare(self, ctx: MergeContext) -> Prepared: ...

    kernel: ClassVar[Callable[..., torch.Tensor]]


class TensorMethod(MergeMethod):
    """A method that needs a whole tensor at once (e.g. an SVD per matrix)."""

    @abstractmethod
    def merge_tensor(self, ctx: MergeContext, segment_index: int) -> torch.Tensor:
        """The merged delta Δ of one tensor, shaped like it (float32)."""
