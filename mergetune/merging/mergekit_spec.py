"""How a merge method maps to mergekit 0.1.5: the data a method class declares, and the shared rules.

Each method class declares ``mergekit``: either a ``MergekitSpec`` (mergekit's method, how faithful
the best translation is, a hook from mergetune's per-tensor values to mergekit's, and, where
mergekit's method imports back, the inverse hook and mergekit's parameter defaults) or a
``MergekitRefusal`` with the reason mergekit cannot run it. The hooks work on plain data:
``[T, N]`` arrays of per-task, per-tensor values (``ExportTables``, ``ImportTables``), and return
plain data (``Translation``, ``ImportedValues``); reading layouts, slices, gradients, filters and
writing YAML stay in ``mergetune.export``, which sits above merging and reads these declarations.

What mergekit 0.1.5 computes, per tensor, for its task-arithmetic family (``task_arithmetic``,
``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``):

    δ_t = sparsify(θ_t − θ_0, density_t)          magnitude top-k per tensor, Bernoulli, band, MagPrune
    δ'_t = weight_t · δ_t
    mask_t = sign(δ'_t) == sign(Σ_t δ'_t)         only with a sign consensus (ties, dare_ties, ...)
    Δ = Σ_t δ'_t mask_t  [/ Σ_t weight_t mask_t if normalize]  · lambda

and ``linear`` is Σ w_t θ_t / Σ w_t. A translation gives each tensor the weight, density and shared
parameters that make this equal to mergetune's merge:

- weights: ``weight_t = λ_t · c_t``, where ``c_t`` rescales mergekit's sparsified δ_t to
  mergetune's (DARE keeps entries with probability d and mergetune divides them by d: ``c = 1/d``
  with ``rescale: false``, since mergekit's ``rescale: true`` restores the tensor's L1 norm
  instead). mergekit's election then sees λ_t·v_t, which is mergetune's ``weights:
  before_election``; ``after_election`` is the same only where the λ_t of a group are equal.
- disjoint merge: ``sum`` is ``normalize: false``; ``weighted_mean`` divides by Σ λ_t c_t m_t, so
  it is ``normalize: true`` with ``lambda = scale · c`` where the c_t of a group are equal; ``mean``
  (official TIES) divides by the count, ``normalize: true`` with ``lambda = scale · λ c`` where the
  λ_t c_t are equal.
- densities are fractions kept on both sides; top-k counts are checked tensor by tensor (mergekit
  keeps max(1, ⌊d·n⌋), mergetune ⌊d·n⌋, and Breadcrumbs' outlier band is counted per tensor).
- which entries: mergekit cuts tied magnitudes at exactly k in torch's sort order and elects +1 where
  the weighted sign sum cancels exactly. A recipe with other ``tie_rule`` / ``sign_cancel`` options
  merges the same weights only where no tie at a cut and no exact cancel occurs, which depends on the
  weights: a method's ``audit`` (``TensorAudit``) counts them on the actual tensors, and the export
  says "in distribution", with the counts, where any occurs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mergetune.errors import MergetuneError

KEEP_GUARD = 1e-9  # mergetune's floor guard in keep counts (stats.keep_counts)
EXACT, IN_DISTRIBUTION, APPROXIMATE = "exact", "in distribution", "approximate"
Value = bool | float  # a scalar mergekit parameter value


class MergekitUnsupported(MergetuneError):
    """mergekit cannot run this recipe, or a recipe cannot hold this mergekit merge; the message says why.

    The exporter and the importer raise their own subclasses with the same message.
    """


# ---- plain data exchanged with the exporter and the importer ----------------------------------------------
@dataclass(frozen=True)
class ExportTables:
    """A recipe's parameters expanded to every tensor mergekit writes: ``[T, N]`` arrays in layout order.

    The merged tensors come first, then the task-specific ones (heads: weight 0, density 1).
    """

    tasks: list[str]
    names: tuple[str, ...]
    options: Any  # the method's validated Options
    weight: np.ndarray  # [T, N]
    density: np.ndarray  # [T, N]
    numel: np.ndarray  # [N] float64
    is_1d: np.ndarray  # [N] bool
    merged: np.ndarray  # [N] bool: a tensor mergetune merges (not a task head)
    tensor_groups: tuple[str, ...]  # the layer group of each merged tensor
    group_names: tuple[str, ...]  # every layer group, in depth order
    seed: int

    def groups_of(self, columns: np.ndarray) -> list[str]:
        """Names of the layer groups holding the tensors selected by a ``[N]`` mask, in depth order."""
        hit = {g for g, c in zip(self.tensor_groups, columns, strict=False) if c}
        return [g for g in self.group_names if g in hit]


@dataclass
class Translation:
    """mergekit's method and per-tensor parameter values for one recipe, and what they do not reproduce."""

    method: str
    per_input: dict[str, np.ndarray]  # param -> [T, N] values (task x tensor)
    shared: dict[str, np.ndarray | Value]  # param -> [N] values, or one value for every tensor
    faithful: str = EXACT
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    with_base: bool = True


