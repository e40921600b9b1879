"""``mergetune merge`` end to end: tiny random BERT and Llama models, merged through the CLI,
loaded back with transformers, and reproduced bit for bit from the recipe the folder holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.merging.engine import Merger
from mergetune.merging.modelset import ModelSet
from mergetune.recipe import Recipe

runner = CliRunner()


def write_recipe(path: Path, base: Path, experts: dict[str, Path], **fields: object) -> Path:
    recipe = Recipe(base=str(base), experts=[{"name": t, "model": str(p)} for t, p in experts.items()], **fields)
    return recipe.save(path)


def run_merge(recipe: Path, out: Path, *extra: str) -> None:
    result = runner.invoke(app, ["merge", str(recipe), str(out), "--engine", "eager", *extra])
    assert result.exit_code == 0, result.output


def test_bert_merge_loads_with_transformers_and_keeps_heads(tiny_bert_dir, tmp_path):
    from transformers import AutoModel

    base_dir, experts = tiny_bert_dir
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, experts, method="ties", weight=0.9, density=0.5)
    run_merge(recipe, tmp_path / "out")

    model = AutoModel.from_pretrained(tmp_path / "out")
    base = AutoModel.from_pretrained(base_dir)
    # The merged folder has the base's architecture and the merged weights, not the base's.
    merged = Merger(ModelSet.load(base_dir, experts), compile=False).merge(Recipe.load(recipe))
    name = "encoder.layer.1.output.dense.weight"
    assert torch.equal(model.state_dict()[name], merged[name])
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
    # One classification head per task, with the task's own number of labels, never merged.
    for task, expert_dir in experts.items():
        head = load_file(tmp_path / "out" / "heads" / f"{task}.safetensors")
        expert = load_file(expert_dir / "model.safetensors")
        assert torch.equal(head["classifier.weight"], expert["classifier.weight"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "method: ties" in card and f"`{base_dir}`" in card
    assert "base_model:" not in card  # a local path: the hub's metadata takes hub ids only


@pytest.mark.parametrize("method", ["dare_ties", "della", "pcb"])
def test_llama_merge_reproduces_bit_for_bit_from_its_recipe(tiny_llama_dir, tmp_path, method):
    from transformers import AutoModelForCausalLM

    base_dir, experts = tiny_llama_dir
    density = 0.5 if method != "della" else 0.4
    recipe = write_recipe(tmp_path / "r.json", base_dir, experts, method=method, weight=0.7, density=density, seed=3)
    run_merge(recipe, tmp_path / "first")
    run_merge(tmp_path / "first" / "recipe.yaml", tmp_path / "again")  # the recipe the folder carries

    first = load_file(tmp_path / "first" / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "first")
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 99) and torch.isfinite(logits).all()


def test_dtype_of_the_folder_follows_the_recipe(tiny_llama_dir, tmp_path):
    base_dir, experts = tiny_llama_dir
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, experts, method="task_arithmetic", dtype="bfloat16")
    run_merge(recipe, tmp_path / "out")
    state = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert '"dtype": "bfloat16"' in (tmp_path / "out" / "config.json").read_text()


def test_bad_recipe_gives_a_one_line_error_naming_the_field(tiny_llama_dir, tmp_path):
    base_dir, experts = tiny_llama_dir
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"base: {base_dir}\nexperts:\n  - {{name: math, model: {experts['math']}}}\n"
        "method: ties\ndensity: 0.2\noptions: {scope: global, dencity: 0.3}\n"
    )
    result = runner.invoke(app, ["merge", str(bad), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "options.dencity" in result.output and "unknown key" in result.output
    assert "Traceback" not in result.output


def test_missing_expert_folder_is_named(tiny_llama_dir, tmp_path):
    base_dir, _ = tiny_llama_dir
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, {"math": tmp_path / "nowhere"}, method="task_arithmetic")
    result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "expert 'math'" in result.output and "nowhere): no such file or folder" in result.output
