"""Shared fixtures: tiny random Hugging Face models built from config classes (no download).

Every model is a few thousand parameters, built once per test session and saved with
``save_pretrained`` under a session temporary folder, so any test file can use them:

- ``tiny_bert_dir``: a ``BertModel`` base and ``BertForSequenceClassification`` experts with
  different numbers of labels (the encoder under the ``bert.`` prefix, a per-task classifier);
- ``tiny_llama_dir``: a ``LlamaForCausalLM`` base and experts of the same class;
- ``tiny_zoo`` and ``zoo_env``: the real tiny zoo, built once per test run into a cache that both
  pytest-xdist workers share, and environment variables pointing at that cache with kernel compilation
  off for speed; ``run_cli`` and ``trials_by_state`` run ``mergetune`` in a subprocess and read a
  search's storage back;
- ``make_models``, ``make_recipe`` and ``merge``: in-memory state dicts, recipes over them and
  their merge, shared by the merge-method tests (import them with ``from conftest import ...``).

Experts are the base plus small seeded noise, so their task vectors are known and reproducible.
Model initialisation runs under a forked, seeded RNG: building them leaves the global RNG alone.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hub_constants
import optuna
import pytest
import torch
import yaml
from filelock import FileLock
from optuna.trial import TrialState

from mergetune.merging.engine import Merger
from mergetune.merging.methods import parse_recipe
from mergetune.merging.modelset import ModelSet
from mergetune.objectives.zoo import Zoo, build_zoo
from mergetune.recipe import Recipe
from mergetune.search.config import SearchConfig
from mergetune.search.loop import resolve_models, worker_setup
from mergetune.search.storage import open_storage
from mergetune.search.worker import WorkerSetup

TINY_DIMS = {"vocab_size": 99, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
BERT_TASKS = {"sst2": 2, "mnli": 3, "topic": 4}  # task -> number of labels
LLAMA_TASKS = ("math", "code", "chat")
EXPERT_NOISE = 0.01

ModelDirs = tuple[Path, dict[str, Path]]
State = dict[str, torch.Tensor]


#: Tests that run the real mergekit (the ``mergekit`` extra, which ``make setup`` installs).
needs_mergekit = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None,
    reason="mergekit is an optional test dependency: pip install -e '.[mergekit]' (make setup installs it)",
)


@contextmanager
def mounted_tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``mount_point`` with ``options`` (e.g. ``size=256k``, ``ro``) for the block.

    Faults such as a full disk or a read-only folder are real only on a real file system; mounting
    needs root (CI and the development machines run as root). Where mounting is refused, the test is
    skipped with the system's own reason.
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def perturb_(model: torch.nn.Module, seed: int, scale: float = EXPERT_NOISE) -> torch.nn.Module:
    """Add seeded Gaussian noise to every floating parameter in place (a stand-in fine-tune)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model


def tiny_bert_config(**overrides: object):
    """A 2-layer, 16-wide BERT config (about 10k parameters)."""
    from transformers import BertConfig

    return BertConfig(**{**TINY_DIMS, "intermediate_size": 32, **overrides})


def tiny_llama_config(**overrides: object):
    """A 2-layer, 16-wide Llama config with grouped-query attention (1 KV head)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_DIMS, "intermediate_size": 32, "num_key_value_heads": 1, **overrides})


def build_bert_models(root: Path) -> ModelDirs:
    """Save a BertModel base and one BertForSequenceClassification expert per task under ``root``."""
    from transformers import BertForSequenceClassification, BertModel

    with seeded(0):
        base = BertModel(tiny_bert_config())
    base.save_pretrained(root / "base")
    experts = {}
    for i, (task, num_labels) in enumerate(BERT_TASKS.items()):
        with seeded(100 + i):
            expert = BertForSequenceClassification(tiny_bert_config(num_labels=num_labels))
        expert.bert.load_state_dict(base.state_dict())
        perturb_(expert, seed=200 + i)
        expert.save_pretrained(root / task)
        experts[task] = root / task
    return root / "base", experts


def build_llama_models(root: Path) -> ModelDirs:
    """Save a LlamaForCausalLM base and one perturbed copy of it per task under ``root``."""
    from transformers import LlamaForCausalLM

    with seeded(1):
        base = LlamaForCausalLM(tiny_llama_config())
    base.save_pretrained(root / "base")
    experts = {}
    for i, task in enumerate(LLAMA_TASKS):
        expert = LlamaForCausalLM(base.config)
        expert.load_state_dict(base.state_dict())
        perturb_(expert, seed=300 + i)
        expert.save_pretrained(root / task)
        experts[task] = root / task
    return root / "base", experts


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> ModelDirs:
    """(base folder, {task: expert folder}): BERT base, sequence-classification experts (2, 3, 4 labels)."""
    return build_bert_models(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> ModelDirs:
    """(base folder, {task: expert folder}): Llama causal-LM base and perturbed experts."""
    return build_llama_models(tmp_path_factory.mktemp("tiny_llama"))


def run_wide_folder(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder shared by every pytest-xdist worker of this run (``<basetemp>/<name>``), private to the run.

    Each worker's ``tmp_path_factory`` lives under ``<basetemp>/popen-gwN``; one level up is the run's
    own base folder, so what is built there once serves both workers instead of being built per worker.
    """
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / name
    folder.mkdir(exist_ok=True)
    return folder