@dataclass(frozen=True)
class ImportTables:
    """A mergekit configuration resolved per tensor: per model ``[M, N]`` and shared ``[N]`` values."""

    method: str  # mergekit's merge_method
    tasks: list[str]  # the experts' task names, in order
    names: tuple[str, ...]  # the merged tensors
    numel: np.ndarray  # [N] float64
    is_1d: np.ndarray  # [N] bool
    per_model: dict[str, np.ndarray]
    shared: dict[str, np.ndarray]
    has_base: bool = True  # the configuration names a base_model (methods where it is optional: see BASE_OPTIONAL)


@dataclass
class ImportedValues:
    """A recipe's method-dependent fields as per-tensor ``[T, N]`` values (gathered per group by the importer)."""

    method: str
    weight: np.ndarray
    density: np.ndarray | None
    options: dict[str, Any]
    differences: list[str]
    use: np.ndarray | None = None  # [N] mask of the tensors that set the group values (None: all)


# ---- what a method class declares ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MergekitInverse:
    """How a mergekit merge of the spec's method reads back as a recipe.

    ``shared`` and ``per_model`` are mergekit's parameters of that method with their defaults
    (``None``: required); any other parameter name in a configuration is an error.
    """

    invert: Callable[[ImportTables], ImportedValues]
    shared: Mapping[str, Any]
    per_model: Mapping[str, Any]
    base: str = "required"  # BASE_REQUIRED, BASE_OPTIONAL or BASE_INPUT: what base_model is to the method


# What mergekit's method does with ``base_model``: needs it (the task-arithmetic family, SLERP, Model
# Stock, ...); may have it (NuSLERP and Multi-SLERP interpolate task vectors with one, the weights
# without); or has no base role, every model being an input, base_model included when given (linear,
# karcher, passthrough).
BASE_REQUIRED, BASE_OPTIONAL, BASE_INPUT = "required", "optional", "input"


@dataclass
class AuditCounts:
    """What differs from mergekit on actual tensors, summed over tensors (see ``TensorAudit``)."""

    tied: int = 0  # entries kept or dropped beyond mergekit's exact count, because tied at a cut
    cancels: int = 0  # entries whose Σ_t v_t cancels exactly with some v_t ≠ 0
    cancels_unlike_mergekit: int = 0  # of these, where the entry's majority is not +1 (entry_majority)
    sign_balance: int = 0  # Σ over entries of sign(Σ_t v_t): the model-wide majority (model_majority)
    tensors: list[str] = field(default_factory=list)  # tensors where something differs, in order

    def add(self, other: AuditCounts, name: str) -> None:
        self.tied += other.tied
        self.cancels += other.cancels
        self.cancels_unlike_mergekit += other.cancels_unlike_mergekit
        self.sign_balance += other.sign_balance
        if other.tied or other.cancels:
            self.tensors.append(name)

    def notes(self, sign_cancel: str | None) -> list[str]:
        """The counts that make the export differ from mergekit (empty: the export is exact)."""
        out = []
        if self.tied:
            out.append(
                f"{self.tied} entries tied in magnitude at a top-k cut are kept or dropped together (tie_rule: "
                "keep_ties), mergekit takes exactly k in its sort order; set options.tie_rule: mergekit for an "
                "exact export"
            )
        differing = {
            None: 0,
            "plus_one": 0,
            "entry_majority": self.cancels_unlike_mergekit,
            "model_majority": 0 if self.sign_balance > 0 else self.cancels,
        }[sign_cancel]
        if differing:
            out.append(
                f"{differing} entries whose weighted sign sum cancels exactly get another sign than mergekit's +1 "
                f"(sign_cancel: {sign_cancel}); set options.sign_cancel: plus_one for an exact export"
            )
        if out:
            shown = ", ".join(f"'{n}'" for n in self.tensors[:3]) + (" ..." if len(self.tensors) > 3 else "")
            out.append(f"ties at a cut or exact cancels in {len(self.tensors)} tensor(s), e.g. {shown}")
        return out


