"""Optimizer checkpoints as data: the log of the calls an optimizer was made, replayed on resume.

pycma's and Nevergrad's state objects are not data: the only way to store them whole is a pickle,
and unpickling a file from a run folder runs whatever code the file names (issue 12). So an
external optimizer whose state lives in such objects (``cmaes``, the Nevergrad ones) checkpoints
instead the *calls* it was made, as versioned JSON:

- ``{"ask": KEY}``: ``propose()`` returned the point with fingerprint ``KEY`` (``point_key``);
- ``{"tell": N, "key": KEY, "loss": L, "failed": F}``: ``observe()`` got the outcome of the point
  ``KEY`` (the ``N``-th proposal, or ``null`` for a point it did not propose: a warm start, a retry);
- ``{"rebuild": N}``: a resume found no usable checkpoint and rebuilt the optimizer for ``N``
  outcomes of the history (Nevergrad reseeds there);
- ``{"configure": {"batch_size": B, "budget": C}}``: a resume changed the batch or the budget
  (``--workers``, ``--budget``); the optimizer built before keeps its own, as a restored one would.

A resume builds a fresh optimizer with the recorded settings and makes the same calls in the same
order: every draw is seeded by the optimizer's own generator, so it reaches the same state (IPOP
restarts, Nevergrad's pending candidates and its choice of algorithm included). Points are
identified by fingerprint; their values come from the replayed proposals and from the history the
loop reads back from its storage. Each re-asked point is checked against the recorded one: if the
replay diverges (another library build, another platform's arithmetic), it says so in one warning
and the optimizer is rebuilt from the history instead, as when there is no checkpoint at all.

A checkpoint that does not parse, or has a format version this code does not know, is a
``CheckpointError`` naming the file (delete it to rebuild from the history). A ``*.pkl`` in the
folder (what mergetune wrote before) is never read: one warning says it is ignored.
"""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mergetune.search.atomic import write_atomic
from mergetune.search.optimizers._external import CheckpointError, Ledger, point_key, read_json
from mergetune.search.optimizers.base import ExternalOptimizer, History, Outcome, Proposal

log = logging.getLogger(__name__)
FORMAT = "mergetune optimizer checkpoint"
VERSION = 1
Event = dict[str, Any]
EVENT_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "ask": {"ask": (str,)},
    "tell": {"tell": (int, type(None)), "key": (str,), "loss": (float, int), "failed": (bool,)},
    "rebuild": {"rebuild": (int,)},
    "configure": {"configure": (dict,)},
}
CONFIGURE_FIELDS: dict[str, tuple[type, ...]] = {"batch_size": (int,), "budget": (int, type(None))}


# ---- the file ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SavedLog:
    """What a checkpoint file holds, checked: who wrote it, with which settings, and the calls."""

    libraries: dict[str, str]
    settings: dict[str, Any]
    batch_size: int
    budget: int | None
    events: list[Event]


def read_checkpoint(path: Path, libraries: list[str]) -> SavedLog | None:
    """The checkpoint at ``path`` (None when there is none); a ``CheckpointError`` if it cannot be read."""
    data = read_json(path)
    if data is None:
        return None
    if data.get("format") != FORMAT:
        raise CheckpointError(path, f"not a {FORMAT} (no 'format': {FORMAT!r})")
    if data.get("version") != VERSION:
        raise CheckpointError(
            path, f"format version {data.get('version')!r} unknown to this mergetune (reads {VERSION})"
        )
    try:
        settings, events = dict(data["settings"]), list(data["events"])
        sizes = {"batch_size": settings.pop("batch_size"), "budget": settings.pop("budget")}
        for event in [{"configure": sizes}, *events]:
            _check_event(event)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"malformed ({type(exc).__name__}: {exc})") from exc
    versions = {name: str(data.get(name)) for name in libraries}
    return SavedLog(versions, settings, sizes["batch_size"], sizes["budget"], events)


def _check_event(event: Any) -> None:
    """A ValueError unless ``event`` is one of the four kinds, each field of its type (a bool is no number)."""
    kind = next((k for k in EVENT_FIELDS if isinstance(event, dict) and k in event), None)
    if kind is None or set(event) != set(EVENT_FIELDS[kind]):
        raise ValueError(f"unknown event {event!r}")
    fields = {**EVENT_FIELDS[kind], **(CONFIGURE_FIELDS if kind == "configure" else {})}
    values = {**event, **(event["configure"] if kind == "configure" else {})}
    if kind == "configure" and set(event["configure"]) != set(CONFIGURE_FIELDS):
        raise ValueError(f"event {event!r}: configure takes {sorted(CONFIGURE_FIELDS)}")
    for name, types in fields.items():
        value = values[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"event {event!r}: {name} is not of type {[t.__name__ for t in types]}")