def built_once(cache: Path, zoo: str) -> Zoo:
    """``build_zoo(zoo)`` into ``cache``, trained by whichever worker takes the lock first; the other reads it back.

    Concurrent builds of one zoo are safe without the lock (experts are published by atomic renames) but
    would train every expert twice on the run's two cores.
    """
    with FileLock(cache / f".{zoo}.lock"):
        return build_zoo(zoo, cache_dir=cache, progress=False)


@pytest.fixture(scope="session")
def shared_zoo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's zoo cache holding the real tiny zoo, shared by every worker (it is only read, never changed)."""
    cache = run_wide_folder(tmp_path_factory, "zoo-cache")
    built_once(cache, "tiny")
    return cache


@pytest.fixture(scope="session")
def tiny_zoo(shared_zoo_cache: Path) -> Zoo:
    """The real tiny zoo (3 experts of a random 2-layer BERT trained on real corpora), from the run's zoo cache."""
    return built_once(shared_zoo_cache, "tiny")


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Nothing reaches the network: the hub client is offline, its cache an empty folder (returned).

    The environment variable alone is not enough once ``huggingface_hub`` is imported (it reads
    it at import time), so the module constants are patched too.
    """
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def zoo_env(shared_zoo_cache: Path) -> dict[str, str]:
    """Environment pointing at the run's zoo cache (the tiny zoo built), with kernel compilation off."""
    return {"MERGETUNE_CACHE": str(shared_zoo_cache), "MERGETUNE_COMPILE": "0"}


def write_search_config(path: Path, **overrides: Any) -> Path:
    """A search config over the tiny zoo (TA and TIES, λ per task, TPE) written to ``path``; the run folder
    is ``run`` beside it. ``overrides`` replace whole top-level sections."""
    config = {
        "name": "tiny-test",
        "models": {"zoo": "tiny"},
        "space": {"methods": ["task_arithmetic", "ties"], "weight": {"per": "task"}},
        "optimizer": {"name": "tpe"},
        "budget": {"candidates": 10},
        "selection": {"rescore_top": 2},
        "output": str(path.parent / "run"),
        **overrides,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def zoo_setup(env: dict[str, str], config_path: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerSetup:
    """The worker setup of a tiny-zoo search config written at ``config_path`` (``write_search_config``), with
    ``env`` (``zoo_env``: the zoo cache, no compilation) set for as long as ``monkeypatch`` lasts."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = SearchConfig.load(write_search_config(config_path))
    return worker_setup(config, resolve_models(config))


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mergetune.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def trials_by_state(journal: Path, name: str = "tiny-test") -> dict[TrialState, list[optuna.trial.FrozenTrial]]:
    study = optuna.load_study(study_name=name, storage=open_storage(journal))
    out: dict[TrialState, list] = {}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.state, []).append(t)
    return out


# ---- in-memory models, recipes over them, and their merge (merge-method tests) ----------------------
#: A small Llama-like layout: an embedding, two blocks (matrices, a bias, a one-element tensor), a norm.
LAYERED_SHAPES = {
    "embed_tokens.weight": (6, 4),
    "layers.0.w": (4, 5),
    "layers.0.bias": (5,),
    "layers.1.w": (3, 4),
    "layers.1.scale": (1,),
    "norm.weight": (4,),
}


def make_models(
    shapes: dict[str, tuple[int, ...]], tasks: Sequence[str], *, seed: int = 0, noise: float = 0.5
) -> tuple[State, dict[str, State]]:
    """A random base state dict and one expert per task: the base plus ``noise`` times standard normal noise.

    Drawn from one generator seeded with ``seed``: the base's tensors in ``shapes`` order, then
    each task's noise in ``tasks`` order, so the same arguments always give the same tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    experts = {t: {k: v + noise * torch.randn(v.shape, generator=gen) for k, v in base.items()} for t in tasks}
    return base, experts


def make_recipe(method: str, tasks: Sequence[str], **fields: Any) -> Recipe:
    """A recipe of ``method`` over in-memory experts named ``tasks`` (their paths are placeholders).

    Parsed like a recipe file (the recipe's checks, then the method registry's), so invalid fields or
    options raise ``RecipeError``.
    """
    experts = [{"name": t, "model": "x"} for t in tasks]
    return parse_recipe({"base": "b", "experts": experts, "method": method, **fields})


def merge(modelset: ModelSet, recipe: Recipe, *, compile: bool = False, **merger_options: Any) -> State:
    """The merged tensors, cloned: the Merger returns views of a buffer that its next merge overwrites."""
    merged = Merger(modelset, compile=compile, **merger_options).merge(recipe)
    return {k: v.clone() for k, v in merged.items()}