TensorCheck = Callable[[torch.Tensor, np.ndarray, np.ndarray], AuditCounts]  # (τ [T, n], weight [T], density [T])


@dataclass(frozen=True)
class TensorAudit:
    """How a recipe whose options are not mergekit's tie and cancel rules is checked on actual tensors.

    ``check`` counts, for one tensor's task vectors ``[T, n]`` (float32, as mergekit's ``dtype:
    float32`` computes them) with that tensor's weights and densities, the entries that differ from
    mergekit's choice; ``sign_cancel`` is the recipe's rule (None: no sign election).
    """

    check: TensorCheck
    sign_cancel: str | None


@dataclass(frozen=True)
class MergekitSpec:
    """mergekit runs the method as ``method``; ``translate`` gives the values (and any differences).

    ``faithful`` is what the translation gives when nothing differs: ``exact`` (the same weights up to
    float rounding), ``in distribution`` (a random method: the same rule, other draws) or
    ``approximate`` (mergekit has no equivalent; only written with ``--approximate``).
    ``heads_refusal``: why models with task-specific tensors cannot be exported (``{heads}`` is
    filled in), for a mergekit method that would merge the heads. ``tolerance``: how closely an exact
    export agrees with mergetune's merge (float rounding only). ``audit``: for an exact method,
    the options' check on the actual tensors (None where the options make the export exact whatever
    the weights). ``also_imports``: other mergekit methods that are this method with other options
    (mergekit's ``della_linear`` is ``della`` without sign election), each with its inverse; the
    translation writes their name where the options say so.
    """

    method: str
    faithful: str
    translate: Callable[[ExportTables], Translation]
    inverse: MergekitInverse | None = None
    heads_refusal: str | None = None
    audit: Callable[[Any], TensorAudit | None] | None = None
    also_imports: Mapping[str, MergekitInverse] = field(default_factory=dict)
    # (atol, rtol) within which an exact export's weights agree with mergetune's: float32 rounding of
    # another order of operations (the real-mergekit tests compare with these).
    tolerance: tuple[float, float] = (1e-6, 1e-5)


@dataclass(frozen=True)
class MergekitRefusal:
    """mergekit cannot run the method at all; ``reason`` says why."""

    reason: str


