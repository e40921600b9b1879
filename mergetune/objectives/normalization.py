"""What a task's normalised score means: the rule per metric direction and what it is measured against.

A search optimises normalised scores, so that tasks with different metrics share one scale where
1 is the level of the task's reference. Each task says what it is normalised against (its config's
``normalize``; default ``expert`` for a task with an expert, ``base`` for a guard task without one):

===========  =====================================  =================================================
against      accuracy-like metric (higher better)   loss (``neg_loss``, ``neg_entropy``)
===========  =====================================  =================================================
``expert``   ``merged / expert``                    share of the expert's gain kept:
                                                    ``(base − merged) / (base − expert)`` in losses
``chance``   ``(merged − chance) / (expert −        refused (a loss has no chance level)
             chance)``; accuracy only
``base``     ``merged / base``                      ``base perplexity / merged perplexity`` =
                                                    ``exp(base loss − merged loss)``
``none``     the task is scored and shown in its own units and left out of the objectives and floors
===========  =====================================  =================================================

Why the share of the gain for losses: the older ratio ``expert loss / merged loss`` squeezes every
score toward 1 (an untouched base read 0.958 and passed a 0.8 floor), while the share of the gain is
1 at the expert, 0 at the base and negative below the base, so a floor of 0.8 means "keeps 80% of
what fine-tuning gained". It needs the base's score on the task (measured once, cached like the
experts'); an expert no better than the base makes it undefined, which is an error.

Guard tasks (``against: base``) read 1 at the base's level and below 1 when the merge is worse:
``merged / base`` for an accuracy (0.95 = 5% fewer right answers), and for a loss the ratio of
perplexities (0.95 = perplexity 1/0.95 ≈ 5.3% above the base's).

Chance, by choice the uniform-guess rate: ``1 / number of labels`` for classification and the
mean of ``1 / number of choices`` over the scored examples for multiple choice. It is a property of
the task, known before anything is scored and the same on every split (a majority-class rate would
change with each split's label balance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from mergetune.errors import TaskError

Against = Literal["expert", "base", "chance", "none"]
AGAINST: tuple[str, ...] = get_args(Against)
#: Metrics that are a negated loss (score = −loss): normalised by the share of the gain kept.
NEGATED_LOSSES = frozenset({"neg_loss", "neg_entropy"})
#: Any ``neg_<name>`` metric is a negated lower-is-better metric too (lm-eval's ``neg_word_perplexity``, ...).
NEGATED_PREFIX = "neg_"
#: Metrics with a chance level (the uniform-guess rate).
CHANCE_METRICS = frozenset({"accuracy"})

#: Each rule's formula, as shown in reports, status and model cards.
FORMULAS = {
    "merged/expert": "merged / expert",
    "gain_kept": "share of the expert's gain kept: (base loss − merged loss) / (base loss − expert loss)",
    "chance_corrected": "(merged − chance) / (expert − chance), chance = uniform guess",
    "merged/base": "merged / base",
    "perplexity/base": "base perplexity / merged perplexity = exp(base loss − merged loss)",
    "base/merged": "base / merged, of a lower-is-better metric (a perplexity: base perplexity / merged perplexity)",
    "none": "not normalised (own units; not in the objectives)",
    # the rule of runs made before the share of the gain, kept to recognise them on resume
    "expert_loss/merged_loss": "expert loss / merged loss (older versions)",
}


@dataclass(frozen=True)
class Normalization:
    """How one task's score is normalised: against what, and the resulting rule for its metric."""

    task: str
    metric: str
    against: Against

    @property
    def loss(self) -> bool:
        return self.metric in NEGATED_LOSSES or self.metric.startswith(NEGATED_PREFIX)

    @property
    def rule(self) -> str:
        """The rule's key in ``FORMULAS``."""
        if self.against == "none":
            return "none"
        if self.against == "chance":
            return "chance_corrected"
        if self.against == "base":
            if self.loss:  # a log-loss turns into a perplexity ratio; a perplexity-like metric is one already
                return "perplexity/base" if self.metric in NEGATED_LOSSES else "base/merged"
            return "merged/base"
        return "gain_kept" if self.loss else "merged/expert"

    @property
    def formula(self) -> str:
        return FORMULAS[self.rule]

    @property
    def needs_expert(self) -> bool:
        return self.against in ("expert", "chance")

    @property
    def needs_base(self) -> bool:
        return self.against == "base" or (self.against == "expert" and self.loss)

    @property
    def needs_chance(self) -> bool:
        return self.against == "chance"

    def describe(self) -> dict[str, Any]:
        """A JSON description (stored with a search, shown by status, report and model card)."""
        return {"against": self.against, "metric": self.metric, "rule": self.rule, "formula": self.formula}

    def check(self, *, expert: float | None, base: float | None, chance: float | None) -> None:
        """Raise a TaskError naming the task unless the references make this rule defined."""
        missing = [
            name
            for name, needed, value in (
                ("expert", self.needs_expert, expert),
                ("base", self.needs_base, base),
                ("chance", self.needs_chance, chance),
            )
            if needed and value is None
        ]
        if missing:
            raise TaskError(f"task '{self.task}': normalised as {self.formula}, but no {' or '.join(missing)} score")
        for name, value in (("expert", expert), ("base", base), ("chance", chance)):
            if value is not None and not math.isfinite(value):
                raise TaskError(f"task '{self.task}': the {name} {self.metric} is {value}: it cannot normalise")
        self._check_defined(expert, base, chance)

    def _check_defined(self, expert: float | None, base: float | None, chance: float | None) -> None:
        rule = self.rule
        if rule == "gain_kept" and expert is not None and base is not None and expert - base <= 0:
            raise TaskError(
                f"task '{self.task}': the expert's loss ({-expert:.6g}) is not below the base's ({-base:.6g}), so "
                "the share of its gain a merge keeps is undefined; check that the expert was trained on this task, "
                "or set 'normalize: base' for it"
            )
        if rule == "chance_corrected" and expert is not None and chance is not None and expert <= chance:
            raise TaskError(
                f"task '{self.task}': the expert's {self.metric} ({expert:.6g}) is not above chance ({chance:.6g}); "
                "a chance-corrected score is undefined: use 'normalize: expert'"
            )
        if rule == "base/merged" and base is not None and base >= 0:
            raise TaskError(
                f"task '{self.task}': the base's {self.metric} is {base}, so {self.formula} is undefined "
                "(a lower-is-better value must be above 0); pick another metric"
            )
        positive = {"merged/expert": expert, "merged/base": base}.get(rule)
        if positive is not None and positive <= 0:
            raise TaskError(
                f"task '{self.task}': the {self.against}'s reference {self.metric} is {positive}, so {self.formula} is "
                "undefined (it must be above 0); pick another metric"
            )

    def apply(
        self, score: float, *, expert: float | None, base: float | None = None, chance: float | None = None
    ) -> float | None:
        """The normalised score (None for ``none``); references as checked by :meth:`check`."""
        rule = self.rule
        if rule == "none":
            return None
        if rule == "merged/expert":
            return score / _given(expert)
        if rule == "gain_kept":  # scores are −loss: (merged − base) / (expert − base) = (L_b − L_m) / (L_b − L_e)
            return (score - _given(base)) / (_given(expert) - _given(base))
        if rule == "chance_corrected":
            return (score - _given(chance)) / (_given(expert) - _given(chance))
        if rule == "merged/base":
            return score / _given(base)
        if rule == "base/merged":  # both negated: (−base) / (−merged) = base value / merged value
            return _given(base) / min(score, -1e-12)
        return math.exp(min(score - _given(base), 700.0))  # exp(L_b − L_m); capped: exp overflows past ~709


