"""Exports that are exact when they say so, on weights that tie like real checkpoints.

Checkpoints stored in bf16 take few distinct values: task vectors tie in magnitude at top-k cuts and
weighted sign sums cancel exactly. mergekit 0.1.5 then keeps exactly k entries in torch's sort order
and elects +1; mergetune's default rules keep every tied entry and the entry's majority sign. Here a
tiny Llama whose base and experts are rounded to bf16 is merged by mergetune and by real
``mergekit-multi`` on the exported YAML: with ``tie_rule: mergekit`` and ``sign_cancel: plus_one``
the export says exact and the weights are equal bit for bit; with the default rules the export says
"in distribution", with the counts, and the weights really differ. The rules themselves are checked
on hand-made tensors against hand-computed merges.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ModelDirs, needs_mergekit, perturb_, seeded, tiny_llama_config
from safetensors.torch import load_file

from mergetune.export.mergekit import ExportError, export_mergekit
from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.recipe import Recipe

BIN = Path(sys.executable).parent
TASKS = ("math", "code", "chat")
MERGEKIT_RULES = {"tie_rule": "mergekit", "sign_cancel": "plus_one"}
TIES = {
    "method": "ties",
    "weight": 0.6,  # one λ for all tasks: λa + λb cancels exactly where b = −a
    "density": 0.3,
    "options": {"scope": "tensor", "weights": "before_election", "disjoint": "weighted_mean"},
}
BREADCRUMBS = {"method": "breadcrumbs", "weight": {"math": 0.9, "*": 0.4}, "density": 0.4}
BREADCRUMBS_TIES = {"method": "breadcrumbs_ties", "weight": 0.5, "density": 0.4}
BAND = {"scope": "tensor", "gamma": 0.05}
CASES: dict[str, dict[str, Any]] = {
    "ties": {**TIES, "options": {**TIES["options"], **MERGEKIT_RULES}},
    "ties_sum": {**TIES, "options": {**TIES["options"], **MERGEKIT_RULES, "disjoint": "sum"}},
    "breadcrumbs": {**BREADCRUMBS, "options": {**BAND, "tie_rule": "mergekit"}},
    "breadcrumbs_ties": {**BREADCRUMBS_TIES, "options": {**BAND, **MERGEKIT_RULES}},
    "ties_default_rules": TIES,
    "breadcrumbs_default_rules": {**BREADCRUMBS, "options": BAND},
    "breadcrumbs_ties_default_rules": {**BREADCRUMBS_TIES, "options": BAND},
}
EXACT_CASES = ("ties", "ties_sum", "breadcrumbs", "breadcrumbs_ties")
DEFAULT_CASES = ("ties_default_rules", "breadcrumbs_default_rules", "breadcrumbs_ties_default_rules")


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory: pytest.TempPathFactory) -> ModelDirs:
    """A tiny Llama base and three experts stored in bfloat16, as released checkpoints are."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("bf16_llama")
    with seeded(3):
        base = LlamaForCausalLM(tiny_llama_config())
    base.to(torch.bfloat16).save_pretrained(root / "base")
    experts = {}
    for i, task in enumerate(TASKS):
        expert = LlamaForCausalLM(base.config).to(torch.bfloat16)
        expert.load_state_dict(base.state_dict())
        perturb_(expert.float(), seed=700 + i).to(torch.bfloat16).save_pretrained(root / task)
        experts[task] = root / task
    return root / "base", experts


def recipe_of(models: ModelDirs, spec: dict[str, Any]) -> Recipe:
    base, experts = models
    fields = {k: v for k, v in spec.items() if k != "method"}
    return Recipe.model_validate(
        {
            "base": str(base),
            "experts": [{"name": t, "model": str(p)} for t, p in experts.items()],
            "method": spec["method"],
            **fields,
        }
    )


@pytest.fixture(scope="module")
def merger(bf16_llama: ModelDirs) -> Merger:
    base, experts = bf16_llama
    return Merger(ModelSet.load(str(base), [(t, str(p)) for t, p in experts.items()]), compile=False)