def gta_parameters(*, normalize: bool, rescale: bool, **per_model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """mergekit 0.1.5's (shared, per-model) parameters of its task-arithmetic family, with defaults."""
    shared = {"int8_mask": False, "lambda": 1.0, "normalize": normalize, "rescale": rescale}
    return shared, {"weight": None, "density": 1.0, **per_model}


# ---- export: sign consensus and count conventions ------------------------------------------------------------
def consensus(
    method: str, t: ExportTables, density: np.ndarray, c: np.ndarray, weights_at: str, disjoint: str, scale: float
) -> Translation:
    """Weights and shared parameters of a sign-consensus method (see the module docstring).

    ``c`` ``[T, N]`` maps mergekit's sparsified values to mergetune's (1 for magnitude trims, 1/d for DARE);
    tasks with density 0 contribute nothing on either side and are left out of the equality checks.
    """
    weight = t.weight
    live = density > 0
    tr = Translation(method, {"weight": weight * c, "density": density}, {})
    if weights_at == "after_election":
        bad = ~equal_over_tasks(weight, live)
        if bad.any():
            tr.differences.append(
                f"weights: after_election (official TIES) with different λ per task in group(s) "
                f"{groups_text(t, bad)}: mergekit elects the sign on the weighted task vectors; set "
                "options.weights: before_election, or one λ for all tasks of each group"
            )
    if disjoint == "sum":
        tr.shared.update(normalize=False, **{"lambda": scale})
        return tr
    divisor = c if disjoint == "weighted_mean" else weight * c
    active = live & (weight != 0) if disjoint == "weighted_mean" else live
    bad = ~equal_over_tasks(divisor, active)
    if bad.any():
        what = "1/density" if disjoint == "weighted_mean" else "λ (times 1/density for DARE)"
        tr.differences.append(
            f"disjoint: {disjoint} with different {what} per task in group(s) {groups_text(t, bad)}: mergekit's "
            "normalize divides by the sum of the agreeing weights; use disjoint: sum or weighted_mean, "
            "or equal values per group"
        )
    tr.shared.update(normalize=True, **{"lambda": scale * _masked_mean(divisor, active)})
    return tr


def equal_over_tasks(values: np.ndarray, active: np.ndarray) -> np.ndarray:
    """``[N]``: the active tasks' values of a tensor are equal (to 1e-12 relative)."""
    big = np.where(active, values, -np.inf).max(axis=0)
    small = np.where(active, values, np.inf).min(axis=0)
    some = active.any(axis=0)
    return np.where(some, big - small, 0.0) <= 1e-12 * np.maximum(1.0, np.abs(np.where(some, big, 0.0)))


def _masked_mean(values: np.ndarray, active: np.ndarray) -> np.ndarray:
    total = np.where(active, values, 0.0).sum(axis=0)
    count = active.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), 1.0)


def topk_mismatch(numel: np.ndarray, density: np.ndarray) -> np.ndarray:
    """``[T, N]``: mergekit's magnitude top-k keeps another count than mergetune (max(1, ⌊d·n⌋) vs ⌊d·n⌋)."""
    n = numel[None, :]
    ours = np.floor(density * n + KEEP_GUARD)
    theirs = np.where(density >= 1, n, np.where(density <= 0, 0, np.maximum(1, np.floor(density * n))))
    return ours != theirs


def band_mismatch(numel: np.ndarray, density: np.ndarray, gamma: float) -> np.ndarray:
    """``[T, N]``: Breadcrumbs' band differs (mergekit shrinks the outlier cut when γ + d > 1, keeps all at d = 1)."""
    n = numel[None, :]
    k_hi = np.floor(gamma * n + KEEP_GUARD)
    kept_ours = np.minimum(n, k_hi + np.floor(density * n + KEEP_GUARD)) - k_hi
    target = np.floor(density * n)
    dropped_theirs = n - np.maximum(0, n - target - np.floor(gamma * n)) - target
    kept_theirs = np.where(density >= 1, n, target)
    same_drop = np.where(density >= 1, k_hi == 0, dropped_theirs == k_hi)
    return ~((kept_ours == kept_theirs) & ((kept_ours == 0) | same_drop))


def topk_differences(t: ExportTables, density: np.ndarray) -> list[str]:
    why = "mergekit keeps max(1, ⌊d·n⌋) entries of a tensor, mergetune ⌊d·n⌋"
    return count_report(t.names, t.tasks, topk_mismatch(t.numel, density) & t.merged[None, :], why)


def band_differences(t: ExportTables, gamma: float) -> list[str]:
    why = "mergekit shrinks the outlier cut when γ + density > 1 and keeps everything at density 1"
    return count_report(t.names, t.tasks, band_mismatch(t.numel, t.density, gamma) & t.merged[None, :], why)