def warn_about_pickles(folder: Path, name: str, source: str) -> None:
    """One warning per ``*.pkl`` in the folder: never loaded (unpickling would run code from the run folder)."""
    for path in sorted(folder.glob("*.pkl")) if folder.is_dir() else []:
        log.warning(
            "%s: ignoring %s: pickled optimizer state (written by an earlier mergetune) is never loaded; "
            "the optimizer state comes from %s; delete the file",
            name,
            path,
            source,
        )


# ---- the log of calls ----------------------------------------------------------------------------
def outcome_from(loss: float, failed: bool) -> Outcome:
    """An outcome with this loss and failure flag: all an external optimizer reads of an outcome."""
    return Outcome(values=None if failed else (-loss,), scalar=-loss, feasible=not failed)


class CallLog:
    """The calls made to an optimizer, as JSON-ready events; proposals are numbered in ask order.
    ``built``: the batch and budget the optimizer was built with (later changes are events)."""

    def __init__(self, batch_size: int, budget: int | None) -> None:
        self.built = {"batch_size": batch_size, "budget": budget}
        self.events: list[Event] = []
        self.asked = 0
        self._out: dict[int, tuple[int, Proposal]] = {}  # id(proposal) -> (number, proposal), until told

    def ask(self, proposal: Proposal) -> None:
        self.events.append({"ask": point_key(proposal.params)})
        self._out[id(proposal)] = (self.asked, proposal)  # the reference keeps the id unique while out
        self.asked += 1

    def tell(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        """A proposal not out (None, or told already) is recorded as a point the optimizer did not propose."""
        number, _ = self._out.pop(id(proposal), (None, None))
        event = {"tell": number, "key": point_key(params), "loss": float(outcome.loss), "failed": outcome.failed}
        self.events.append(event)


class ReplayDiverged(Exception):
    """The replay did not retrace the recorded calls (internal: the caller falls back to the history)."""


class ReplayedOptimizer(ExternalOptimizer):
    """An external optimizer checkpointed as the log of its calls (data only) and restored by replaying it.

    A subclass implements ``_reset`` (its state as just built), ``_propose``, ``_observe``,
    ``_summary`` and ``_libraries``, and calls ``_start_fresh()`` at the end of its ``__init__``;
    ``_rebuild`` may prepare a rebuild from the history (Nevergrad reseeds). ``propose``,
    ``observe``, ``checkpoint`` and ``restore`` are settled here, so that every call is logged.
    """

    checkpoint_file: ClassVar[str]

    # ---- hooks -----------------------------------------------------------------------------------
    @abstractmethod
    def _reset(self) -> None:
        """Set the optimizer's state as just built from ``seed``, ``batch_size``, ``budget`` and the options."""

    @abstractmethod
    def _propose(self) -> Proposal:
        """The next point (``propose`` logs it)."""

    @abstractmethod
    def _observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        """Learn from an outcome (``observe`` logs it and adds it to the ledger first)."""

    @abstractmethod
    def _summary(self) -> dict[str, Any]:
        """A few numbers for people reading the checkpoint (never read back)."""

    @abstractmethod
    def _libraries(self) -> dict[str, str]:
        """The versions of the libraries the replay depends on, e.g. ``{"cma": "4.0.0"}``."""

    def _rebuild(self, count: int) -> None:
        """Before the history's ``count`` outcomes are told to an optimizer without a usable checkpoint."""

    # ---- state -----------------------------------------------------------------------------------
    def _start_fresh(self) -> None:
        self._ledger = Ledger()
        self._log = CallLog(self.batch_size, self.budget)
        self._reset()

    def _settings(self) -> dict[str, Any]:
        """What the optimizer is built from, besides the batch and the budget: the replay needs the same."""
        space = [[a.name, repr(a.distribution)] for a in self.space.axes]
        return json.loads(json.dumps({"seed": self.seed, "options": self.options, "space": space}, default=repr))

    # ---- optimizer interface ---------------------------------------------------------------------
    def propose(self) -> Proposal:
        proposal = self._propose()
        self._log.ask(proposal)
        return proposal

    def observe(self, proposal: Proposal | None, params: dict[str, Any], outcome: Outcome) -> None:
        self._ledger.add(params, outcome.loss)
        self._log.tell(proposal, params, outcome)
        self._observe(proposal, params, outcome)

    def checkpoint(self, folder: Path) -> None:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "optimizer": self.name,
            **self._libraries(),
            "seen": self._ledger.total,
            "summary": self._summary(),
            "settings": {**self._settings(), **self._log.built},
            "events": self._log.events,
        }
        write_atomic(folder / self.checkpoint_file, json.dumps(data, allow_nan=False).encode())

    def restore(self, folder: Path, history: History) -> None:
        path = folder / self.checkpoint_file
        saved = read_checkpoint(path, list(self._libraries()))
        replayed = saved is not None and self._usable(saved, path) and self._replay_or_reset(saved, path, history)
        warn_about_pickles(folder, self.name, str(path) if replayed else "the history")
        unseen = self._ledger.unseen(history)
        if not replayed and unseen:
            self._log.events.append({"rebuild": len(unseen)})
            self._rebuild(len(unseen))
        log.info(
            "%s: %s; replaying %d outcome(s)",
            self.name,
            "checkpoint replayed" if replayed else "fresh start",
            len(unseen),
        )
        for params, outcome in unseen:
            self.observe(None, params, outcome)

    # ---- replay ----------------------------------------------------------------------------------
    def _usable(self, saved: SavedLog, path: Path) -> bool:
        """Written by the same libraries for the same seed, options and space: else rebuild from the history."""
        if saved.libraries != self._libraries():
            log.warning(
                "%s: %s written with %s, this is %s: rebuilding from the history",
                self.name,
                path,
                saved.libraries,
                self._libraries(),
            )
            return False
        if saved.settings != self._settings():
            changed = sorted(
                k
                for k in saved.settings.keys() | self._settings().keys()
                if saved.settings.get(k) != self._settings().get(k)
            )
            log.warning(
                "%s: %s was written for other settings (%s): rebuilding from the history", self.name, path, changed
            )
            return False
        return True

    def _replay_or_reset(self, saved: SavedLog, path: Path, history: History) -> bool:
        """Replay the log with the recorded batch and budget; on divergence, a warning and a fresh state."""
        batch_size, budget = self.batch_size, self.budget
        self.batch_size, self.budget = saved.batch_size, saved.budget
        self._start_fresh()
        try:
            self._replay(saved.events, history)
        except ReplayDiverged as exc:
            log.warning("%s: replaying %s diverged (%s): rebuilding from the history", self.name, path, exc)
            self.batch_size, self.budget = batch_size, budget
            self._start_fresh()
            return False
        if (batch_size, budget) != (self.batch_size, self.budget):
            self._configure({"batch_size": batch_size, "budget": budget})
        return True

    def _configure(self, settings: dict[str, Any]) -> None:
        """The batch and budget from here on; what was built before keeps its own (as a restored object did)."""
        self._log.events.append({"configure": settings})
        self.batch_size, self.budget = int(settings["batch_size"]), settings["budget"]

    def _replay(self, events: list[Event], history: History) -> None:
        """Make the recorded calls again, checking every re-asked point against the recorded one."""
        points = {point_key(params): params for params, _ in history}
        proposals: list[Proposal] = []
        for number, event in enumerate(events):
            if "ask" in event:
                proposals.append(self.propose())
                if self._log.events[-1]["ask"] != event["ask"]:  # the fingerprint propose() just logged
                    raise ReplayDiverged(f"event {number}: proposal {len(proposals) - 1} is another point")
                points.setdefault(event["ask"], proposals[-1].params)
            elif "tell" in event:
                self._replay_tell(number, event, proposals, points)
            elif "rebuild" in event:
                self._log.events.append(event)
                self._rebuild(event["rebuild"])
            else:
                self._configure(event["configure"])

    def _replay_tell(self, number: int, event: Event, proposals: list[Proposal], points: dict[str, Any]) -> None:
        index, params = event["tell"], points.get(event["key"])
        if params is None or (index is not None and not 0 <= index < len(proposals)):
            raise ReplayDiverged(f"event {number}: the point told is neither proposed nor in the history")
        proposal = None if index is None else proposals[index]
        self.observe(proposal, params, outcome_from(event["loss"], event["failed"]))