@pytest.fixture(scope="module")
def mergekit_out(bf16_llama: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case exported and run by one real ``mergekit-multi`` process."""
    if importlib.util.find_spec("mergekit") is None:
        pytest.skip("mergekit is an optional test dependency")
    root = tmp_path_factory.mktemp("mergekit_ties")
    docs = [
        {"name": f"run-{name}", **yaml.safe_load(export_mergekit(recipe_of(bf16_llama, spec)).yaml)}
        for name, spec in CASES.items()
    ]
    (root / "all.yml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    command = [str(BIN / "mergekit-multi"), str(root / "all.yml"), "-I", str(root / "out"), "--no-lazy", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: root / "out" / f"run-{name}" for name in CASES}


def ours_and_theirs(merger: Merger, models: ModelDirs, name: str, folder: Path) -> list[tuple[str, Any, Any]]:
    ours = {k: v.clone() for k, v in merger.merge(recipe_of(models, CASES[name])).items()}
    theirs = load_file(str(folder / "model.safetensors"))
    return [(tensor, value, theirs[tensor]) for tensor, value in ours.items()]


def test_bf16_task_vectors_tie_at_the_cut_and_cancel(merger: Merger) -> None:
    """The premise: on these weights, keeping the top 30% per tensor meets ties at the cut and exact cancels."""
    ms = merger.modelset
    tied = cancels = 0
    for seg in ms.segments:
        tau = ms.tau[:, seg.offset : seg.end]
        k = int(0.3 * seg.numel)
        if k == 0:
            continue
        kth = tau.abs().sort(dim=1, descending=True).values[:, k - 1 : k]
        kept = torch.where(tau.abs() >= kth, tau, torch.zeros_like(tau))
        tied += int((tau.abs() >= kth).sum()) - k * ms.n_tasks
        total = kept[0] * 0.6 + kept[1] * 0.6 + kept[2] * 0.6
        cancels += int(((total == 0) & (kept != 0).any(0)).sum())
    assert tied > 10 and cancels > 0, (tied, cancels)


@needs_mergekit
@pytest.mark.parametrize("name", EXACT_CASES)
def test_exact_exports_equal_mergekit_bit_for_bit(
    name: str, bf16_llama: ModelDirs, merger: Merger, mergekit_out: dict[str, Path]
) -> None:
    exported = export_mergekit(recipe_of(bf16_llama, CASES[name]))
    assert exported.faithful == "exact", exported.notes
    moved = 0.0
    for tensor, ours, theirs in ours_and_theirs(merger, bf16_llama, name, mergekit_out[name]):
        assert torch.equal(ours, theirs), f"{tensor}: {int((ours != theirs).sum())} entries differ"
        moved = max(moved, float((ours - merger.modelset.base_tensor(tensor)).abs().max()))
    assert moved > 1e-3  # the merge moved the weights: not a comparison of two copies of the base


@needs_mergekit
@pytest.mark.parametrize("name", DEFAULT_CASES)
def test_default_rules_export_in_distribution_with_counts_and_really_differ(
    name: str, bf16_llama: ModelDirs, merger: Merger, mergekit_out: dict[str, Path]
) -> None:
    exported = export_mergekit(recipe_of(bf16_llama, CASES[name]))
    assert exported.faithful == "in distribution"
    assert any("tied in magnitude at a top-k cut" in n for n in exported.notes), exported.notes
    assert "tie_rule: mergekit" in exported.yaml
    differing = sum(int((o != t).sum()) for _, o, t in ours_and_theirs(merger, bf16_llama, name, mergekit_out[name]))
    assert differing > 0  # the counted ties change the weights: the label is not over-cautious


# ---- the rules on hand-made tensors --------------------------------------------------------------------
# Three tasks, one tensor of 7 entries (base 0, so τ is exact). Entries 0 and 6 cancel exactly:
# (1, 1, −2) has a positive majority of signs, (1, −1, 0) none. The other elected signs are
# +, +, −, −, −: the model-wide majority is −1.
CANCEL_TAU = torch.tensor([[1.0, 1, 1, -1, -3, -1, 1], [1, 1, 1, -1, 1, -1, -1], [-2, 1, -1, -1, 1, 1, 0]])
# official dis-mean of the entries agreeing with γ, per rule
CANCEL_EXPECTED = {
    "entry_majority": [1.0, 1, 1, -1, -3, -1, 0],  # entry 6: no majority, dropped
    "plus_one": [1.0, 1, 1, -1, -3, -1, 1],
    "model_majority": [-2.0, 1, 1, -1, -3, -1, -1],
}


def hand_modelset(tau: torch.Tensor) -> ModelSet:
    base = {"w": torch.zeros(1, tau.shape[1])}
    experts = [(t, {"w": tau[i].reshape(1, -1).clone()}) for i, t in enumerate(TASKS[: tau.shape[0]])]
    return ModelSet.load(base, experts)


def hand_recipe(method: str, **fields: Any) -> Recipe:
    experts = [{"name": t, "model": "x"} for t in TASKS]
    return Recipe.model_validate({"base": "b", "experts": experts, "method": method, **fields})


@pytest.mark.parametrize("rule", list(CANCEL_EXPECTED))
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_sign_cancel_rules(rule: str, method: str) -> None:
    """At density 1 (no trim, no drop, no band) every consensus method is TIES' election: the rules decide."""
    options = {"sign_cancel": rule, "disjoint": "mean", "weights": "after_election"}
    if method == "breadcrumbs_ties":
        options["gamma"] = 0.0
    recipe = hand_recipe(method, weight=1.0, density=1.0, options=options)
    merged = Merger(hand_modelset(CANCEL_TAU), compile=False).merge(recipe)["w"]
    assert merged.reshape(-1).tolist() == CANCEL_EXPECTED[rule]


def test_model_majority_is_the_sign_of_the_whole_model() -> None:
    """Flip the non-cancelling entries: the model-wide majority turns +1 and decides entries 0 and 6."""
    tau = CANCEL_TAU.clone()
    tau[:, 1:6] = -tau[:, 1:6]
    recipe = hand_recipe("ties", weight=1.0, density=1.0, options={"sign_cancel": "model_majority"})
    merged = Merger(hand_modelset(tau), compile=False).merge(recipe)["w"].reshape(-1)
    assert merged[[0, 6]].tolist() == [1.0, 1.0]


# One task's τ with heavy ties: 12 entries, magnitudes 3 (×2), 2 (×4), 1 (×6).
TIED = torch.tensor([[2.0, -1, 1, 3, -2, 1, -1, 2, 1, -3, -2, 1]])


@pytest.mark.parametrize("density", [0.25, 0.5, 0.75])
def test_tie_rules_of_the_ties_trim(density: float) -> None:
    """keep_ties keeps every tie of the k-th largest, official int(d·n) + 1 and its ties, mergekit exactly k."""
    ms = ModelSet.load({"w": torch.zeros(1, 12)}, [("math", {"w": TIED.clone()})])
    kept = {}
    for rule in ("keep_ties", "official", "mergekit"):
        recipe = Recipe.model_validate(
            {
                "base": "b",
                "experts": [{"name": "math", "model": "x"}],
                "method": "ties",
                "weight": 1.0,
                "density": density,
                "options": {"scope": "tensor", "tie_rule": rule},
            }
        )
        kept[rule] = Merger(ms, compile=False).merge(recipe)["w"].reshape(-1)
    k = int(density * 12)  # 3, 6, 9: the k-th largest magnitude is 2, 2 and 1
    magnitude = TIED.abs().reshape(-1)
    kth = magnitude.sort(descending=True).values[k - 1]
    assert torch.equal(kept["keep_ties"], torch.where(magnitude >= kth, TIED.reshape(-1), 0.0))
    kth_official = magnitude.sort(descending=True).values[k]
    assert torch.equal(kept["official"], torch.where(magnitude >= kth_official, TIED.reshape(-1), 0.0))
    assert int((kept["mergekit"] != 0).sum()) == k


@needs_mergekit
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9])
def test_mergekit_tie_rule_selects_what_mergekit_sparsify_selects(bf16_llama: ModelDirs, density: float) -> None:
    """Against mergekit 0.1.5's own ``magnitude`` and ``magnitude_outliers`` on every bf16 tensor, per expert.

    One expert at a time, weight 1: TIES' Δ is then the trimmed τ and Breadcrumbs' the band of τ.
    """
    from mergekit.sparsify import magnitude, magnitude_outliers

    base, experts = bf16_llama
    for task, folder in experts.items():
        ms = ModelSet.load(str(base), [(task, str(folder))])
        solo = {"base": str(base), "experts": [{"name": task, "model": str(folder)}], "weight": 1.0}
        ties = Recipe.model_validate(
            {**solo, "method": "ties", "density": density, "options": {"scope": "tensor", "tie_rule": "mergekit"}}
        )
        band = Recipe.model_validate(
            {**solo, "method": "breadcrumbs", "density": density, "options": {**BAND, "tie_rule": "mergekit"}}
        )
        merger = Merger(ms, compile=False)
        ours_ties = {k: v.clone() for k, v in merger.merge(ties).items()}
        ours_band = {k: v.clone() for k, v in merger.merge(band).items()}
        for seg in ms.segments:
            tau, theta0 = ms.task_vector(0, seg.name), ms.base_tensor(seg.name)
            if int(density * tau.numel()) == 0:
                continue  # mergekit keeps max(1, ·): a count difference, reported apart
            assert torch.equal(ours_ties[seg.name], theta0 + magnitude(tau, density)), seg.name
            assert torch.equal(ours_band[seg.name], theta0 + magnitude_outliers(tau, density, gamma=0.05)), seg.name


