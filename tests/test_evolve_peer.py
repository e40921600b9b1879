"""The mergekit_evolve protocol of benchmarks/search_quality.py (benchmarks/evolve_peer.py).

mergekit-evolve end to end on llm-tiny takes minutes on a CPU (Ray start, one merge written to
disk and reloaded by lm-eval per evaluation): it is a benchmark smoke
(``benchmarks/search_quality.py --zoo llm-tiny --budget 5 --protocols mergekit_evolve``), not a test.
Here: its CMA-ES schedule against pycma itself, the task weights by hand, and on llm-tiny the
lm-eval task files against mergetune's own scores and the scoring of a model folder.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from mergetune.objectives.zoo import build_zoo
from mergetune.search.config import SearchConfig
from mergetune.search.loop import resolve_models, worker_setup
from mergetune.search.worker import Worker, setup_tokenizer

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("evolve_peer", REPO / "benchmarks" / "evolve_peer.py")
evolve_peer = importlib.util.module_from_spec(_spec)
sys.modules["evolve_peer"] = evolve_peer
_spec.loader.exec_module(evolve_peer)


@pytest.mark.parametrize(("budget", "dimensions", "expected"), [(13, 120, (4, 11)), (7, 16, (2, 5)), (5, 8, (2, 3))])
def test_cma_schedule_by_hand(budget: int, dimensions: int, expected: tuple[int, int]) -> None:
    # 13: 12 samples, default population 4 + int(3 ln 120) = 18, capped at 12 // 3 = 4, which divides 12
    assert evolve_peer.cma_schedule(budget, dimensions) == expected


@pytest.mark.parametrize(("budget", "dimensions"), [(13, 120), (7, 16), (5, 8), (16, 30)])
def test_cma_schedule_gives_pycma_exactly_the_budget(budget: int, dimensions: int) -> None:
    """mergekit-evolve calls ``cma.fmin2(None, parallel_objective=..., options={maxfevals, popsize})``: same here."""
    cma = pytest.importorskip("cma", reason="cma comes with mergekit's evolve extra (mergekit-evolve's optimiser)")
    popsize, max_fevals = evolve_peer.cma_schedule(budget, dimensions)
    calls: list[int] = []

    def parallel(xs: list[np.ndarray]) -> list[float]:
        calls.append(len(xs))
        return [float(np.sum(x**2)) for x in xs]

    options = {"maxfevals": max_fevals, "popsize": popsize, "verbose": -9, "verb_log": 0, "seed": 1}
    cma.fmin2(None, parallel_objective=parallel, x0=np.full(dimensions, 0.5), sigma0=1 / 6, options=options)
    assert sum(calls) == budget
    assert calls[:-1] == [popsize] * ((budget - 1) // popsize) and calls[-1] == 1  # generations, then the mean


def test_cma_schedule_refuses_a_budget_below_three() -> None:
    with pytest.raises(SystemExit, match="at least 3 evaluations, not 2"):
        evolve_peer.cma_schedule(2, 10)


def test_task_weights_make_the_sum_the_mean_normalised_score() -> None:
    tasks = [
        evolve_peer.EvolveTask("mc", "mergetune_mc", "acc", True),
        evolve_peer.EvolveTask("lm", "mergetune_lm", "bits_per_byte", False),
    ]
    refs = {"expert": {"mc": 0.8, "lm": 1.5}, "base": {"lm": 2.0}}
    weights = evolve_peer.task_weights(tasks, refs)
    assert weights == pytest.approx({"mc": 1 / (2 * 0.8), "lm": -1 / (2 * 0.5)})
    # a merge at acc 0.6 and 1.75 bpb: mergetune's mean is (0.6 / 0.8 + (2.0 - 1.75) / 0.5) / 2 = 0.625;
    # the weighted sum differs from it by a constant that does not depend on the merge (2.0 / (2 * 0.5))
    assert weights["mc"] * 0.6 + weights["lm"] * 1.75 + 2.0 / (2 * 0.5) == pytest.approx(0.625)
    with pytest.raises(SystemExit, match="no better than the base's"):
        evolve_peer.task_weights(tasks, {"expert": {"mc": 0.8, "lm": 2.5}, "base": {"lm": 2.0}})


# ---- on llm-tiny ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_worker(tmp_path_factory: pytest.TempPathFactory) -> Worker:
    """A worker of configs/llm-tiny.yaml over llm-tiny built into a private cache."""
    cache = tmp_path_factory.mktemp("llm-cache")
    build_zoo("llm-tiny", cache_dir=cache, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MERGETUNE_CACHE", str(cache))
        patch.setenv("MERGETUNE_COMPILE", "0")
        config = SearchConfig.load(REPO / "configs" / "llm-tiny.yaml")
        config = config.model_copy(update={"output": str(tmp_path_factory.mktemp("run"))})
        setup = worker_setup(config, resolve_models(config))
        return Worker(setup)


@pytest.mark.slow
def test_lm_eval_task_files_score_what_mergetune_scores(tiny_worker: Worker, tmp_path: Path) -> None:
    """lm-eval on the written multiple-choice task gives mergetune's accuracy of the expert on the search split."""
    pytest.importorskip("lm_eval", reason="lm-eval comes with mergekit's evolve extra")
    setup = tiny_worker.setup
    tasks = evolve_peer.write_lm_eval_tasks(evolve_peer.search_tasks(setup), setup_tokenizer(setup), tmp_path)
    choice = next(t for t in tasks if t.metric == "acc")
    expert = setup.task_experts()[choice.name]
    by_lm_eval = evolve_peer.lm_eval_score(expert, [choice], tmp_path, batch_size=16, dtype="float32")
    assert by_lm_eval[choice.name] == pytest.approx(tiny_worker.reference("search")[choice.name], abs=1e-9)


@pytest.mark.slow
def test_score_folder_scores_the_folder_it_is_given(tiny_worker: Worker) -> None:
    """The base's folder keeps none of an LM expert's gain (0); an expert's folder is that expert (1 on its task).
    Its per-example test outcomes average to each task's test score (what the paired bootstrap reads)."""
    setup = tiny_worker.setup
    base, examples = evolve_peer.score_folder(tiny_worker, Path(setup.base))
    assert examples, "no per-example test outcomes"
    for task, values in examples.items():
        assert np.mean(values) == pytest.approx(base["test"]["scores"][task], rel=1e-9)
    lm_tasks = [t["name"] for t in setup.tasks if t["kind"] == "lm"]
    for split in evolve_peer.SPLITS:
        for task in lm_tasks:
            assert base[split]["normalized"][task] == pytest.approx(0.0, abs=1e-5)
    task, folder = next(iter(setup.task_experts().items()))
    expert, _ = evolve_peer.score_folder(tiny_worker, Path(folder))
    for split in evolve_peer.SPLITS:
        assert expert[split]["normalized"][task] == pytest.approx(1.0, abs=1e-5)
