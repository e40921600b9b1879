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
from conftest import ModelDirs, perturb_, seeded, tiny_llama_config
from safetensors.torch import load_file

from mergetune.export.mergekit import export_mergekit
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

needs_mergekit = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None,
    reason="mergekit is an optional test dependency: pip install -e '.[mergekit]' (make setup installs it)",
)


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