RULE_VARIANTS = {
    "ties_mergekit_global": ("ties", {"scope": "global", "tie_rule": "mergekit", "sign_cancel": "model_majority"}),
    "ties_mergekit_row": ("ties", {"scope": "row", "tie_rule": "mergekit", "sign_cancel": "plus_one"}),
    "ties_official": ("ties", {"scope": "tensor", "tie_rule": "official", "sign_cancel": "model_majority"}),
    "breadcrumbs_mergekit": ("breadcrumbs", {"scope": "row", "tie_rule": "mergekit"}),
    "breadcrumbs_ties_mergekit": ("breadcrumbs_ties", {"scope": "global", "tie_rule": "mergekit"}),
    "dare_ties_majority": ("dare_ties", {"sign_cancel": "model_majority", "trim_density": 0.5}),
    "della_majority": ("della", {"sign_cancel": "model_majority"}),
}


@pytest.mark.parametrize("name", list(RULE_VARIANTS))
def test_new_rules_do_not_depend_on_chunking(name: str, merger: Merger) -> None:
    """The rank scores and the model-wide pre-pass follow whole tensors, whatever the chunk size."""
    method, options = RULE_VARIANTS[name]
    recipe = recipe_of(
        (Path(str(merger.modelset.base_folder)), {t: Path("x") for t in TASKS}),
        {"method": method, "weight": 0.7, "density": 0.4, "options": options},
    )
    whole = {k: v.clone() for k, v in merger.merge(recipe).items()}
    chunked = Merger(merger.modelset, compile=False, chunk_size=7).merge(recipe)
    for tensor, value in whole.items():
        assert torch.equal(chunked[tensor], value), tensor


