"""Pareto fronts, the selection rule, the result files and ``mergetune status``.

Expectations are independent of the implementation: dominance is checked against a brute-force
double loop, rankings and choices against orders worked out by hand, files by reading them back.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import optuna
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.errors import MergetuneError
from mergetune.recipe import Recipe
from mergetune.search import pareto
from mergetune.search.pareto import choose, optimized_front, pareto_mask, per_task_front, rank_finalists
from mergetune.search.records import TrialRecord, read_records
from mergetune.search.results import generalization, generalization_line, summary_table, write_results
from mergetune.search.status import SearchStorageError, status_report
from mergetune.search.storage import open_storage

TASKS = ("sst2", "mnli", "topic")
runner = CliRunner()


def recipe(method: str = "ties", weight: float = 0.5, density: float = 0.2) -> dict:
    experts = [{"name": t, "model": f"experts/{t}"} for t in TASKS]
    return Recipe(base="base", experts=experts, method=method, weight=weight, density=density).to_dict()


def record(
    number: int,
    normalized: dict[str, float] | tuple[float, ...] | None = None,
    *,
    state: str = "COMPLETE",
    feasible: bool = True,
    method: str = "ties",
    density: float = 0.2,
    objectives: tuple[str, ...] = ("mean", "worst"),
    error: str | None = None,
    reused_from: int | None = None,
) -> TrialRecord:
    """A record as the loop writes it: values derived from the normalised scores, raw = 0.9 × normalised."""
    if isinstance(normalized, tuple):
        normalized = dict(zip(TASKS, normalized, strict=True))
    normalized = normalized or {}
    ok = state == "COMPLETE"
    by_name = {}
    if ok and normalized:
        by_name = {"mean": float(np.mean(list(normalized.values()))), "worst": min(normalized.values())}
        by_name["sparsity"] = density
    return TrialRecord(
        number=number,
        state=state,
        method=method,
        values={o: by_name[o] for o in objectives} if by_name else {},
        scores={t: 0.9 * v for t, v in normalized.items()},
        normalized=dict(normalized),
        feasible=feasible and ok,
        recipe=recipe(method, weight=0.1 + number / 100, density=density),
        timing={"merge": 0.5, "eval": 2.0, "ask": 0.01, "wall": 2.6} if ok else {},
        worker="local-0",
        error=error,
        params={"method": method},
        density=density,
        reused_from=reused_from,
    )


def test_a_reused_trial_is_neither_on_a_front_nor_a_finalist_twice():
    """A trial that carries an earlier equal trial's result is the same recipe: choosing among both
    would list one recipe twice on the front and re-score it twice as a finalist."""
    source, other = record(0, (0.9, 0.8, 0.7)), record(1, (0.5, 0.95, 0.6))
    copy = record(2, (0.9, 0.8, 0.7), reused_from=0)
    records = [source, other, copy]
    assert [r.number for r in rank_finalists(records, "best_mean_feasible", k=3)] == [0, 1]
    assert [r.number for r in optimized_front(records, ["mean", "worst"])] == [0]
    assert sorted(r.number for r in per_task_front(records)) == [0, 1]


# ---- pareto_mask ----------------------------------------------------------------------------------
def brute_force_mask(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    oriented = values * np.where(maximize, 1.0, -1.0)
    keep = np.ones(len(values), dtype=bool)
    for i in range(len(values)):
        for j in range(len(values)):
            if i != j and np.all(oriented[j] >= oriented[i]) and np.any(oriented[j] > oriented[i]):
                keep[i] = False
                break
    return keep


@pytest.mark.parametrize("seed", range(8))
def test_pareto_mask_matches_brute_force_with_ties_duplicates_and_mixed_directions(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 60)), int(rng.integers(1, 5))
    values = rng.integers(0, 4, size=(n, k)).astype(float)  # few levels: many ties
    values = np.concatenate([values, values[rng.integers(0, n, size=5)]])  # exact duplicates
    maximize = [bool(b) for b in rng.integers(0, 2, size=k)]
    expected = brute_force_mask(values, maximize)
    assert np.array_equal(pareto_mask(values, maximize), expected)
    monkeypatch.setattr(pareto, "_CHUNK_ELEMENTS", 7)  # many small chunks give the same answer
    assert np.array_equal(pareto_mask(values, maximize), expected)


def test_pareto_mask_continuous_values_against_brute_force():
    rng = np.random.default_rng(42)
    values = rng.normal(size=(200, 3))
    maximize = [True, False, True]
    assert np.array_equal(pareto_mask(values, maximize), brute_force_mask(values, maximize))


def test_pareto_mask_edge_cases():
    assert pareto_mask(np.empty((0, 2)), [True, True]).shape == (0,)
    same = np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 2.0]])
    assert pareto_mask(same, [True, True]).tolist() == [True, True, False]  # identical rows both kept
    assert pareto_mask(same, [False, True]).tolist() == [False, False, True]
    with_nan = np.array([[np.nan, 5.0], [1.0, 5.0]])
    assert pareto_mask(with_nan, [True, True]).tolist() == [False, True]  # NaN is the worst value
    with pytest.raises(ValueError, match="directions"):
        pareto_mask(same, [True])


# ---- fronts ---------------------------------------------------------------------------------------
def test_optimized_front_mean_worst_sorted_best_first_and_skips_failures():
    records = [
        record(0, (0.90, 0.90, 0.90)),  # mean .90 worst .90
        record(1, (1.00, 1.00, 0.70)),  # mean .90 worst .70: dominated by 0
        record(2, (1.05, 1.00, 0.80)),  # mean .95 worst .80
        record(3, (0.60, 0.60, 0.60)),  # dominated
        record(4, state="FAIL", error="boom"),
        record(5, (1.05, 1.00, 0.80)),  # duplicate of 2: kept, after it
    ]
    front = optimized_front(records, ["mean", "worst"])
    assert [r.number for r in front] == [2, 5, 0]


def test_optimized_front_minimises_sparsity():
    objectives = ("mean", "sparsity")
    records = [
        record(0, (0.9, 0.9, 0.9), density=1.0, objectives=objectives),
        record(1, (0.9, 0.9, 0.9), density=0.3, objectives=objectives),  # dominates 0: same mean, sparser
        record(2, (0.8, 0.8, 0.8), density=0.1, objectives=objectives),
        record(3, (0.7, 0.7, 0.7), density=0.2, objectives=objectives),  # dominated by 2
    ]
    assert [r.number for r in optimized_front(records, list(objectives))] == [1, 2]
    with pytest.raises(ValueError, match="unknown objective"):
        optimized_front(records, ["accuracy"])


def test_per_task_front_keeps_every_trade_off():
    records = [
        record(0, (1.0, 0.5, 0.5)),
        record(1, (0.5, 1.0, 0.5)),
        record(2, (0.5, 0.5, 1.0)),
        record(3, (0.5, 0.5, 0.5)),  # dominated by each of the above
        record(4, (0.9, 0.9, 0.9)),  # best mean, on the front
        record(5, (0.9, 0.8, 0.9)),  # dominated by 4
        record(6, state="FAIL", error="oom"),
    ]
    assert [r.number for r in per_task_front(records)] == [4, 0, 1, 2]
    assert per_task_front([record(0, state="FAIL")]) == []


# ---- selection ------------------------------------------------------------------------------------
def ranking_records() -> list[TrialRecord]:
    return [
        record(0, (0.90, 0.90, 0.90)),  # mean .900 worst .90
        record(1, (1.00, 1.00, 0.70)),  # mean .900 worst .70
        record(2, (1.10, 1.00, 0.75)),  # mean .950 worst .75
        record(3, (0.95, 0.95, 0.95), feasible=False),  # best on both, but infeasible
        record(4, (0.90, 0.90, 0.90)),  # ties with 0 on everything: later number
        record(5, state="FAIL", error="nan"),
    ]


def test_rank_finalists_best_mean_feasible():
    ranked = rank_finalists(ranking_records(), "best_mean_feasible", 10)
    # mean desc, ties by worst desc then trial number; the infeasible one after all feasible ones
    assert [r.number for r in ranked] == [2, 0, 4, 1, 3]
    assert [r.number for r in rank_finalists(ranking_records(), "best_mean_feasible", 2)] == [2, 0]


def test_rank_finalists_best_worst_feasible():
    ranked = rank_finalists(ranking_records(), "best_worst_feasible", 4)
    assert [r.number for r in ranked] == [0, 4, 2, 1]


def test_rank_finalists_when_no_candidate_is_feasible():
    floors = {t: 0.8 for t in TASKS}
    records = [
        record(0, (1.00, 1.00, 0.50), feasible=False),  # violation .30, mean .833
        record(1, (0.79, 0.79, 0.79), feasible=False),  # violation .03, mean .79
        record(2, (0.70, 0.90, 0.95), feasible=False),  # violation .10, mean .850
        record(3, (0.95, 0.95, 0.78), feasible=False),  # violation .02, mean .893
        record(4, state="FAIL"),
    ]
    ranked = rank_finalists(records, "best_mean_feasible", 3, floors=floors)
    assert [r.number for r in ranked] == [3, 1, 2]
    # without floors the violation is unknown (0): the rule alone ranks them
    assert [r.number for r in rank_finalists(records, "best_mean_feasible", 4)] == [3, 2, 0, 1]
    assert [r.number for r in rank_finalists(records, "best_worst_feasible", 4)] == [1, 3, 2, 0]


def test_rank_finalists_means_equal_up_to_float_noise_tie():
    # mean(0.5, 0.6, 1.0) exceeds mean(0.7, 0.7, 0.7) in the last bit only: a tie, the worst score decides
    records = [record(0, (0.5, 0.6, 1.0)), record(1, (0.7, 0.7, 0.7))]
    assert [r.number for r in rank_finalists(records, "best_mean_feasible", 2)] == [1, 0]


def test_rank_finalists_rejects_unknown_rule_and_bad_k():
    with pytest.raises(ValueError, match="selection rule"):
        rank_finalists(ranking_records(), "best_median", 3)
    with pytest.raises(ValueError, match="k must be"):
        rank_finalists(ranking_records(), "best_mean_feasible", 0)


def test_choose_uses_search_scores_without_rescores():
    finalists = rank_finalists(ranking_records(), "best_mean_feasible", 3)  # 2, 0, 4
    assert choose(finalists, None, "best_mean_feasible") == 0
    assert finalists[choose(finalists, None, "best_worst_feasible")].number == 0  # worst .90 beats .75


def test_choose_rescoring_changes_the_choice():
    finalists = rank_finalists(ranking_records(), "best_mean_feasible", 3)  # 2, 0, 4
    rescored = [
        {"sst2": 0.85, "mnli": 0.85, "topic": 0.70},  # trial 2 overfitted its validation examples
        {"sst2": 0.92, "mnli": 0.90, "topic": 0.88},
        {"sst2": 0.92, "mnli": 0.90, "topic": 0.88},  # ties with trial 0 on held-out and search: 0 wins
    ]
    assert finalists[choose(finalists, rescored, "best_mean_feasible")].number == 0
    # held-out ties broken by the search scores: trial 2 (search mean .95) beats trial 0
    tied = [{"normalized": dict.fromkeys(TASKS, 0.9), "scores": {}}] * 3
    assert finalists[choose(finalists, tied, "best_mean_feasible")].number == 2
    # a failed re-score ranks after every re-scored finalist
    assert finalists[choose(finalists, [None, rescored[2], rescored[1]], "best_mean_feasible")].number == 0


def test_choose_prefers_feasible_finalists_and_checks_alignment():
    finalists = [record(3, (0.99, 0.99, 0.99), feasible=False), record(0, (0.80, 0.80, 0.80))]
    assert choose(finalists, None, "best_mean_feasible") == 1
    all_infeasible = [record(3, (0.99, 0.99, 0.99), feasible=False), record(0, (0.8, 0.8, 0.8), feasible=False)]
    assert choose(all_infeasible, None, "best_mean_feasible") == 0
    with pytest.raises(ValueError, match="re-score"):
        choose(finalists, [{}], "best_mean_feasible")
    with pytest.raises(ValueError, match="no finalists"):
        choose([], None, "best_mean_feasible")


# ---- result files ---------------------------------------------------------------------------------
def test_write_results_writes_every_file(tmp_path):
    records = [*ranking_records(), record(6, (0.5, 0.5, 0.5), method="task_arithmetic", density=1.0)]
    objectives = ["mean", "worst"]
    front = optimized_front(records, objectives)
    task_front = per_task_front(records)
    finalists = rank_finalists(records, "best_mean_feasible", 3)
    rescored = [
        {"normalized": {"sst2": 0.85, "mnli": 0.85, "topic": 0.70}, "scores": {"sst2": 0.8, "mnli": 0.7, "topic": 0.6}},
        {"normalized": {"sst2": 0.92, "mnli": 0.90, "topic": 0.88}, "scores": {"sst2": 0.9, "mnli": 0.8, "topic": 0.7}},
        None,
    ]
    chosen_index = choose(finalists, rescored, "best_mean_feasible")
    test_scores = {
        "normalized": {"sst2": 0.9, "mnli": 0.95, "topic": 0.85},
        "scores": {"sst2": 0.81, "mnli": 0.76, "topic": 0.7},
    }
    meta = {
        "budget": {"candidates": 7},
        "optimizer": "TPE (multivariate, constant liar)",
        "rule": "best_mean_feasible",
        "evaluations": {"search": 7, "rescore": 2, "test": 1},
        "overhead": {"overhead_fraction": np.float64(0.012)},
        "references": {"sst2": 0.9, "mnli": {"test": 0.8}, "topic": 0.82},
    }
    summary = write_results(
        tmp_path,
        records=records,
        objectives=objectives,
        front=front,
        task_front=task_front,
        finalists=finalists,
        rescored=rescored,
        chosen_index=chosen_index,
        test_scores=test_scores,
        meta=meta,
    )
    for name in [
        "candidates.csv",
        "candidates.json",
        "front.json",
        "front_per_task.json",
        "summary.json",
        "summary.md",
    ]:
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "chosen" / "recipe.yaml").is_file() and (tmp_path / "chosen" / "scores.json").is_file()

    with (tmp_path / "candidates.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == [r.number for r in records]
    for column in ["state", "method", "objective.mean", "objective.worst", "mean_normalized", "worst_normalized",
                   "density", "timing.merge", "timing.eval", "worker", "error"]:  # fmt: skip
        assert column in rows[0], column
    for task in TASKS:
        assert f"normalized.{task}" in rows[0] and f"score.{task}" in rows[0]
    assert float(rows[2]["mean_normalized"]) == pytest.approx(0.95)
    assert float(rows[2]["score.sst2"]) == pytest.approx(0.99)
    assert rows[5]["state"] == "FAIL" and rows[5]["error"] == "nan" and rows[5]["mean_normalized"] == ""
    assert len(json.loads((tmp_path / "candidates.json").read_text())) == len(records)

    front_files = sorted((tmp_path / "front").glob("*.yaml"))
    assert [p.name for p in front_files] == [f"{i:02d}-trial{r.number:04d}.yaml" for i, r in enumerate(front, 1)]
    for path, rec in zip(front_files, front, strict=True):
        assert Recipe.load(path).to_dict() == rec.recipe
    assert json.loads((tmp_path / "front.json").read_text())["trials"] == [r.number for r in front]
    assert json.loads((tmp_path / "front_per_task.json").read_text())["trials"] == [r.number for r in task_front]

    chosen = finalists[chosen_index]
    assert chosen.number == 0
    assert Recipe.load(tmp_path / "chosen" / "recipe.yaml").to_dict() == chosen.recipe
    scores = json.loads((tmp_path / "chosen" / "scores.json").read_text())
    assert scores["trial"] == 0
    assert scores["heldout"]["mean_normalized"] == pytest.approx(0.9)
    assert scores["test"]["scores"]["mnli"] == pytest.approx(0.76)
    assert scores["test"]["mean_normalized"] == pytest.approx(0.9)
    assert scores["search"]["normalized"] == chosen.normalized

    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["chosen"]["trial"] == 0 and summary["any_feasible"]
    assert [f["chosen"] for f in summary["finalists"]] == [False, True, False]
    assert summary["finalists"][2]["heldout"] is None
    assert summary["references"] == {"sst2": 0.9, "mnli": 0.8, "topic": 0.82}
    markdown = (tmp_path / "summary.md").read_text()
    assert "## Finalists" in markdown and "**chosen**" in markdown
    assert (
        "optimizer: TPE (multivariate, constant liar)" in markdown and "overhead.overhead_fraction: 0.0120" in markdown
    )
    assert "| mnli | 0.9000 | 0.9000 | 0.7600 | 0.8000 | 0.9500 |" in markdown

    text = render(summary_table(summary))
    assert "→" in text and "0.9500" in text and "0.9000" in text

    # The generalisation gap: the chosen recipe's mean normalised score per split, and the drop from search.
    search_mean = float(np.mean(list(chosen.normalized.values())))
    gap = summary["generalization"]
    assert gap["search"] == pytest.approx(search_mean)
    assert gap["heldout"] == pytest.approx((0.92 + 0.90 + 0.88) / 3) and gap["test"] == pytest.approx(0.9)
    assert gap["search_to_heldout"] == pytest.approx(gap["heldout"] - search_mean)
    assert gap["search_to_test"] == pytest.approx(0.9 - search_mean)
    drop = f"{0.9 - search_mean:+.4f}"
    line = f"search {search_mean:.4f} → held-out 0.9000 ({drop}) → test 0.9000 ({drop})"
    assert line in markdown and line in " ".join(text.split())  # the table's caption wraps


def test_write_results_without_rescores_or_choice_and_replaces_stale_front(tmp_path):
    stale = tmp_path / "front" / "01-trial0999.yaml"
    stale.parent.mkdir()
    stale.write_text("old")
    failed = [record(0, state="FAIL", error="x"), record(1, state="FAIL", error="y")]
    summary = write_results(
        tmp_path, records=failed, objectives=["mean"], front=[], task_front=[], finalists=[], rescored=None,
        chosen_index=None, test_scores=None, meta={},
    )  # fmt: skip
    assert not stale.exists() and not (tmp_path / "chosen").exists()
    assert summary["chosen"] is None and summary["counts"] == {"candidates": 2, "fail": 2}
    assert "nothing was chosen" in (tmp_path / "summary.md").read_text()


def test_summary_says_when_no_candidate_met_the_floors(tmp_path):
    records = [record(0, (0.7, 0.9, 0.9), feasible=False), record(1, (0.6, 0.9, 0.9), feasible=False)]
    finalists = rank_finalists(records, "best_mean_feasible", 2, floors=dict.fromkeys(TASKS, 0.8))
    summary = write_results(
        tmp_path, records=records, objectives=["mean", "worst"], front=optimized_front(records, ["mean", "worst"]),
        task_front=per_task_front(records), finalists=finalists, rescored=None, chosen_index=0, test_scores=None,
        meta={},
    )  # fmt: skip
    assert not summary["any_feasible"]
    assert "No candidate met the floors" in (tmp_path / "summary.md").read_text()
    assert "no candidate met the floors" in render(summary_table(summary))


# ---- status ---------------------------------------------------------------------------------------
def render(renderable) -> str:
    console = Console(record=True, width=160)
    console.print(renderable)
    return console.export_text()


def build_study(path: Path) -> optuna.Study:
    """A journal study as the loop leaves it mid-search: 3 complete, 1 failed, 1 running, 1 waiting."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="glue-ties", storage=open_storage(path), directions=["maximize"] * 2)
    study.set_user_attr("objectives", ["mean", "worst"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["mean", "worst"])
    study.set_user_attr("budget", {"candidates": 20, "seconds": None})
    study.set_user_attr("optimizer", "TPE (multivariate)")
    outcomes = [((0.95, 0.92, 0.90), True), ((1.0, 1.0, 0.79), False), ((0.91, 0.90, 0.89), True)]
    for i, (normalized, feasible) in enumerate(outcomes):
        trial = study.ask()
        scores = dict(zip(TASKS, normalized, strict=True))
        trial.set_user_attr("recipe", recipe(weight=0.2 + i / 10))
        trial.set_user_attr("scores", {t: 0.9 * v for t, v in scores.items()})
        trial.set_user_attr("normalized", scores)
        trial.set_user_attr("feasible", feasible)
        trial.set_user_attr("worker", "local-0")
        trial.set_user_attr("timing", {"merge": 0.1, "eval": 1.0})
        for task, value in scores.items():
            trial.set_constraint(f"floor:{task}", 0.8 - value)
        study.tell(trial, [float(np.mean(normalized)), min(normalized)])
    trial = study.ask()
    trial.set_user_attr("recipe", recipe(method="pcb"))
    trial.set_user_attr("error", "CUDA out of memory while merging\ntraceback...")
    trial.set_user_attr("evaluated", True)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    study.ask()  # running: its worker is still evaluating
    study.enqueue_trial({"method": "ties"})  # waiting
    return study


def test_status_report_on_a_running_journal_study(tmp_path):
    path = tmp_path / "search.journal"
    build_study(path)
    text = render(status_report(str(path), None, top=5))
    assert "glue-ties" in text
    assert "3 complete · 1 failed · 1 running · 1 waiting" in text
    assert (
        "best feasible mean" in text and "0.9233 (trial 0, ties)" in text
    )  # trial 1 has a higher mean but is infeasible
    assert "4 / 20 candidates" in text and "TPE (multivariate)" in text
    assert "Optimised front: 2 point(s)" in text
    assert "CUDA out of memory while merging" in text and "traceback" not in text
    # the front shows each task's normalised score
    assert "1.0000" in text and "0.7900" in text and "sst2" in text
    # the output folder works as well as the journal file, and the storage was not written to
    size = path.stat().st_size
    assert "3 complete" in render(status_report(str(tmp_path), "glue-ties", top=1))
    assert path.stat().st_size == size
    assert len(read_records(optuna.load_study(study_name="glue-ties", storage=open_storage(path)))) == 4


def test_generalisation_gap_is_each_split_minus_the_search_split():
    chosen = {split: {"mean_normalized": v} for split, v in (("search", 0.97), ("heldout", 0.95), ("test", 0.99))}
    gap = generalization(chosen)
    assert gap == pytest.approx(
        {"search": 0.97, "heldout": 0.95, "test": 0.99, "search_to_heldout": -0.02, "search_to_test": 0.02}
    )
    line = generalization_line({"generalization": gap})
    assert line.endswith("search 0.9700 → held-out 0.9500 (-0.0200) → test 0.9900 (+0.0200)")
    no_holdout = generalization({**chosen, "heldout": None})
    assert no_holdout["heldout"] is None and no_holdout["search_to_heldout"] is None
    assert "held-out" not in generalization_line({"generalization": no_holdout})
    assert generalization(None) is None and generalization_line({}) is None


def test_status_of_a_finished_search_shows_its_generalisation_gap(tmp_path):
    path = tmp_path / "search.journal"
    build_study(path)
    assert "generalisation" not in render(status_report(str(path), None, top=3))  # not finished: no summary yet
    gap = {"search": 0.97, "heldout": 0.95, "test": 0.94, "search_to_heldout": -0.02, "search_to_test": -0.03}
    (tmp_path / "summary.json").write_text(json.dumps({"generalization": gap}))
    text = render(status_report(str(tmp_path), None, top=3))
    assert "search 0.9700 → held-out 0.9500 (-0.0200) → test 0.9400 (-0.0300)" in text
    (tmp_path / "summary.json").write_text("{")
    with pytest.raises(MergetuneError, match=r"summary\.json: not readable as JSON"):
        status_report(str(path), None, top=3)


def test_status_report_without_budget_or_optimizer_and_a_partly_written_line(tmp_path):
    path = tmp_path / "search.journal"
    study = optuna.create_study(study_name="bare", storage=open_storage(path), directions=["maximize"])
    study.enqueue_trial({})
    with path.open("a") as f:
        f.write('{"op_code": 4, "worker_id"')  # another process is mid-write
    text = render(status_report(str(path), None, top=3))
    assert "not recorded" in text and "0 complete · 0 failed · 0 running · 1 waiting" in text
    assert "no completed candidate yet" in text


def test_status_report_errors(tmp_path):
    with pytest.raises(SearchStorageError, match="no search storage"):
        status_report(str(tmp_path / "nowhere.journal"), None, 5)
    assert not (tmp_path / "nowhere.journal").exists()  # not created by asking
    (tmp_path / "empty.journal").touch()
    with pytest.raises(SearchStorageError, match="empty"):
        status_report(str(tmp_path / "empty.journal"), None, 5)
    path = tmp_path / "search.journal"
    build_study(path)
    with pytest.raises(SearchStorageError, match="no search named 'other'"):
        status_report(str(path), "other", 5)


def test_cli_status(tmp_path):
    path = tmp_path / "search.journal"
    build_study(path)
    result = runner.invoke(app, ["status", str(path), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "3 complete" in result.output and "0.9233" in result.output
    result = runner.invoke(app, ["status", str(path), "--study", "glue-ties"])
    assert result.exit_code == 0, result.output


def test_cli_status_on_a_missing_storage(tmp_path):
    result = runner.invoke(app, ["status", str(tmp_path / "missing" / "search.journal")])
    assert result.exit_code == 2
    assert "error:" in result.output and "no search storage at" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "missing").exists()
