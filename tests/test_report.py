"""The report and the merged model of a search's points, on a run folder written by the search's own writers.

The run is built with ``results.write_results`` (the files a search leaves), the fronts and finalists
from ``pareto``, and an Optuna journal with the trials' real start and end times, over the tiny BERT
models of conftest, so the report reads exactly what a search writes and a point can be merged.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from conftest import ModelDirs
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.export.card import RunFolderError, run_point
from mergetune.export.report import write_report
from mergetune.export.report_data import Candidate, best_so_far, conflicting_pairs, load_run
from mergetune.export.report_figures import frontier
from mergetune.merging.save import model_card
from mergetune.recipe import Recipe
from mergetune.search import pareto
from mergetune.search.records import TrialRecord
from mergetune.search.results import write_results
from mergetune.search.storage import open_storage

FIGURES = ("front_objectives", "front_pairs", "parallel", "convergence", "heatmap", "scores")
NAME = "report-test"
STEP = 10.0  # seconds per trial in the journal: trial k ends STEP * (k + 1) after the first starts


def record(number: int, models: ModelDirs, x: float) -> TrialRecord:
    """A completed candidate: sst2 = x, mnli = 1.1 − x (they conflict), topic barely related to either."""
    base, experts = models
    normalized = {"sst2": x, "mnli": 1.1 - x, "topic": 0.8 + 0.05 * (number * 7 % 3)}
    method = "ties" if number % 2 else "task_arithmetic"
    recipe = {
        "base": str(base),
        "experts": [{"name": t, "model": str(p)} for t, p in experts.items()],
        "method": method,
        "weight": {"sst2": [0.2 + x / 2, 0.9], "*": 0.4},
        "density": 0.3 if method == "ties" else 1.0,
    }
    return TrialRecord(
        number=number,
        state="COMPLETE",
        method=method,
        values={"mean": float(np.mean(list(normalized.values()))), "worst": min(normalized.values())},
        scores={t: 0.8 * v for t, v in normalized.items()},
        normalized=normalized,
        feasible=True,
        recipe=recipe,
        timing={"wall": 3.0},
    )


def write_journal(run: Path, records: list[TrialRecord]) -> None:
    """The trials as the loop records them: values, warm starts (trials 0 and 1), start and end times."""
    study = optuna.create_study(
        study_name=NAME, storage=open_storage(run / "search.journal"), directions=["maximize"] * 2
    )
    start = dt.datetime(2025, 1, 1, 12, 0, 0)
    for r in records:
        study.add_trial(
            optuna.trial.FrozenTrial(
                number=r.number,
                state=optuna.trial.TrialState.COMPLETE,
                value=None,
                values=[r.values["mean"], r.values["worst"]],
                datetime_start=start + dt.timedelta(seconds=STEP * r.number),
                datetime_complete=start + dt.timedelta(seconds=STEP * (r.number + 1)),
                params={},
                distributions={},
                user_attrs={"warm_start": True} if r.number < 2 else {},
                system_attrs={},
                intermediate_values={},
                trial_id=r.number,
            )
        )


@pytest.fixture(scope="module")
def run_dir(tiny_bert_dir: ModelDirs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    xs = [0.55, 0.6, 0.95, 0.3, 0.8, 0.7, 0.9, 0.45, 1.0, 0.65]
    records = [record(i, tiny_bert_dir, x) for i, x in enumerate(xs)]
    objectives = ["mean", "worst"]
    front = pareto.optimized_front(records, objectives)
    finalists = pareto.rank_finalists(records, "best_mean_feasible", 3)
    test = {
        "normalized": {"sst2": 0.9, "mnli": 0.2, "topic": 0.95},
        "scores": {"sst2": 0.81, "mnli": 0.18, "topic": 0.9},
    }
    refs = {t: {"search": 0.8, "holdout": 0.79, "test": 0.9} for t in ("sst2", "mnli", "topic")}
    write_results(
        run,
        records=records,
        objectives=objectives,
        front=front,
        task_front=pareto.per_task_front(records),
        finalists=finalists,
        rescored=None,
        chosen_index=0,
        test_scores=test,
        meta={"name": NAME, "optimizer": "tpe", "budget": {"candidates": 10}, "references": refs},
    )
    write_journal(run, records)
    return run


def test_report_has_every_figure_embedded_and_as_png(run_dir: Path, tmp_path: Path) -> None:
    page = write_report(run_dir, tmp_path / "report")
    text = page.read_text()
    for key in FIGURES:
        png = (tmp_path / "report" / f"{key}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000, key
        assert f"<figure id='{key}'><img" in text, key
    assert text.count("src='data:image/png;base64,") == len(FIGURES)
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    assert "0.8100" in text and "baseline: task_arithmetic (trial 0)" in text  # chosen's test, the baselines
    assert "optuna-dashboard" in text and "tpe" in text


def test_report_reads_times_baselines_and_recipe_from_the_run(run_dir: Path) -> None:
    data = load_run(run_dir)
    assert "journal" in data.time_source
    assert [c.elapsed for c in data.candidates] == [STEP * (k + 1) for k in range(10)]
    assert [c.number for c in data.candidates if c.warm_start] == [0, 1]
    assert data.groups == ["embed", "blocks.0", "blocks.1", "head"]  # read from the tiny BERT's headers
    assert data.chosen is not None and data.chosen.method in {"ties", "task_arithmetic"}
    assert conflicting_pairs(data)[0] == ("sst2", "mnli")  # the anti-correlated pair comes first


def test_convergence_and_frontier_helpers() -> None:
    def cand(mean_of: float, feasible: bool = True) -> Candidate:
        return Candidate(0, "ties", feasible, {}, {"a": mean_of}, {}, 0.0, False)

    best = best_so_far([cand(0.5, False), cand(0.4), cand(0.7), cand(0.6), cand(0.9, False)])
    np.testing.assert_array_equal(best, [np.nan, 0.4, 0.7, 0.7, 0.7])
    assert frontier([(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.6)]) == [
        (0.1, 0.9),
        (0.5, 0.6),
        (0.9, 0.1),
    ]


def test_report_without_journal_falls_back_to_timings(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("search.journal", "report"))
    data = load_run(copy)
    assert "timings" in data.time_source and [c.elapsed for c in data.candidates][:3] == [3.0, 6.0, 9.0]
    result = CliRunner().invoke(app, ["report", str(copy), "--pair", "sst2:topic"])
    assert result.exit_code == 0, result.output
    assert (copy / "report" / "index.html").is_file()
    bad = CliRunner().invoke(app, ["report", str(copy), "--pair", "sst2:nope"])
    assert bad.exit_code == 2 and "TASK:TASK" in bad.stderr


def test_report_of_a_folder_that_is_not_a_run_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "summary.json not found" in result.stderr


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium checks the page renders: apt-get install -y chromium"
)
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    page = write_report(run_dir, tmp_path / "report")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    command = ["chromium", *flags, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000"]
    subprocess.run([*command, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = imread(str(shot))[..., :3]
    coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.25  # plot marks; text and tables are grey
    # measured: 5% of the pixels with the figures shown, 0.005% when the images fail to decode
    assert pixels.shape[0] == 3000 and coloured.mean() > 0.01


# ---- merging a point of the run -----------------------------------------------------------------------------
def test_merge_a_front_point_with_its_scores_in_the_card(run_dir: Path, tmp_path: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    result = CliRunner().invoke(
        app, ["merge", str(run_dir), str(tmp_path / "out"), "--point", "2", "--engine", "eager"]
    )
    assert result.exit_code == 0, result.output
    trial = summary["front"][1]
    card = (tmp_path / "out" / "README.md").read_text()
    point = run_point(run_dir, "2")
    assert point.trial == trial and f"front point 2 (trial {trial})" in card
    assert f"| sst2 | {point.scores['sst2']['validation']:.4f} |" in card  # its own validation score
    assert "base_model:" not in card and "library_name: transformers" in card  # local paths stay out of the metadata
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["trial"] == trial
    assert (tmp_path / "out" / "heads" / "sst2.safetensors").is_file()


def test_chosen_point_has_test_scores_and_bad_points_are_refused(run_dir: Path) -> None:
    chosen = run_point(run_dir, "chosen")
    assert chosen.scores["sst2"]["test"] == pytest.approx(0.81) and chosen.scores["sst2"]["expert test"] == 0.9
    for bad, words in (("99", "give --point 1.."), ("best", "give 'chosen'"), ("trial:77", "trial 77 has no recipe")):
        with pytest.raises(RunFolderError, match=words):
            run_point(run_dir, bad)


def test_model_card_metadata_names_hub_ids_only() -> None:
    recipe = Recipe.model_validate(
        {"base": "org/base-model", "experts": [{"name": "a", "model": "/no/such/local/a"}], "method": "task_arithmetic"}
    )
    card = model_card(recipe, SimpleNamespace(task_tensors=[{}]), {"a": {"test": 0.5, "expert test": None}})
    assert (
        "base_model:\n- org/base-model\nbase_model_relation: merge\n" in card and "/no/such" not in card.split("---")[1]
    )
    assert "| task | test | expert test |" in card and "| a | 0.5000 | – |" in card