def test_official_tie_rule_is_a_listed_difference(bf16_llama: ModelDirs) -> None:
    """The official code's int(d·n) + 1 is another count than mergekit's: refused, or written as approximate."""
    spec = {**TIES, "options": {**TIES["options"], "tie_rule": "official", "sign_cancel": "plus_one"}}
    recipe = recipe_of(bf16_llama, spec)
    with pytest.raises(ExportError, match="tie_rule: official"):
        export_mergekit(recipe)
    assert export_mergekit(recipe, approximate=True).faithful == "approximate"


# Entries 0 (1, 1, −2) and 6 (1, −1, 0) cancel: entry 0's own majority is +1, mergekit's choice; entry 6
# has none (dropped); the model-wide majority is −1 and flips both.
@pytest.mark.parametrize(("rule", "differing"), [("entry_majority", 1), ("model_majority", 2), ("plus_one", 0)])
def test_cancel_counts_follow_the_recipe_rule(tmp_path: Path, rule: str, differing: int) -> None:
    """On the hand-made cancels (model-wide majority −1): only plus_one makes the same choice as mergekit."""
    from safetensors.torch import save_file

    for i, name in enumerate(("base", *TASKS)):
        (tmp_path / name).mkdir()
        values = torch.zeros(1, 7) if name == "base" else CANCEL_TAU[i - 1].reshape(1, -1).clone()
        save_file({"w": values}, str(tmp_path / name / "model.safetensors"))
    options = {"scope": "tensor", "tie_rule": "mergekit", "sign_cancel": rule, "weights": "before_election"}
    recipe = recipe_of(
        (tmp_path / "base", {t: tmp_path / t for t in TASKS}),
        {"method": "ties", "weight": 1.0, "density": 1.0, "options": {**options, "disjoint": "weighted_mean"}},
    )
    exported = export_mergekit(recipe)
    assert exported.faithful == ("in distribution" if differing else "exact")
    if differing:
        counted = f"{differing} entries whose weighted sign sum cancels exactly"
        assert any(n.startswith(counted) for n in exported.notes), exported.notes
