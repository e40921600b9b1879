"""Your own tasks scored on the right rows and labels (issue 13): the expert's label order, given splits used as
given, overlap with training data refused, ``mergetune tasks``, paths relative to their file, the experts'
dtype, plain progress lines, and saved heads that carry their label map.

Real components throughout: the tiny zoo's trained experts (real corpora), real files in every format, a real
search run as a subprocess whose stdout is a pipe.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import run_cli, tiny_bert_config

from mergetune.errors import TaskError
from mergetune.objectives.experts import expert_hints, load_for_expert
from mergetune.objectives.models import label_names_of, load_task_model
from mergetune.objectives.tasks import ExpertHints, TaskConfig, load_task
from mergetune.objectives.zoo import build_zoo
from mergetune.recipe import Recipe, common_dtype
from mergetune.search.config import SearchConfig
from mergetune.search.loop import ResolvedModels, build_space
from mergetune.search.worker import Worker, WorkerSetup

REPO = Path(__file__).resolve().parent.parent
CUSTOM = REPO / "configs" / "custom-tasks.yaml"
#: The tiny zoo's experts that stand in for configs/custom-tasks.yaml's placeholders.
CUSTOM_EXPERTS = {"questions": "trec6", "spam": "sms_spam", "tweets": "vader_tweets"}


# ---- 1. labels from the expert ---------------------------------------------------------------------------------


def _swapped_head_expert(expert: Path, dest: Path) -> Path:
    """A copy of a 2-label expert whose head lists its labels in the other order (rows swapped, id2label too).

    It is the same classifier: on any text it predicts the same label *name* as the original.
    """
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(expert, dest)
    model = AutoModelForSequenceClassification.from_pretrained(dest)
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    names = [model.config.id2label[i] for i in range(2)][::-1]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    model.save_pretrained(dest)
    return dest


def _predicted_names(folder: Path, texts: tuple[str, ...], max_length: int) -> list[str]:
    """The label names a classifier predicts, computed here with transformers alone (the independent reference)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(**batch).logits.argmax(-1).tolist()
    return [model.config.id2label[i] for i in ids]


def _zoo_rows(tiny_zoo, task: str, split: str) -> pd.DataFrame:
    data = tiny_zoo.spec.tasks[[t.name for t in tiny_zoo.spec.tasks].index(task)].load()
    part = data.split(split)
    return pd.DataFrame({"text": part.texts, "label": [data.label_names[i] for i in part.labels]})


def test_expert_id2label_orders_the_labels_the_search_scores_with(tiny_zoo, tmp_path: Path) -> None:
    """Sorted labels (ham, spam) against a head that lists (spam, ham) scored 1 - accuracy; the head's order is used."""
    swapped = _swapped_head_expert(tiny_zoo.experts["sms_spam"], tmp_path / "swapped")
    rows = pd.concat([_zoo_rows(tiny_zoo, "sms_spam", "validation"), _zoo_rows(tiny_zoo, "sms_spam", "test")])
    rows.to_csv(tmp_path / "sms.csv", index=False)
    task = TaskConfig(name="sms", source=str(tmp_path / "sms.csv"), validation_size=60, test_size=80, max_length=32)
    setup = WorkerSetup(
        base=str(tiny_zoo.base), experts={"sms": str(swapped)}, tasks=[task.model_dump(mode="json")], compile=False
    )
    rows_only = load_task(task)  # the same rows whatever the label order; names are names
    truth = [rows_only.label_names[i] for i in rows_only.test.labels]
    predicted = _predicted_names(swapped, rows_only.test.texts, 32)
    expected = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    assert expected > 0.7  # a label mix-up scores 1 - expected, below 0.3
    assert Worker(setup).reference("test")["sms"] == pytest.approx(expected, abs=1e-12)
    assert load_for_expert(task, str(swapped)).label_names == ("spam", "ham")


