"""The zoo of real experts: cache keys, cache hits, interrupted builds, and experts that learnt their task.

The ``tiny`` zoo (a random 2-layer BERT, experts trained a few steps on real corpora) builds in
seconds and covers the mechanics; ``text4`` (all-MiniLM-L6-v2, 4 real tasks) is built once into a
temporary cache to check that real experts beat the base encoder wearing their own heads and load
into a ModelSet.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.merging.modelset import ModelSet
from mergetune.objectives import ZooError, ZooSpec, build_zoo, get_zoo, load_task
from mergetune.objectives.zoo import (
    EXPERT_RECORD,
    MANIFEST,
    TMP_PREFIX,
    RandomBase,
    Zoo,
    head_on_base,
    is_built,
    length_bucketed_batches,
    warmup_decay,
)
from mergetune.objectives.zoo import build as zoo_build  # build_zoo calls train_expert from here

runner = CliRunner()
TINY_MARGIN = 0.05  # a tiny expert beats the tiny base wearing its head by at least this much
TEXT4_MARGIN = 0.05  # per task; the mean gain is asserted larger


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """The tiny zoo, built once into a temporary cache."""
    return build_zoo("tiny", cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def one_task_tiny() -> ZooSpec:
    """The cheapest real build: the tiny zoo cut to one task."""
    return get_zoo("tiny").only("sms_spam")


def dead_pid() -> int:
    """The id of a process that has exited (so a temp folder named after it is stale)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- definitions and cache keys ----------------------------------------------------------------


def test_unknown_zoo_error_lists_the_available_zoos() -> None:
    with pytest.raises(ZooError, match=r"unknown zoo 'nope'; available: llm-tiny, llm4, text4, text8, tiny"):
        get_zoo("nope")
    with pytest.raises(ZooError, match="available: llm-tiny, llm4, text4, text8, tiny"):
        build_zoo("nope", progress=False)
    result = runner.invoke(app, ["zoo", "build", "nope"])
    assert result.exit_code == 2
    assert "available: llm-tiny, llm4, text4, text8, tiny" in result.output


def test_registered_zoos_match_their_definitions() -> None:
    text8 = get_zoo("text8")
    assert [t.name for t in text8.tasks] == [
        "trec6",
        "sms_spam",
        "bbc_news",
        "rt_sentiment",
        "rt_subjectivity",
        "vader_tweets",
        "vader_amazon",
        "vader_nyt",
    ]
    assert {t.name: t.max_length for t in text8.tasks if t.max_length != 64} == {"bbc_news": 128}
    assert all((t.train_size, t.validation_size, t.test_size) == (2000, 300, 500) for t in text8.tasks)
    assert text8.training.epochs == 1 and text8.training.batch_size == 32 and text8.training.freeze_word_embeddings
    assert text8.base == "minilm-l6" and get_zoo("text4").base == "minilm-l6"
    assert len(get_zoo("text4").tasks) == 4
    assert isinstance(get_zoo("tiny").base, RandomBase)


def test_cache_key_changes_with_every_build_setting_and_task_config(tmp_path: Path) -> None:
    spec = get_zoo("tiny")
    variants = [
        spec.with_training(learning_rate=1e-3),
        spec.with_training(freeze_word_embeddings=True),
        spec.with_training(seed=1),
        spec.with_task_settings(train_size=128),
        spec.with_task_settings(max_length=16),
        spec.with_task_settings(seed=3),  # the split seed: other examples
        spec.only("trec6", "sms_spam"),
        spec.model_copy(update={"base": RandomBase(hidden_size=16)}),
    ]
    folders = {v.folder(tmp_path) for v in variants} | {spec.folder(tmp_path)}
    assert len(folders) == len(variants) + 1
    assert all(f.parent == tmp_path / "zoo" and f.name.startswith("tiny-") for f in folders)
    # The same settings, however they were made, give the same folder; the description is not a setting.
    same = ZooSpec.model_validate(json.loads(spec.model_dump_json()))
    assert same.folder(tmp_path) == spec.folder(tmp_path)
    assert spec.model_copy(update={"description": "other words"}).cache_key() == spec.cache_key()


def test_cache_folder_defaults_to_dot_cache_and_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = get_zoo("text8")
    monkeypatch.delenv("MERGETUNE_CACHE", raising=False)
    assert spec.folder() == Path(".cache") / "zoo" / f"text8-{spec.cache_key()}"
    monkeypatch.setenv("MERGETUNE_CACHE", str(tmp_path))
    assert spec.folder() == tmp_path / "zoo" / f"text8-{spec.cache_key()}"
    assert spec.folder(tmp_path / "other").parent == tmp_path / "other" / "zoo"


# ---- training pieces -------------------------------------------------------------------------