def _given(value: float | None) -> float:
    if value is None:  # guarded by Normalization.check before any score is normalised
        raise TaskError("a reference score is missing")
    return value


def default_against(has_expert: bool) -> Against:
    """A task with an expert is normalised against it; a guard task (no expert) against the base."""
    return "expert" if has_expert else "base"


def normalization_of(name: str, metric: str, normalize: str | None, *, has_expert: bool) -> Normalization:
    """A task's normalisation from its config's ``normalize`` (None: the default) and whether it has an expert.

    Errors name the task: an unknown ``normalize``, ``chance`` on a metric without a chance level
    or on a loss, and ``expert``/``chance`` on a task without an expert.
    """
    against = normalize or default_against(has_expert)
    if against not in AGAINST:
        raise TaskError(f"task '{name}': normalize '{against}' is unknown; use one of {list(AGAINST)}")
    if against == "chance" and metric not in CHANCE_METRICS:
        raise TaskError(
            f"task '{name}': normalize 'chance' needs a metric with a chance level ({sorted(CHANCE_METRICS)}), "
            f"not '{metric}'; use 'expert' or 'base'"
        )
    if against in ("expert", "chance") and not has_expert:
        raise TaskError(
            f"task '{name}': normalize '{against}' needs an expert, and the task has none; name one with "
            "'expert:', or use 'normalize: base' (a guard task: no worse than the base)"
        )
    return Normalization(name, metric, against)  # type: ignore[arg-type]


def legacy_rule(metric: str) -> str:
    """The rule every task of a run made before per-task normalisation used (expert ratio, or loss ratio)."""
    return "expert_loss/merged_loss" if metric in NEGATED_LOSSES else "merged/expert"