def test_declared_labels_that_disagree_with_the_head_show_both_orders(tiny_zoo, tmp_path: Path) -> None:
    swapped = _swapped_head_expert(tiny_zoo.experts["sms_spam"], tmp_path / "swapped")
    _zoo_rows(tiny_zoo, "sms_spam", "test").to_csv(tmp_path / "sms.csv", index=False)
    task = TaskConfig(
        name="sms", source=str(tmp_path / "sms.csv"), labels=["ham", "spam"], validation_size=20, test_size=20
    )
    with pytest.raises(
        TaskError, match=r"task 'sms': the declared labels \['ham', 'spam'\] disagree .*\['spam', 'ham'\]"
    ):
        load_for_expert(task, str(swapped))
    agreeing = task.model_copy(update={"labels": ["spam", "ham"]})
    assert load_for_expert(agreeing, str(swapped)).label_origin.startswith("declared (matches")
    # a task loaded without the expert's order is refused when the model is loaded, not scored against wrong labels
    sorted_task = load_task(task.model_copy(update={"labels": None}))
    assert sorted_task.label_names == ("ham", "spam")
    with pytest.raises(
        TaskError, match=r"task 'sms': the model's head lists its labels in the order \['spam', 'ham'\]"
    ):
        load_task_model(sorted_task, swapped)