def count_report(names: Sequence[str], tasks: list[str], bad: np.ndarray, why: str) -> list[str]:
    """One line on the (task, tensor) pairs whose kept counts differ, with the first as an example."""
    if not bad.any():
        return []
    t, i = (int(x) for x in np.argwhere(bad)[0])
    return [
        f"{int(bad.sum())} (task, tensor) pair(s) keep a different number of entries ({why}), e.g. "
        f"'{names[i]}' of task '{tasks[t]}'; move the densities off these counts (a tensor of n entries "
        "needs density ≥ 1/n)"
    ]


def unweighted_heads_refusal(method: str) -> str:
    """Why a recipe over models with task heads cannot export to a mergekit method without per-model weights."""
    return (
        f"exports to mergekit's {method}, which has no per-model weight and would merge the task heads {{heads}} "
        "that mergetune keeps per task; export models without their heads"
    )


def shared_scalar(r: ImportTables, param: str, diffs: list[str]) -> float:
    """A shared float parameter (e.g. ``epsilon``) that a recipe holds as one option: uniform over tensors."""
    return uniform_scalar(np.array([float(v) for v in r.shared[param]]), param, diffs)


# ---- export: ties at a cut and exact cancels, on the actual tensors -------------------------------------------
def keep_count(density: float, n: int) -> int:
    """mergetune's k = ⌊d·n⌋ for one block (``stats.keep_counts``, same guard)."""
    return max(0, int(np.floor(density * n + KEEP_GUARD)))


