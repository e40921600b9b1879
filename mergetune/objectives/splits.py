"""De-duplication and stratified, seeded train / validation / test splits.

Why this exists: the search scores thousands of merged candidates on small validation sets, so the
splits must be (a) disjoint, or a score leaks the test set; (b) stratified, or a 300-example
validation set can miss a rare class; (c) reproducible bit for bit from the seed alone, whatever
order the rows came in (a shuffled CSV or a different hub snapshot order must not change them).

Recipe:

1. De-duplicate: two rows are the same example when their texts (and text pairs) are equal after
   whitespace normalisation. Repeats with the same label collapse to one row; texts seen with
   *different* labels are dropped altogether (a model cannot be right on both) and counted.
2. Order the unique examples by a stable hash of their normalised text (SHA-256, not Python's
   salted ``hash``), so the input order no longer matters, then shuffle each class with
   ``numpy.random.default_rng(seed)``.
3. Allocate the validation and test sizes first, per class by the largest-remainder method
   (every class with at least 3 examples gets at least one row in each split); train is the
   rest, optionally capped (the cap is stratified the same way).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

#: Separates a text from its pair inside a de-duplication key (a control character no text holds).
_PAIR_SEPARATOR = "\x1f"


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends (the de-duplication key)."""
    return " ".join(text.split())


def stable_hash(key: str) -> str:
    """SHA-256 hex digest of ``key``: identical across processes and Python versions."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class DedupReport:
    """What de-duplication removed, for the task's log and report."""

    n_input: int
    n_kept: int
    n_repeats: int  # rows dropped because an identical example (same label) was kept
    n_conflicting_texts: int  # distinct texts dropped because their copies disagree on the label
    n_conflicting_rows: int  # rows those texts occupied

    def summary(self) -> str:
        return (
            f"{self.n_input} rows -> {self.n_kept} unique examples ({self.n_repeats} repeats removed, "
            f"{self.n_conflicting_texts} texts with conflicting labels dropped, {self.n_conflicting_rows} rows)"
        )


@dataclass(frozen=True)
class Splits:
    """Indices into the caller's rows: disjoint, each in a seeded order."""

    train: tuple[int, ...]
    validation: tuple[int, ...]
    test: tuple[int, ...]
    dedup: DedupReport

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def example_key(text: str, text_pair: str | None = None) -> str:
    """The identity of an example for de-duplication: normalised text, plus normalised pair if any."""
    key = normalize_text(text)
    if text_pair is not None:
        key = key + _PAIR_SEPARATOR + normalize_text(text_pair)
    return key


def deduplicate(
    texts: Sequence[str], labels: Sequence[Hashable], text_pairs: Sequence[str] | None = None
) -> tuple[list[int], DedupReport]:
    """Indices of one representative row per unique example, and a report of what was dropped.

    The representative of a group of repeats is the one with the smallest raw (text, pair), so
    whitespace variants resolve to the same text in any input order. The returned indices are
    sorted by the stable hash of the example key, which makes them independent of input order.
    """
    _check_lengths(texts, labels, text_pairs)
    pairs: Sequence[str] = text_pairs if text_pairs is not None else [""] * len(texts)
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        key = example_key(text, None if text_pairs is None else pairs[i])
        groups.setdefault(key, []).append(i)
    kept: list[tuple[str, int]] = []
    conflicting_texts = conflicting_rows = 0
    for key, rows in groups.items():
        if len({labels[i] for i in rows}) > 1:
            conflicting_texts += 1
            conflicting_rows += len(rows)
            continue
        representative = min(rows, key=lambda i: (texts[i], pairs[i]))
        kept.append((stable_hash(key), representative))
    kept.sort()
    report = DedupReport(
        n_input=len(texts),
        n_kept=len(kept),
        n_repeats=len(texts) - len(kept) - conflicting_rows,
        n_conflicting_texts=conflicting_texts,
        n_conflicting_rows=conflicting_rows,
    )
    return [i for _, i in kept], report