def test_length_bucketed_batches_cover_every_example_once_with_little_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 64, size=1000)
    batches = length_bucketed_batches(lengths, 32, 10, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert max(len(b) for b in batches) == 32
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_batches = np.array_split(rng.permutation(1000), len(batches))
    assert padded < 0.8 * sum(len(b) * lengths[b].max() for b in random_batches)
    # Seeded: the same generator state gives the same batches.
    again = length_bucketed_batches(lengths, 32, 10, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_warmup_then_linear_decay() -> None:
    factor = warmup_decay(total_steps=10, warmup_ratio=0.2)
    values = [factor(s) for s in range(10)]
    assert values[0] < values[1] < values[2] == 1.0
    assert values[2:] == pytest.approx([(10 - s) / 8 for s in range(2, 10)])
    assert warmup_decay(5, 0.0)(0) == 1.0


# ---- building the tiny zoo -------------------------------------------------------------------


def test_tiny_experts_have_named_heads_and_beat_the_base(tiny_zoo: Zoo) -> None:
    from transformers import AutoConfig

    assert tiny_zoo.trained == ("trec6", "sms_spam", "vader_tweets") and not tiny_zoo.cache_hit
    assert (tiny_zoo.base / "config.json").is_file() and tiny_zoo.base.parent == tiny_zoo.folder
    for task, folder in tiny_zoo.experts.items():
        labels = load_task(tiny_zoo.tasks[task]).label_names
        config = AutoConfig.from_pretrained(folder)
        assert [config.id2label[i] for i in range(len(labels))] == list(labels)
        assert config.label2id == {name: i for i, name in enumerate(labels)}
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        result = tiny_zoo.results[task]
        assert result.train_size == 256 and result.validation_size == 100
        assert result.validation_accuracy >= result.base_head_validation_accuracy + TINY_MARGIN, result
    modelset = ModelSet.load(tiny_zoo.base, tiny_zoo.experts)  # heads kept per task, encoders merged
    assert [tuple(t["classifier.weight"].shape) for t in modelset.task_tensors] == [(6, 32), (2, 32), (2, 32)]


def test_manifest_records_settings_sizes_and_accuracies(tiny_zoo: Zoo) -> None:
    manifest = json.loads((tiny_zoo.folder / MANIFEST).read_text())
    assert manifest["zoo"] == "tiny" and manifest["cache_key"] == tiny_zoo.spec.cache_key()
    assert manifest["training"]["learning_rate"] == tiny_zoo.spec.training.learning_rate
    for task, entry in manifest["experts"].items():
        result = tiny_zoo.results[task]
        assert entry["validation_accuracy"] == result.validation_accuracy
        assert entry["base_head_validation_accuracy"] == result.base_head_validation_accuracy
        assert entry["train_size"] == 256 and entry["config"]["max_length"] == 32
        assert entry["build_seconds"] > 0 and entry["folder"] == str(tiny_zoo.experts[task])


def test_second_build_trains_nothing_and_force_rebuilds(tiny_zoo: Zoo) -> None:
    cache = tiny_zoo.folder.parent.parent
    weights = {t: (p / "model.safetensors").stat().st_mtime_ns for t, p in tiny_zoo.experts.items()}
    again = build_zoo("tiny", cache_dir=cache, progress=False)
    assert again.cache_hit and again.trained == ()
    assert again.folder == tiny_zoo.folder and again.experts == tiny_zoo.experts
    assert again.results == tiny_zoo.results
    assert {t: (p / "model.safetensors").stat().st_mtime_ns for t, p in again.experts.items()} == weights
    # --force retrains one expert in place (a one-task zoo in its own folder, to stay cheap).
    spec = one_task_tiny()
    first = build_zoo(spec, cache_dir=cache, progress=False)
    forced = build_zoo(spec, cache_dir=cache, progress=False, force=True)
    assert first.trained == forced.trained == ("sms_spam",)
    assert is_built(forced.experts["sms_spam"], spec.cache_key())
    assert not list(forced.folder.glob(f"{TMP_PREFIX}*"))


def test_cli_zoo_build_reuses_the_cache_and_list_counts_built_experts(tiny_zoo: Zoo) -> None:
    cache = tiny_zoo.folder.parent.parent
    result = runner.invoke(app, ["zoo", "build", "tiny", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert "0 expert(s) built, 3 cached" in result.output
    assert "sms_spam" in result.output and "mean" in result.output  # the accuracy table
    listing = runner.invoke(app, ["zoo", "list", "--cache-dir", str(cache)])
    assert listing.exit_code == 0, listing.output
    row = next(line for line in listing.output.splitlines() if line.strip("│ ").startswith("tiny"))
    assert "3/3" in row


def test_head_on_base_has_the_base_encoder_and_the_experts_head(tiny_zoo: Zoo) -> None:
    expert_dir = tiny_zoo.experts["trec6"]
    model = head_on_base(expert_dir, tiny_zoo.base, tiny_zoo.tasks["trec6"])
    state = model.state_dict()
    base = load_file(tiny_zoo.base / "model.safetensors")
    expert = load_file(expert_dir / "model.safetensors")
    assert torch.equal(
        state["bert.encoder.layer.0.attention.self.query.weight"], base["encoder.layer.0.attention.self.query.weight"]
    )
    assert not torch.equal(
        base["encoder.layer.0.attention.self.query.weight"], expert["bert.encoder.layer.0.attention.self.query.weight"]
    )
    assert torch.equal(state["classifier.weight"], expert["classifier.weight"])


# ---- interrupted builds ----------------------------------------------------------------------


def test_stale_temp_folder_with_complete_files_is_not_taken_as_built(tiny_zoo: Zoo, tmp_path: Path) -> None:
    spec = one_task_tiny()
    folder = spec.folder(tmp_path)
    folder.mkdir(parents=True)
    # A dead build's temporary folder holding a whole expert, record included: still not the expert.
    stale = folder / f"{TMP_PREFIX}sms_spam-{dead_pid()}-0123abcd"
    shutil.copytree(tiny_zoo.experts["sms_spam"], stale)
    record = json.loads((stale / EXPERT_RECORD).read_text())
    (stale / EXPERT_RECORD).write_text(json.dumps({**record, "cache_key": spec.cache_key()}))
    # An expert folder without its record (weights copied by hand, say) is not built either.
    assert not is_built(folder / "sms_spam") and not is_built(stale.parent / "missing")
    built = build_zoo(spec, cache_dir=tmp_path, progress=False)
    assert built.trained == ("sms_spam",)
    assert not stale.exists() and not list(folder.glob(f"{TMP_PREFIX}*"))
    assert is_built(built.experts["sms_spam"], spec.cache_key())


def test_failure_during_a_build_leaves_no_expert_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = one_task_tiny()
    real_train = zoo_build.train_expert

    def train_then_fail(*args: object, **kwargs: object) -> object:
        real_train(*args, **kwargs)  # the weights are saved in the temporary folder ...
        raise KeyboardInterrupt  # ... and the build is interrupted before the record and the rename

    monkeypatch.setattr(zoo_build, "train_expert", train_then_fail)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(spec, cache_dir=tmp_path, progress=False)
    folder = spec.folder(tmp_path)
    assert not (folder / "sms_spam").exists() and not list(folder.glob(f"{TMP_PREFIX}*"))


def test_killed_build_is_resumed_without_trusting_its_leftovers(tmp_path: Path) -> None:
    """SIGKILL a real ``mergetune zoo build tiny`` while it trains; the next build completes it."""
    spec = get_zoo("tiny")
    folder = spec.folder(tmp_path)
    command = [sys.executable, "-m", "mergetune.cli", "zoo", "build", "tiny", "--cache-dir", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(f"{TMP_PREFIX}trec6") for p in _children(folder)):
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in _children(folder) if p.name.startswith(TMP_PREFIX)]
    assert leftovers  # the killed build's temporary folder is still there ...
    unfinished = [t.name for t in spec.tasks if not (folder / t.name).exists()]
    assert "trec6" in unfinished  # ... and the expert it was building does not exist
    resumed = build_zoo(spec, cache_dir=tmp_path, progress=False)
    assert set(resumed.trained) == set(unfinished)
    assert not any(p.exists() for p in leftovers)
    assert all(is_built(p, spec.cache_key()) for p in resumed.experts.values())


def _children(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


# ---- the real text4 zoo ----------------------------------------------------------------------


@pytest.mark.slow
def test_text4_experts_beat_the_base_and_load_into_a_modelset(tmp_path: Path) -> None:
    zoo = build_zoo("text4", cache_dir=tmp_path, progress=False)
    assert zoo.trained == tuple(zoo.tasks)
    gains = []
    for result in zoo.results.values():
        assert result.validation_accuracy >= result.base_head_validation_accuracy + TEXT4_MARGIN, result
        assert result.validation_accuracy >= 0.7, result
        gains.append(result.gain)
    assert np.mean(gains) >= 0.15

    modelset = ModelSet.load(zoo.base, zoo.experts)
    assert modelset.task_names == list(zoo.tasks)
    for t, task in enumerate(modelset.task_names):
        head = modelset.task_tensors[t]["classifier.weight"]
        assert head.shape == (len(zoo.results[task].labels), 384)
        # The word embeddings were frozen: their task vector is exactly zero; the encoder moved.
        assert not modelset.task_vector(task, "embeddings.word_embeddings.weight").any()
        assert modelset.task_vector(task, "encoder.layer.5.output.dense.weight").abs().sum() > 0
