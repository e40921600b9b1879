"""``import-mergekit`` of a configuration per mergekit 0.1.5 task-vector method name merges like mergekit itself.

One hand-written configuration per method name (task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
breadcrumbs_ties, della, della_linear, sce, ram, ramplus_tl), each with the shared parameters that change
the merge set away from their defaults (``normalize``, ``lambda``, ``rescale: false``, ``epsilon``,
``select_topk``, ``r``, ``alpha``), is run by mergekit (one ``mergekit-multi`` process), imported as a
recipe and merged by mergetune. Deterministic methods agree to float rounding; the random ones (DARE and
DELLA masks: torch's RNG in mergekit, a hash in mergetune) agree in distribution: mergekit's values are
z-scored against mergetune's per-entry mean and spread over many seeds, which checks the kept fraction and
the rescale together (a wrong keep rate or rescale moves the mean or the spread). Export of each method
through mergekit is covered by ``test_mergekit_export.py``'s tables.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import ModelDirs, needs_mergekit
from test_mergekit_export import ATOL, BIN, RTOL, mergekit_weights, z_scores

from mergetune.export.mergekit_import import import_config
from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet

pytestmark = needs_mergekit

# method -> (shared parameters, per-model parameters of the three experts); weights and densities differ per model
PER_MODEL = [{"weight": 0.7, "density": 0.5}, {"weight": 0.4, "density": 0.3}, {"weight": 0.2, "density": 0.6}]
UNWEIGHTED: list[dict[str, Any]] = [{}, {}, {}]
DETERMINISTIC: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "task_arithmetic": ({"normalize": True, "lambda": 0.8}, PER_MODEL),
    "ties": ({"normalize": False, "lambda": 1.4}, PER_MODEL),
    "breadcrumbs": ({"lambda": 0.9}, [{**p, "gamma": 0.05} for p in PER_MODEL]),
    "breadcrumbs_ties": ({"normalize": True}, [{**p, "gamma": 0.05} for p in PER_MODEL]),
    "sce": ({"select_topk": 0.4}, UNWEIGHTED),
    "ram": ({"epsilon": 0.01}, UNWEIGHTED),  # ε at the experts' noise scale: about half the entries are unique
    "ramplus_tl": ({"epsilon": 0.01, "r": 0.5, "alpha": 2.0}, UNWEIGHTED),
}
RANDOM: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "dare_linear": ({"normalize": True, "rescale": False}, PER_MODEL),
    "dare_ties": ({"rescale": False, "lambda": 1.2}, PER_MODEL),
    # della's normalize divides by Σ w m, mergetune's weighted mean by Σ λ m = Σ w d m: equal only with one density
    "della": ({"rescale": False, "lambda": 0.9}, [{**p, "density": 0.5, "epsilon": 0.0} for p in PER_MODEL]),
    "della_linear": ({"rescale": False, "normalize": True}, [{**p, "epsilon": 0.0} for p in PER_MODEL]),
}


def config(models: ModelDirs, method: str, shared: dict[str, Any], per_model: list[dict[str, Any]]) -> dict[str, Any]:
    base, experts = str(models[0]), [str(p) for p in models[1].values()]
    sources = [{"model": base}] + [{"model": e, "parameters": p} for e, p in zip(experts, per_model, strict=True)]
    return {"merge_method": method, "base_model": base, "models": sources, "parameters": shared, "dtype": "float32"}


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """Every configuration, run by one ``mergekit-multi`` process."""
    root = tmp_path_factory.mktemp("mergekit_sparse")
    # a merge named like a method ("task_arithmetic") reads to mergekit-multi as a dependency on itself: prefix it
    methods = {**DETERMINISTIC, **RANDOM}
    out = {m: (config(tiny_llama_dir, m, *spec), root / "out" / f"run-{m}") for m, spec in methods.items()}
    docs = [{"name": f"run-{m}", **c} for m, (c, _) in out.items()]
    (root / "all.yml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    command = [str(BIN / "mergekit-multi"), str(root / "all.yml"), "-I", str(root / "out"), "--no-lazy", "--quiet"]
    done = subprocess.run([*command, "--random-seed", "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def merger(tiny_llama_dir: ModelDirs) -> Merger:
    base, experts = tiny_llama_dir
    return Merger(ModelSet.load(str(base), [(t, str(p)) for t, p in experts.items()]), compile=False)


def imported_merge(merger: Merger, cfg: dict[str, Any], name: str) -> tuple[Any, dict[str, torch.Tensor]]:
    imported = import_config(cfg, source=name)
    assert imported.differences == []
    return imported.recipe, {k: v.clone() for k, v in merger.merge(imported.recipe).items()}


@pytest.mark.parametrize("method", list(DETERMINISTIC))
def test_imported_deterministic_method_merges_like_mergekit(
    method: str, runs: dict[str, tuple[dict, Path]], merger: Merger
) -> None:
    cfg, folder = runs[method]
    recipe, ours = imported_merge(merger, cfg, method)
    assert recipe.method == method
    theirs = mergekit_weights(folder)
    for tensor, value in ours.items():
        torch.testing.assert_close(theirs[tensor], value, atol=ATOL, rtol=RTOL, msg=lambda m, t=tensor: f"{t}: {m}")
    moved = max(float((v - merger.modelset.base_tensor(t)).abs().max()) for t, v in ours.items())
    assert moved > 100 * ATOL  # the merge really moved the weights


@pytest.mark.parametrize("method", list(RANDOM))
def test_imported_random_method_merges_like_mergekit_in_distribution(
    method: str, runs: dict[str, tuple[dict, Path]], merger: Merger
) -> None:
    cfg, folder = runs[method]
    recipe, _ = imported_merge(merger, cfg, method)
    assert recipe.method == ("della" if method == "della_linear" else method)
    z, gap = z_scores(merger, recipe, mergekit_weights(folder))
    assert z.numel() > 5000
    assert gap <= ATOL  # entries no draw changes agree exactly
    assert abs(float(z.mean())) < 0.06, "mergekit's merge is biased against mergetune's distribution"
    assert 0.9 < float((z * z).mean()) < 1.15, "mergekit's spread differs from mergetune's"