def stratified_split(
    texts: Sequence[str],
    labels: Sequence[Hashable],
    *,
    validation_size: int,
    test_size: int,
    train_size: int | None = None,
    seed: int = 0,
    text_pairs: Sequence[str] | None = None,
) -> Splits:
    """De-duplicate, then split into disjoint, stratified train / validation / test index sets.

    ``validation_size`` and ``test_size`` are exact example counts; train receives every remaining
    example, or ``train_size`` of them when given (0 means no training split is wanted). Raises
    ``ValueError`` when the sizes do not fit the data (the caller names the task).
    """
    if validation_size < 0 or test_size < 0 or (train_size is not None and train_size < 0):
        raise ValueError("split sizes must be non-negative")
    unique, report = deduplicate(texts, labels, text_pairs)
    n = len(unique)
    if validation_size + test_size > n:
        raise ValueError(
            f"only {n} unique examples after de-duplication ({report.n_input} rows), fewer than "
            f"validation_size {validation_size} + test_size {test_size}"
        )
    classes = sorted({labels[i] for i in unique}, key=_sort_key)
    by_class = _shuffled_classes(unique, labels, classes, seed)
    counts = np.array([len(by_class[c]) for c in classes], dtype=np.int64)
    val_k = _allocate(counts, validation_size, counts)
    test_k = _allocate(counts, test_size, counts - val_k)
    rest = counts - val_k - test_k
    train_total = int(rest.sum()) if train_size is None else min(train_size, int(rest.sum()))
    train_k = _allocate(counts, train_total, rest)
    rng = np.random.default_rng([seed, 1])  # a separate stream for the order inside each split
    parts: dict[str, list[int]] = {"validation": [], "test": [], "train": []}
    for c, v, t, r in zip(classes, val_k, test_k, train_k, strict=True):
        rows = by_class[c]
        parts["validation"] += rows[:v]
        parts["test"] += rows[v : v + t]
        parts["train"] += rows[v + t : v + t + r]
    return Splits(
        train=_permuted(parts["train"], rng),
        validation=_permuted(parts["validation"], rng),
        test=_permuted(parts["test"], rng),
        dedup=report,
    )


def _check_lengths(texts: Sequence[str], labels: Sequence[Hashable], text_pairs: Sequence[str] | None) -> None:
    if len(texts) != len(labels) or (text_pairs is not None and len(text_pairs) != len(texts)):
        raise ValueError("texts, labels and text pairs must have the same length")


def _sort_key(label: Hashable) -> tuple[str, str]:
    """A deterministic order of classes (it only fixes the order random numbers are drawn in)."""
    return (type(label).__name__, repr(label))


def _shuffled_classes(
    unique: list[int], labels: Sequence[Hashable], classes: list[Hashable], seed: int
) -> dict[Hashable, list[int]]:
    """Each class's indices (already in stable-hash order) shuffled by one seeded generator."""
    rng = np.random.default_rng([seed, 0])
    by_class: dict[Hashable, list[int]] = {c: [] for c in classes}
    for i in unique:
        by_class[labels[i]].append(i)
    for c in classes:
        rows = by_class[c]
        by_class[c] = [rows[j] for j in rng.permutation(len(rows))]
    return by_class


def _allocate(counts: np.ndarray, size: int, available: np.ndarray) -> np.ndarray:
    """Per-class counts summing to ``size``, proportional to ``counts``, within ``available``.

    Largest-remainder rounding; every class with at least 3 examples gets at least one row
    (so it can appear in train, validation and test) when ``size`` allows it.
    """
    if size == 0:
        return np.zeros_like(counts)
    minimum = np.where((counts >= 3) & (available >= 1), 1, 0)
    if minimum.sum() > size:
        minimum = np.zeros_like(counts)
    ideal = size * counts / counts.sum()
    take = np.clip(np.maximum(np.floor(ideal).astype(np.int64), minimum), 0, available)
    while take.sum() > size:  # minimums pushed the total over: trim the classes furthest above ideal
        over = np.where(take > minimum, take - ideal, -np.inf)
        take[int(np.argmax(over))] -= 1
    while take.sum() < size:  # hand out the rest by largest remainder, where there is room
        room = np.where(take < available, ideal - take, -np.inf)
        take[int(np.argmax(room))] += 1
    return take


def _permuted(rows: list[int], rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(rows[j] for j in rng.permutation(len(rows)))
