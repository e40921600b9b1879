"""Twin-Merging (Lu et al., 2024, "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging").

A *dynamic* recipe: the merged model depends on the input. Its parts (see :mod:`mergetune.twin`):

1. shared knowledge θ* = the shared merge (any static method; the paper's is Task Arithmetic,
   θ* = θ_0 + λ Σ_t τ_t with λ = 0.3);
2. exclusive knowledge v_t = θ_t − θ*, compressed per 2-D tensor by truncated SVD
   (v_t ≈ U_t S_t V_tᵀ, rank = ``rank_fraction`` · min(m, n) or a fixed ``rank``); 1-D tensors kept
   dense or dropped (``one_d``);
3. a router: a small MLP on the mean-pooled last hidden state of θ* predicting the task of an input;
4. per input x: w = softmax(router(x) / temperature) (optionally over the ``top_k`` largest logits
   only), θ(x) = θ* + Σ_t w_t v_t.

In a recipe, ``method: twin`` and the recipe's ``weight``, ``density``, ``grouping`` and ``seed`` are
those of the shared merge; ``options`` name the shared method (with its own options), the
compression, the routing and the router's training. This module registers the method so recipes
validate strictly and the search space can tune it like any other; ``Merger.merge`` refuses it
(one static set of weights cannot hold a routed model): build it with :func:`mergetune.twin.build_twin`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from mergetune.errors import RecipeError
from mergetune.merging.context import MergeContext
from mergetune.merging.mergekit_spec import MergekitRefusal
from mergetune.merging.methods.base import MergeMethod, MethodOptions, WarmStart
from mergetune.merging.methods.registry import get_method
from mergetune.recipe import Recipe

TWIN = "twin"
DEFAULT_SHARED = "task_arithmetic"


class TwinOptions(MethodOptions):
    """Options of a Twin recipe (its weight/density/grouping/seed belong to the shared merge)."""

    shared_method: str = Field(DEFAULT_SHARED, description="Static method that builds θ* (the paper: TA).")
    shared_options: dict[str, Any] = Field({}, description="The shared method's own options.")
    rank_fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="SVD rank kept per matrix, as a fraction of min(m, n)."
    )
    rank: int | None = Field(
        None, ge=1, description="A fixed rank per matrix (capped at min(m, n)); overrides the fraction."
    )
    one_d: Literal["dense", "drop"] = Field(
        "dense", description="1-D tensors' exclusive knowledge: kept dense, or dropped."
    )
    temperature: float = Field(1.0, gt=0.0, description="w = softmax(router logits / temperature).")
    top_k: int | None = Field(None, ge=1, description="Route each input to its k most likely experts only (None: all).")
    router_hidden: int = Field(128, ge=1, description="Hidden units of the router MLP.")
    router_epochs: int = Field(30, ge=1)
    router_lr: float = Field(1e-3, gt=0.0)
    router_examples: int | None = Field(
        256, ge=1, description="Training examples per task the router is trained on (None: the whole training split)."
    )

    @field_validator("shared_method")
    @classmethod
    def _static_shared_method(cls, name: str) -> str:
        try:
            method = get_method(name)
        except RecipeError as exc:
            raise ValueError(str(exc)) from None
        if method.dynamic:
            raise ValueError(f"the shared merge must be a static method, not '{name}'")
        return name

    @field_validator("shared_options")
    @classmethod
    def _shared_method_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "shared_method" in info.data:  # absent when the shared method itself failed validation
            get_method(info.data["shared_method"]).Options.model_validate(options)
        return options


class TwinMethod(MergeMethod):
    """Registry entry of Twin-Merging: validates recipes, tells the search space what it uses."""

    name = TWIN
    Options = TwinOptions
    uses_density = True  # through its shared method (see density_used)
    dynamic = True
    needs_data = True  # its router is trained on each task's training split
    citation = "Lu et al. 2024, Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging"
    search_weight = (0.0, 1.0)  # the shared merge's λ (Task Arithmetic by default)
    warm_start = WarmStart(weight=0.3, density=1.0)  # λ of its shared merge (Twin-Merging's Task Arithmetic θ*)
    mergekit = MergekitRefusal(
        "Twin-Merging routes each input to a mix of experts: a routed model is not one set of weights"
    )

    def validate(self, ctx: MergeContext) -> None:
        raise RecipeError(
            "'twin' is a dynamic recipe (Twin-Merging): a routed model is not one set of weights, so it cannot "
            "be merged into a folder; build it with 'mergetune twin build RECIPE OUT_DIR'"
        )

    def density_used(self, option_spec: Mapping[str, Any]) -> bool:
        """Density matters only when a shared method that may be chosen uses it."""
        shared = option_spec.get("shared_method", DEFAULT_SHARED)
        names = shared if isinstance(shared, list) else [shared]
        return any(get_method(str(n)).uses_density for n in names)


def shared_recipe(recipe: Recipe) -> Recipe:
    """The static recipe of θ*: the Twin recipe's models, weight, density, grouping, dtype and seed."""
    if recipe.method != TWIN:
        raise RecipeError(f"expected a '{TWIN}' recipe, got method '{recipe.method}'")
    options = twin_options(recipe)
    data = recipe.to_dict() | {"method": options.shared_method, "options": options.shared_options}
    return Recipe.model_validate(data)


def twin_options(recipe: Recipe) -> TwinOptions:
    return TwinOptions.model_validate(recipe.options)


METHODS = (TwinMethod,)
