"""The statistics of benchmarks/search_quality.py: mean ± sd, the paired bootstrap, the cost to the chosen recipe."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "search_quality.py"
# search_quality imports its sibling benchmark modules (evolve_peer) by name, as it does when run as a script;
# without this the file passed only when another test had put benchmarks/ on the path first.
if str(_PATH.parent) not in sys.path:
    sys.path.insert(0, str(_PATH.parent))
_SPEC = importlib.util.spec_from_file_location("search_quality", _PATH)
sq = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sq)


def test_mean_sd_by_hand() -> None:
    mean, sd = sq.mean_sd([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert sd == pytest.approx(math.sqrt(5 / 3))  # squared deviations 2.25+0.25+0.25+2.25 = 5 over n-1 = 3
    assert sq.mean_sd([None, 2.0, float("nan")]) == (2.0, None)
    assert sq.mean_sd([]) == (None, None)


def test_bootstrap_observed_difference_by_hand() -> None:
    a = {"t": [1, 0, 1, 1], "u": [1, 1]}
    b = {"t": [0, 0, 1, 0], "u": [1, 1]}
    # t: scale 2 × mean([1, 0, 0, 1]) = 1.0; u: 0; averaged over the two tasks: 0.5
    observed, low, high = sq.paired_bootstrap(a, b, {"t": 2.0, "u": 1.0}, resamples=500, seed=0)
    assert observed == pytest.approx(0.5)
    assert 0.0 <= low <= observed <= high <= 1.0  # t's resampled difference lies in [0, 2], u's is 0


def test_bootstrap_constant_difference_has_no_spread() -> None:
    observed, low, high = sq.paired_bootstrap({"t": [1, 1, 1]}, {"t": [0, 0, 0]}, {"t": 0.5}, resamples=200)
    assert observed == low == high == pytest.approx(0.5)


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 2000).tolist(), rng.integers(0, 2, 2000).tolist()
    diff = np.asarray(a, float) - np.asarray(b, float)
    observed, low, high = sq.paired_bootstrap({"t": a}, {"t": b}, {"t": 1.0}, resamples=4000, seed=3)
    half = 1.96 * diff.std(ddof=1) / math.sqrt(diff.size)
    assert observed == pytest.approx(diff.mean())
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert low < observed < high


def test_bootstrap_is_deterministic_given_a_seed() -> None:
    rng = np.random.default_rng(0)
    a, b, scale = {"t": rng.random(50).tolist()}, {"t": rng.random(50).tolist()}, {"t": 1.0}
    first = sq.paired_bootstrap(a, b, scale, resamples=300, seed=7)
    assert sq.paired_bootstrap(a, b, scale, resamples=300, seed=7) == first
    assert sq.paired_bootstrap(a, b, scale, resamples=300, seed=8) != first


def test_bootstrap_refuses_different_test_sets() -> None:
    with pytest.raises(ValueError, match="task t: 3 vs 2 test examples"):
        sq.paired_bootstrap({"t": [1, 0, 1]}, {"t": [1, 0]}, {"t": 1.0})


def test_cost_to_chosen_counts_trials_up_to_the_chosen_one() -> None:
    candidates = [
        {"number": 0, "timing": {"merge": 1.0, "eval": 2.0}, "fidelity": {"examples": {"t": 10, "u": 10}}},
        {"number": 1, "timing": {"merge": 1.0, "eval": 1.0}, "fidelity": {"examples": {"t": 5, "u": 0}}},
        {"number": 2, "timing": {"merge": 1.0, "eval": 9.0}, "error": "interrupted: killed", "fidelity": None},
        {"number": 3, "timing": {"merge": 0.5, "eval": 0.5}, "fidelity": {"examples": {"t": 10, "u": 10}}},
        {"number": 4, "timing": {"merge": 5.0, "eval": 5.0}, "fidelity": {"examples": {"t": 10, "u": 10}}},
    ]
    assert sq.cost_to_chosen(candidates, 3) == {"cands_to": 3, "wall_to": 6.0, "examples_to": 45}
    no_racing = [{**c, "fidelity": None} for c in candidates]
    assert sq.cost_to_chosen(no_racing, 1)["examples_to"] is None
    assert sq.cost_to_chosen(candidates, None)["cands_to"] is None


def test_best_peer_is_the_highest_mean_test_other_than_default() -> None:
    rows = [
        {"protocol": "default", "seed": 0, "test": 0.99, "heldout": 0.9},
        {"protocol": "random", "seed": 0, "test": 0.90, "heldout": 0.9},
        {"protocol": "random", "seed": 1, "test": 0.96, "heldout": 0.9},
        {"protocol": "ngopt_pcb", "seed": 0, "test": 0.94, "heldout": 0.9},
    ]
    summary = sq.seed_summary(rows)
    assert [s["protocol"] for s in summary] == ["default", "random", "ngopt_pcb"]
    assert summary[1]["test"][0] == pytest.approx(0.93)
    assert sq.best_peer(summary) == "ngopt_pcb"  # 0.94 beats random's mean 0.93


# ---- per-example test outcomes and the slopes of the normalised score ---------------------------------------
def _summary(scores: dict, rules: dict, expert: dict, base: dict | None = None) -> dict:
    normalized = {t: 0.0 for t in scores}  # only the task names are read
    return {
        "chosen": {"test": {"scores": scores, "normalized": normalized}},
        "meta": {
            "normalization": {t: {"rule": r} for t, r in rules.items()},
            "references": {t: {"test": v} for t, v in expert.items()},
            "base_references": {t: {"test": v} for t, v in (base or {}).items()},
        },
    }


def test_values_in_score_units_and_older_loss_sums_rescaled(tmp_path: Path) -> None:
    # acc: a mean of 0/1; loss: older files kept per-example −NLL sums, score = −Σ NLL / Σ tokens
    (tmp_path / sq.TEST_EXAMPLES).write_text(json.dumps({"acc": [1, 0, 1, 1], "loss": [-20.0, -40.0]}))
    summary = _summary({"acc": 0.75, "loss": -3.0}, {"acc": "merged/expert", "loss": "gain_kept"}, {})
    values = sq.test_values(tmp_path, summary)
    assert values["acc"] == [1, 0, 1, 1]
    assert values["loss"] == pytest.approx([-2.0, -4.0])  # scaled by score / mean = −3 / −30
    # an accuracy-normalised task whose mean is not its score (a macro-F1's correctness proxy) is refused
    summary["chosen"]["test"]["scores"]["acc"] = 0.7
    with pytest.raises(SystemExit, match="acc"):
        sq.test_values(tmp_path, summary)


def test_score_slopes_give_the_normalised_difference_of_two_scores() -> None:
    """slope × (score a − score b) = normalised a − normalised b, with mergetune's own normalisation."""
    from mergetune.objectives.normalization import Normalization

    expert, base = {"acc": 0.785, "loss": -5.26}, {"loss": -5.7566}
    rules = {"acc": "merged/expert", "loss": "gain_kept"}
    slopes = sq.score_slopes(_summary({"acc": 0.7, "loss": -5.4}, rules, expert, base))
    norms = {"acc": Normalization("acc", "accuracy", "expert"), "loss": Normalization("loss", "neg_loss", "expert")}
    for task, (a, b) in {"acc": (0.745, 0.70), "loss": (-5.41, -5.50)}.items():
        assert norms[task].rule == rules[task]
        na = norms[task].apply(a, expert=expert[task], base=base.get(task))
        nb = norms[task].apply(b, expert=expert[task], base=base.get(task))
        assert slopes[task] * (a - b) == pytest.approx(na - nb, rel=1e-12)
    with pytest.raises(SystemExit, match="perplexity/base"):
        sq.score_slopes(_summary({"ppl": -3.0}, {"ppl": "perplexity/base"}, {"ppl": 1.0}))