def kth_largest_value(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D block; +inf at k = 0 (keeps nothing), as ``stats.kth_largest``."""
    if k <= 0:
        return torch.tensor(float("inf"), dtype=magnitude.dtype)
    return torch.kthvalue(magnitude, magnitude.numel() - min(k, magnitude.numel()) + 1).values


def tied_beyond(magnitude: torch.Tensor, k: int) -> int:
    """Entries of a 1-D block tied with its k-th largest beyond the k that mergekit keeps (0 if none).

    Ties at 0 do not count: a zero entry kept or not changes no merge.
    """
    if k <= 0 or k >= magnitude.numel():
        return 0
    kth = kth_largest_value(magnitude, k)
    return 0 if kth == 0 else int((magnitude >= kth).sum()) - k


def cancel_counts(values: Sequence[torch.Tensor], election_weight: np.ndarray) -> AuditCounts:
    """Exact cancels of Σ_t e_t v_t on one tensor's selected values, in float32 as the kernels vote."""
    weights = torch.tensor(election_weight, dtype=torch.float32)
    voted = [v * e for v, e in zip(values, weights.unbind(0), strict=True)]
    total = voted[0].clone()
    for v in voted[1:]:
        total = total + v
    live = torch.zeros_like(total, dtype=torch.bool)
    votes = torch.zeros_like(total)
    for v in voted:
        live |= v != 0
        votes += torch.sign(v)
    cancel = (total == 0) & live
    return AuditCounts(
        cancels=int(cancel.sum()),
        cancels_unlike_mergekit=int((cancel & (votes <= 0)).sum()),
        sign_balance=int((total > 0).sum()) - int((total < 0).sum()),
    )


def scope_differences(scope: Any, what: str) -> list[str]:
    """mergekit ranks magnitudes within each tensor: any other ranking scope differs."""
    scope = str(getattr(scope, "value", scope))
    if scope == "tensor":
        return []
    ranked = {"global": "the whole model at once", "row": "each row"}[scope]
    return [
        f"scope: {scope}: {what} ranks magnitudes over {ranked}, mergekit within each tensor; "
        "set options.scope: tensor for an exact export"
    ]


def cancel_note(sign_cancel: str) -> list[str]:
    """For a random method (no audit: its draws differ anyway), the sign rule where a weighted sum cancels."""
    if sign_cancel == "plus_one":
        return []
    return [
        f"sign_cancel: {sign_cancel}: where the weighted sign sum of an entry cancels exactly (rare after random "
        "rescaling), mergekit elects +1; set options.sign_cancel: plus_one for mergekit's rule"
    ]


def random_note(t: ExportTables) -> str:
    return (
        "random masks: mergekit draws them from torch's RNG (mergekit-yaml --random-seed N), mergetune from a "
        f"hash of (seed {t.seed}, tensor, task): the same distribution, other draws"
    )


def inverse_density(density: np.ndarray, at_zero: float = 0.0) -> np.ndarray:
    """1/d, and ``at_zero`` where d = 0 (a task that keeps nothing)."""
    fill = np.full_like(density, at_zero)
    return np.divide(1.0, density, out=fill, where=density > 0)


def groups_text(t: ExportTables, columns: np.ndarray) -> str:
    groups = t.groups_of(columns)
    return ", ".join(groups[:6]) + (f" (+{len(groups) - 6} more)" if len(groups) > 6 else "")


def values_text(values: np.ndarray) -> list[str]:
    return [f"{v:g}" for v in sorted(set(np.asarray(values).ravel().tolist()))[:5]]


# ---- export: methods whose mergekit version has no per-model weight ---------------------------------------
def unit_weight_differences(t: ExportTables, method: str) -> list[str]:
    """mergekit's ``method`` takes no per-model weight (its merge is λ = 1): a merged tensor with λ ≠ 1 differs."""
    off = (t.weight != 1.0) & t.merged[None, :]
    if not off.any():
        return []
    return [
        f"mergekit's {method} has no per-model weight (its merge is λ = 1 for every task): λ "
        f"{', '.join(values_text(t.weight[off]))} in group(s) {groups_text(t, off.any(axis=0))}; use weight 1 for an "
        "exact export"
    ]


def equal_weight_differences(t: ExportTables, method: str) -> list[str]:
    """mergekit's ``method`` weighs every model equally: a merged tensor with unequal λ is not reproduced."""
    bad = ~equal_over_tasks(t.weight, np.ones_like(t.weight, dtype=bool)) & t.merged
    if not bad.any():
        return []
    return [
        f"mergekit's {method} weighs every model equally: different weights per task in group(s) "
        f"{groups_text(t, bad)} are not exported; give all tasks one weight per group for an exact export"
    ]


def shared_t_spec(method: str) -> MergekitSpec:
    """The exact spec of a method on the base and one expert whose λ is mergekit's shared ``t`` (SLERP, NearSwap).

    Task heads get t = 0, the base's value, on both sides: no refusal needed.
    """

    def to_mergekit(t: ExportTables) -> Translation:
        return Translation(method, {}, {"t": t.weight[0]})

    def from_mergekit(r: ImportTables) -> ImportedValues:
        return ImportedValues(method, np.array([[float(v) for v in r.shared["t"]]]), None, {}, [])

    return MergekitSpec(method, EXACT, to_mergekit, MergekitInverse(from_mergekit, {"t": None}, {}))


def ones_weight(r: ImportTables) -> np.ndarray:
    """λ = 1 for every expert and tensor: the method as mergekit runs it, without weights."""
    return np.ones((len(r.tasks), len(r.names)))


# ---- import: from mergekit's values to mergetune's ----------------------------------------------------------
def flag(r: ImportTables, param: str, diffs: list[str]) -> bool:
    """A boolean shared parameter; if it differs between tensors, the most common value (and a difference)."""
    values = [bool(v) for v in r.shared[param]]
    common = max(set(values), key=values.count)
    if len(set(values)) > 1:
        diffs.append(f"{param} differs between tensors; the recipe uses {common} everywhere")
    return common


def scale_of(r: ImportTables) -> np.ndarray:
    return np.array([float(v) for v in r.shared["lambda"]])


def linear_weights(r: ImportTables, w: np.ndarray) -> np.ndarray:
    """Weights of a method without consensus: normalize divides by Σ w (|Σ| < 1e-8: 1), lambda multiplies."""
    normalize = np.array([bool(v) for v in r.shared["normalize"]])
    total = w.sum(axis=0)
    w = np.where(normalize[None, :], w / np.where(np.abs(total) < 1e-8, 1.0, total), w)
    return w * scale_of(r)[None, :]


def random_rescale(r: ImportTables, density: np.ndarray, diffs: list[str]) -> np.ndarray:
    """mergetune's factor c on mergekit's sparsified values: 1/d without rescale; rescale: true is L1 (≈ 1/d)."""
    if flag(r, "rescale", diffs):
        diffs.append(
            "rescale: true scales a tensor's kept entries to restore its L1 norm; mergetune divides them by the "
            "density (equal in expectation); write rescale: false for an exact import"
        )
        return np.ones_like(density)
    return inverse_density(density, at_zero=1.0)


def refuse_l1_rescale(r: ImportTables, diffs: list[str]) -> None:
    """A magnitude trim (ties, breadcrumbs) keeps its entries as they are; mergekit's ``rescale: true`` does not.

    It multiplies each tensor's kept entries by ‖τ‖₁ / ‖kept‖₁, which no mergetune option does: a difference.
    """
    if flag(r, "rescale", diffs):
        diffs.append(
            f"{r.method} with rescale: true scales each tensor's kept entries to restore its L1 norm; mergetune keeps "
            "them unscaled; write rescale: false (mergekit's default) for an exact import"
        )


def inverse_consensus(
    r: ImportTables, c: np.ndarray, diffs: list[str], normalize: bool | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Inverse of ``consensus``: λ = w / c, election before the weights, disjoint from normalize."""
    weight = r.per_model["weight"] / c
    scale = scale_of(r)
    if normalize is None:
        normalize = flag(r, "normalize", diffs)
    if normalize:
        return _normalized(weight, c, scale, r.per_model["weight"], diffs)
    if np.ptp(scale) > 1e-12 and (scale > 0).all():
        return weight * scale[None, :], {"disjoint": "sum", "weights": "before_election", "scale": 1.0}
    return weight, {"disjoint": "sum", "weights": "before_election", "scale": one_value(scale, diffs)}


def _normalized(
    weight: np.ndarray, c: np.ndarray, scale: np.ndarray, w: np.ndarray, diffs: list[str]
) -> tuple[np.ndarray, dict[str, Any]]:
    """mergekit's normalize: lambda · Σ w s m / Σ w m, with w = λ c (see ``consensus``).

    A uniform lambda is mergetune's weighted mean (scale = lambda / c). A lambda that varies with the
    tensor is expressible where the weights of a tensor are equal: that is the official dis-mean,
    Σ λ v m / count, with λ_t = lambda / c_t.
    """
    active = weight != 0
    c_equal = equal_over_tasks(c, active)
    if not c_equal.all():
        diffs.append("normalize with different densities per model in a tensor: the weighted means differ")
    c_bar = np.where(active, c, 0).sum(0) / np.maximum(active.sum(0), 1)
    ratio = scale / np.where(c_bar > 0, c_bar, 1.0)
    varies = np.ptp(scale) > 1e-12 * max(1.0, float(np.abs(scale).max()))
    if varies and equal_over_tasks(w, w != 0).all() and (w >= 0).all() and (scale > 0).all():
        mean_weight = np.divide(scale[None, :], c, out=np.zeros_like(c), where=active)
        return mean_weight, {"disjoint": "mean", "weights": "before_election", "scale": 1.0}
    return weight, {"disjoint": "weighted_mean", "weights": "before_election", "scale": one_value(ratio, diffs)}


def one_value(values: np.ndarray, diffs: list[str]) -> float:
    """The options' single scale: uniform over tensors, else the mean (and a difference)."""
    if np.ptp(values) > 1e-12 * max(1.0, float(np.abs(values).max())):
        diffs.append("lambda differs between tensors and cannot be folded into the weights; the recipe uses its mean")
    return tidy(float(values.mean()))


def uniform_scalar(values: np.ndarray, name: str, diffs: list[str]) -> float:
    if np.ptp(values) > 0:
        diffs.append(f"{name} differs between models or tensors; the recipe uses its mean {values.mean():g}")
        return tidy(float(values.mean()))
    return float(values.flat[0])


def tidy(value: float) -> float:
    """12 significant digits: the noise of λ·d/d (1e-16) goes, decimals come back as written (float32: 1e-7)."""
    return float(f"{value:.12g}")
