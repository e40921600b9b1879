"""Writes the small data files of configs/custom-tasks.yaml from the packaged corpora (run once; kept for the record).

Rows are drawn, seeded, from each corpus's examples that no built-in zoo (tiny, text4, text8) trains on, so that
the custom tasks can be scored with zoo experts without any validation/test row being a training row.

    python configs/data/make_data.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mergetune.objectives.corpora import load_corpus
from mergetune.objectives.splits import deduplicate, example_key
from mergetune.objectives.zoo import get_zoo

HERE = Path(__file__).parent


def unused_rows(corpus: str) -> pd.DataFrame:
    """The corpus's unique examples that are in no zoo's training split, in a seeded order."""
    trained: set[str] = set()
    for zoo in ("tiny", "text4", "text8"):
        for task in get_zoo(zoo).tasks:
            if task.source == corpus:
                trained |= {example_key(t) for t in task.load().train.texts}
    pairs = load_corpus(corpus)
    keep, _ = deduplicate([t for t, _ in pairs], [label for _, label in pairs])
    rows = [pairs[i] for i in keep if example_key(pairs[i][0]) not in trained]
    order = np.random.default_rng(0).permutation(len(rows))
    return pd.DataFrame([rows[i] for i in order], columns=["text", "label"])


def balanced(table: pd.DataFrame, per_label: int) -> pd.DataFrame:
    return table.groupby("label", group_keys=False).head(per_label)


def main() -> None:
    questions = unused_rows("trec6").rename(columns={"text": "question", "label": "type"})
    folder = HERE / "questions"
    folder.mkdir(exist_ok=True)
    questions.iloc[:100].to_csv(folder / "train.csv", index=False)
    questions.iloc[100:160].to_csv(folder / "validation.csv", index=False)
    questions.iloc[160:220].to_csv(folder / "test.csv", index=False)

    spam = pd.concat([balanced(unused_rows("sms_spam"), 60), unused_rows("sms_spam").iloc[:80]]).drop_duplicates()
    spam.iloc[:200].to_json(HERE / "spam.jsonl", orient="records", lines=True, force_ascii=False)

    tweets = balanced(unused_rows("vader_tweets"), 60)
    folder = HERE / "tweets"
    folder.mkdir(exist_ok=True)
    tweets.iloc[::2].reset_index(drop=True).to_parquet(folder / "validation.parquet", index=False)
    tweets.iloc[1::2].reset_index(drop=True).to_parquet(folder / "test.parquet", index=False)


if __name__ == "__main__":
    main()