def test_generic_label_names_mean_no_names(tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    assert label_names_of({0: "LABEL_0", 1: "LABEL_1"}) is None
    assert label_names_of({"1": "pos", "0": "neg"}) == ("neg", "pos")
    BertForSequenceClassification(tiny_bert_config(num_labels=2)).save_pretrained(tmp_path / "generic")
    assert expert_hints(str(tmp_path / "generic")).head_labels is None
    pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": ["b", "a"] * 10}).to_csv(tmp_path / "d.csv")
    task = TaskConfig(name="d", source=str(tmp_path / "d.csv"), validation_size=4, test_size=4)
    data = load_for_expert(task, str(tmp_path / "generic"))
    assert data.label_names == ("a", "b") and data.label_origin.startswith("sorted")
    declared = load_for_expert(task.model_copy(update={"labels": ["b", "a"]}), str(tmp_path / "generic"))
    assert declared.label_names == ("b", "a") and declared.label_origin == "declared"


def test_integer_labels_index_a_named_head(tmp_path: Path) -> None:
    """HF's convention: labels 0/1 in the data are the head's outputs when the head names them otherwise."""
    pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": [0, 1] * 10}).to_csv(tmp_path / "d.csv", index=False)
    task = TaskConfig(name="d", source=str(tmp_path / "d.csv"), validation_size=4, test_size=4)
    data = load_task(task, expert=ExpertHints(head_labels=("neg", "pos"), head_source="config.json"))
    assert data.label_names == ("neg", "pos") and "output indices" in data.label_origin
    texts = dict(zip(data.test.texts, data.test.labels, strict=True))
    assert all(texts[f"t{i}"] == i % 2 for i in range(20) if f"t{i}" in texts)


# ---- 2. given splits used as given ------------------------------------------------------------------------------


def _write_table(table: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True)
    else:
        table.to_parquet(path)


def _table(prefix: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"{prefix} example {i}" for i in range(n)], "label": ["x", "y"] * (n // 2)})


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_folder_of_split_files_is_read_as_given(tmp_path: Path, suffix: str) -> None:
    """Before: only train was read and re-split, so the 'test' rows were training examples."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split, n in (("train", 40), ("validation", 10), ("test", 12)):
        table = _table(split, n)
        path = folder / f"{split}{suffix}"
        _write_table(table, path)
    data = TaskConfig(name="g", source=str(folder)).load()
    assert data.test.texts == tuple(_table("test", 12)["text"])  # as given, in the file's order
    assert data.validation.texts == tuple(_table("validation", 10)["text"])
    assert data.train.texts == tuple(_table("train", 40)["text"])
    assert data.split_origin.startswith("given")


def test_splits_mapping_and_datasets_folder_are_given(tmp_path: Path) -> None:
    import datasets

    for split, n in (("validation", 10), ("test", 12)):
        _table(split, n).to_csv(tmp_path / f"{split}.csv", index=False)
    data = TaskConfig(name="m", splits={"validation": "validation.csv", "test": "test.csv"}).load(base_dir=tmp_path)
    assert (len(data.train), len(data.validation), len(data.test)) == (0, 10, 12)
    parts = {s: datasets.Dataset.from_pandas(_table(s, n)) for s, n in (("train", 30), ("validation", 8), ("test", 6))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "dd"))
    saved = TaskConfig(name="dd", source=str(tmp_path / "dd")).load()
    assert saved.test.texts == tuple(_table("test", 6)["text"]) and saved.split_origin.startswith("given")
    with pytest.raises(TaskError, match=r"task 'dd': .*test_size: 5 cannot apply: the splits are given"):
        TaskConfig(name="dd", source=str(tmp_path / "dd"), test_size=5).load()
    with pytest.raises(TaskError, match=r"(?s)task 'm'.*validation_size: 7 cannot apply"):
        TaskConfig.parse({"name": "m", "splits": {"validation": "v.csv", "test": "t.csv"}, "validation_size": 7})


def test_single_file_splits_are_reported_as_made(tmp_path: Path) -> None:
    _table("all", 60).to_csv(tmp_path / "all.csv", index=False)
    data = TaskConfig(name="a", source="all.csv", validation_size=10, test_size=10).load(base_dir=tmp_path)
    assert data.split_origin == "made by mergetune from file all.csv (stratified, seed 0)"


def test_test_file_without_validation_file_is_an_error(tmp_path: Path) -> None:
    _table("train", 20).to_csv(tmp_path / "train.csv", index=False)
    _table("test", 20).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(TaskError, match=r"task 't': .*\['test.csv', 'train.csv'\] but no validation file"):
        TaskConfig(name="t", source=str(tmp_path)).load()


def test_overlap_with_the_given_train_file_is_an_error_unless_allowed(tmp_path: Path) -> None:
    train = _table("train", 40)
    train.to_csv(tmp_path / "train.csv", index=False)
    leaked = pd.concat([_table("test", 10), train.iloc[:3].assign(text=lambda t: "  " + t.text + " ")])
    leaked.to_csv(tmp_path / "test.csv", index=False)
    _table("validation", 10).to_csv(tmp_path / "validation.csv", index=False)
    task = TaskConfig(name="o", source=str(tmp_path))
    with pytest.raises(
        TaskError, match=r"task 'o': .*3 of 13 test rows are in the given train split.*allow_overlap: true"
    ):
        task.load()
    allowed = task.model_copy(update={"allow_overlap": True}).load()
    assert [(o.split, o.count) for o in allowed.overlaps] == [("test", 3)]


def test_overlap_with_a_zoo_experts_training_rows_is_an_error(tiny_zoo, tmp_path: Path) -> None:
    """Other splits of the corpus a zoo expert trained on: its training rows must not be scored as test rows."""
    (tmp_path / "d").mkdir()
    _zoo_rows(tiny_zoo, "sms_spam", "train").iloc[:50].to_csv(tmp_path / "d" / "validation.csv", index=False)
    _zoo_rows(tiny_zoo, "sms_spam", "test").to_csv(tmp_path / "d" / "test.csv", index=False)
    task = TaskConfig(name="sms", source=str(tmp_path / "d"))
    assert load_task(task).overlaps == ()  # nothing known to compare with: loads
    with pytest.raises(TaskError, match=r"50 of 50 validation rows are in the training rows of zoo expert sms_spam"):
        load_for_expert(task, str(tiny_zoo.experts["sms_spam"]))


# ---- 3. mergetune tasks -----------------------------------------------------------------------------------------


def test_tasks_command_on_the_custom_tasks_config(tmp_path: Path) -> None:
    proc = run_cli(["tasks", str(CUSTOM)], {}, cwd=tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "splits: train 100, validation 60, test 60; given (files train.csv, validation.csv, test.csv" in out
    assert "splits: train 52, validation 40, test 40; made by mergetune from file spam.jsonl" in out
    assert "labels: 0: ham, 1: spam (order: declared)" in out
    assert "overlap: none (validation/test compared with the given train split)" in out
    assert len(re.findall(r"^  validation example: ", out, flags=re.M)) == 6  # two per split and task


def test_tasks_command_reports_a_bad_task_with_the_accepted_keys(tmp_path: Path) -> None:
    _table("all", 30).to_csv(tmp_path / "small.csv", index=False)
    tasks = [
        {"name": "ok", "source": "trec6", "validation_size": 20, "test_size": 20},
        {"name": "all_eval", "source": "small.csv", "validation_size": 15, "test_size": 15},
    ]
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    proc = run_cli(["tasks", "tasks.yaml"], {}, cwd=tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2
    assert "task 'ok'" in out and "labels: 0: ABBR" in out
    assert "ERROR: task 'all_eval': column 'text': the train split is empty" in out and "train_size: 0" in out
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump([{"name": "x", "sorce": "trec6"}]))
    proc = run_cli(["tasks", "bad.yaml"], {}, cwd=tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "a task accepts the keys: name, source, splits," in out


# ---- 4. paths, dtype; 5. progress; custom-tasks.yaml searched end to end ----------------------------------------


def test_custom_tasks_search_from_another_folder_then_merge_from_a_third(zoo_env, tmp_path: Path) -> None:
    """Config and data in one folder, run from another (relative paths resolve against the config file), a pipe
    for stdout (plain progress lines), and the chosen recipe merged from a third folder (absolute paths)."""
    zoo = build_zoo("tiny", cache_dir=zoo_env["MERGETUNE_CACHE"], progress=False)  # cached: the subprocess's experts
    cfg = tmp_path / "cfg"
    shutil.copytree(REPO / "configs" / "data", cfg / "data")
    config = yaml.safe_load(CUSTOM.read_text())
    (cfg / "experts").symlink_to(zoo.folder)
    config["models"] = {
        "base": f"./experts/{zoo.base.relative_to(zoo.folder)}",
        "experts": [{"name": n, "model": f"./experts/{z}"} for n, z in CUSTOM_EXPERTS.items()],
    }
    config.update(
        budget={"candidates": 2}, selection={"rescore_top": 1}, warm_start=False, output=str(tmp_path / "run")
    )
    (cfg / "search.yaml").write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli(["search", "../cfg/search.yaml"], zoo_env, cwd=elsewhere)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "candidate 1/2: #" in out and "candidate 2/2: #" in out  # one plain line per candidate
    assert "task 'questions': " in out and "splits given (split files in questions, read as is)" in out
    assert "task 'spam': " in out and "splits made by mergetune (stratified, seed 0)" in out
    recipe = yaml.safe_load((tmp_path / "run" / "chosen" / "recipe.yaml").read_text())
    assert all(Path(m).is_absolute() for m in [recipe["base"], *(e["model"] for e in recipe["experts"])])
    third = tmp_path / "third"
    third.mkdir()
    proc = run_cli(["merge", str(tmp_path / "run" / "chosen" / "recipe.yaml"), "merged"], zoo_env, cwd=third)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    _check_readme_head_snippet(third / "merged", "spam", zoo.experts["sms_spam"])


def test_relative_recipe_paths_resolve_against_the_recipe_file(tiny_bert_dir, tmp_path: Path) -> None:
    base, experts = tiny_bert_dir
    folder = tmp_path / "recipes"
    (folder / "models").mkdir(parents=True)
    for name, path in [("base", base), *experts.items()]:
        (folder / "models" / name).symlink_to(path)
    recipe = {
        "base": "./models/base",
        "experts": [{"name": "sst2", "model": "models/sst2"}],
        "method": "task_arithmetic",
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    loaded = Recipe.load(folder / "recipe.yaml")
    assert loaded.base == str((folder / "models" / "base").resolve())
    assert loaded.experts[0].model == str((folder / "models" / "sst2").resolve())
    hub = Recipe.load(_write(tmp_path / "hub.yaml", {**recipe, "base": "org/model"}))
    assert hub.base == "org/model"  # a hub id is not a path


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_search_config_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    config = SearchConfig.load(
        _write(
            tmp_path / "c.yaml",
            {
                "name": "p",
                "models": {"base": "./base", "experts": [{"name": "t", "model": "./t"}]},
                "tasks": [{"name": "t", "source": "data/t.csv"}],
                "space": {"methods": ["task_arithmetic"]},
            },
        )
    )
    assert config.models.base == str(tmp_path / "base") and config.models.experts[0].model == str(tmp_path / "t")
    assert config.tasks[0].source == str(tmp_path / "data" / "t.csv")


def test_twin_tasks_file_paths_resolve_against_the_file(tmp_path: Path) -> None:
    from mergetune.twin.workflow import read_task_configs

    (tmp_path / "cfg").mkdir()
    tasks = _write(tmp_path / "cfg" / "tasks.yaml", {"tasks": [{"name": "a", "source": "data/a.csv"}]})
    recipe = Recipe.parse({"base": "b", "experts": [{"name": "a", "model": "x"}], "method": "twin"})
    assert read_task_configs(recipe, tasks)[0].source == str((tmp_path / "cfg" / "data" / "a.csv").resolve())


def test_a_search_configs_task_error_lists_the_accepted_keys(tmp_path: Path) -> None:
    from mergetune.search.config import SearchConfigError

    data = {
        "name": "k",
        "models": {"base": "b", "experts": [{"name": "t", "model": "e"}]},
        "tasks": [{"name": "t", "source": "trec6", "label_colum": "y"}],
        "space": {"methods": ["task_arithmetic"]},
    }
    with pytest.raises(SearchConfigError, match=r"(?s)tasks\.0\.label_colum: unknown key.*accepts the keys: name,"):
        SearchConfig.load(_write(tmp_path / "c.yaml", data))


def test_candidate_recipes_take_the_experts_dtype(tiny_bert_dir, tmp_path: Path) -> None:
    """bf16 experts merged in float32 doubled the output's size; the recipe now says bfloat16."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    base, experts = tiny_bert_dir
    AutoModel.from_pretrained(base).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    AutoModelForSequenceClassification.from_pretrained(experts["sst2"]).to(torch.bfloat16).save_pretrained(
        tmp_path / "e"
    )
    assert common_dtype([tmp_path / "base", tmp_path / "e"]) == "bfloat16"
    assert common_dtype([base, experts["sst2"]]) == "float32"
    assert common_dtype([tmp_path / "base", experts["sst2"]]) == "float32"  # mixed: nothing lost
    config = SearchConfig.model_validate(
        {
            "name": "d",
            "models": {"base": str(tmp_path / "base"), "experts": [{"name": "sst2", "model": str(tmp_path / "e")}]},
            "tasks": [{"name": "sst2", "source": "trec6"}],
            "space": {"methods": ["task_arithmetic"]},
        }
    )
    models = ResolvedModels(str(tmp_path / "base"), {"sst2": str(tmp_path / "e")}, [])
    space = build_space(config, models)
    params = {a.name: a.distribution.low for a in space.axes}
    assert space.to_recipe(params).dtype == "bfloat16"


def test_zoo_build_prints_a_line_per_expert_without_a_terminal(zoo_env, tmp_path: Path) -> None:
    proc = run_cli(["zoo", "build", "tiny"], zoo_env, cwd=tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert [m.group(1) for m in re.finditer(r"zoo expert \d/3 '(\w+)': ready", out)] == [
        "trec6",
        "sms_spam",
        "vader_tweets",
    ]


# ---- heads carry their label map; the README's snippet runs ------------------------------------------------------


def _readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if "# attach a task's head" in b]
    assert len(found) == 1, "the README holds one snippet that attaches a task's head"
    return found[0]


def _check_readme_head_snippet(merged: Path, task: str, expert: Path) -> None:
    """Run the README's snippet on a merged folder; its model predicts with the head and names its labels."""
    from safetensors import safe_open

    with safe_open(str(merged / "heads" / f"{task}.safetensors"), "pt") as f:
        metadata = f.metadata()
    expert_config = json.loads((expert / "config.json").read_text())
    assert json.loads(metadata["id2label"]) == expert_config["id2label"] and metadata["task"] == task
    code = _readme_snippet().replace('MERGED = "merged"', f"MERGED = {str(merged)!r}")
    code = code.replace('TASK = "spam"', f"TASK = {task!r}")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert model.config.id2label == {int(k): v for k, v in expert_config["id2label"].items()}
    head = {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}
    from safetensors.torch import load_file

    saved = load_file(str(merged / "heads" / f"{task}.safetensors"))
    assert head.keys() == saved.keys() and all(torch.equal(head[k], saved[k]) for k in saved)


def test_the_search_and_held_out_parts_keep_each_rows_answer(tmp_path: Path) -> None:
    """Before: the held-out split rebuilt each split from texts/labels/pairs/choices only, so an answer-only LM task
    (answer_column) lost its answers and every search on one stopped with 'its split has none'."""
    from mergetune.objectives.suite import examples
    from mergetune.search.worker import split_holdout

    rows = [{"text": f"question {i}", "answer": f"answer {i}"} for i in range(30)]
    for split in ("validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"name": "qa", "kind": "lm", "answer_column": "answer"}
    task = TaskConfig(**config, splits={"validation": "validation.jsonl", "test": "test.jsonl"}).load(base_dir=tmp_path)
    search, held_out = split_holdout(task, 0.33, seed=0)
    assert (len(search.validation), len(held_out.validation)) == (20, 10)
    for part in (search.validation, held_out.validation, examples(task, "test", 7)):
        assert part.answers is not None and len(part.answers) == len(part.texts)
        expected = [(text.replace("question", "answer"),) for text in part.texts]
        assert list(part.answers) == expected
    assert sorted(search.validation.texts + held_out.validation.texts) == sorted(r["text"] for r in rows)
