"""The demo behind ``mergetune demo``: an end-to-end merge on the packaged MiniLM encoder.

Until the search loop lands, the demo builds four synthetic experts of the real
all-MiniLM-L6-v2 (seeded low-rank perturbations of the base, cached), merges them with TIES
through the same engine a search uses, writes the Hugging Face folder, loads it back with
``transformers`` and embeds two sentences.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.console import Console

from mergetune.merging.engine import Merger
from mergetune.merging.loading import read_folder
from mergetune.merging.modelset import ModelSet
from mergetune.merging.save import TOKENIZER_FILES, save_merged
from mergetune.packaged import packaged_model_dir
from mergetune.recipe import Recipe

DEMO_TASKS = ("sentiment", "topic", "spam", "questions")


def synthetic_expert(base_dir: Path, out_dir: Path, seed: int, scale: float = 2e-3) -> Path:
    """A stand-in expert: base + a seeded rank-4 perturbation per matrix (small, structured)."""
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = read_folder(base_dir)
    for name, w in state.items():
        if w.is_floating_point() and w.dim() == 2:
            u = torch.randn(w.shape[0], 4, generator=gen)
            v = torch.randn(4, w.shape[1], generator=gen)
            state[name] = w + scale * (u @ v) / 2.0
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    for fname in ("config.json", *TOKENIZER_FILES):
        if (base_dir / fname).is_file():
            shutil.copy2(base_dir / fname, out_dir / fname)
    return out_dir


def run_demo(out_dir: Path, console: Console) -> Path:
    base_dir = packaged_model_dir("minilm-l6")
    cache = Path(".cache/demo/experts")
    experts = {t: synthetic_expert(base_dir, cache / t, seed=i) for i, t in enumerate(DEMO_TASKS)}
    recipe = Recipe(
        base=str(base_dir),
        experts=[{"name": t, "model": str(p)} for t, p in experts.items()],
        method="ties",
        weight={"*": [0.8, 1.0]},  # a ramp over depth: later blocks take more of the experts
        density=0.2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe.save(out_dir / "recipe.yaml")
    modelset = ModelSet.from_recipe(recipe)
    merged = Merger(modelset).merge(recipe)
    folder = save_merged(modelset, merged, recipe, out_dir / "merged")
    console.print(f"recipe: {out_dir / 'recipe.yaml'}\nmerged model: {folder}")
    _show_embeddings(folder, console)
    return folder


def _show_embeddings(folder: Path, console: Console) -> None:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(["The merged model loads.", "Merging worked fine."], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    console.print(f"cosine similarity of two sentences with the merged encoder: {float(emb[0] @ emb[1]):.3f}")
