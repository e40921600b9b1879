"""Several devices in one worker: the placement plan, the per-device merge and evaluation through a device map.

This machine has no GPU, and torch has one CPU device: the devices here are ``cpu`` entries, which the
code treats exactly as ``cuda:i`` entries (one store part, one merge buffer and one accelerate hook per
entry; only the device strings differ). The merge and scores must equal the one-device run bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama_config, trials_by_state, write_search_config
from optuna.trial import TrialState

from mergetune.errors import MergetuneError
from mergetune.forward import best_prefix
from mergetune.merging import placement as placement_module
from mergetune.merging.engine import Merger
from mergetune.merging.modelset import STORAGE_DTYPES, ModelSet
from mergetune.merging.placement import (
    Placement,
    group_store_bytes,
    module_device_map,
    plan_placement,
    resolve_devices,
)
from mergetune.merging.residency import MemoryBudget
from mergetune.recipe import Expert, Recipe
from mergetune.search.config import SearchConfig, SearchConfigError
from mergetune.search.loop import open_search, resolve_models, worker_setup
from mergetune.search.ray_executor import RayExecutor, RayOptions
from mergetune.search.worker import Worker

Dirs = tuple[Path, dict[str, Path]]
SIZES = {"embed": 10, "blocks.0": 30, "blocks.1": 30, "blocks.2": 30, "head": 20}


# ---- the plan ------------------------------------------------------------------------------------------------


def _plan(devices: int, budget: int | None = None, sizes: dict[str, int] = SIZES) -> list[int]:
    return list(plan_placement(sizes, ["cpu"] * devices, "balanced", budget).group_device)


def test_balanced_plan_is_the_contiguous_split_with_the_smallest_largest_part() -> None:
    # 2 devices: cuts after embed (10 | 110), blocks.0 (40 | 80), blocks.1 (70 | 50), blocks.2 (100 | 20):
    # the smallest largest part is 70, and the fill at 70 puts embed, blocks.0, blocks.1 on device 0
    assert _plan(2) == [0, 0, 0, 1, 1]
    # 3 devices: the best largest part is 50 (40 | 30 | 50); filling at 50: 10+30 | 30 (30+30 > 50) | 30+20
    assert _plan(3) == [0, 0, 1, 2, 2]
    # more devices than groups can use: each group alone at the largest group's size, the fifth device idle
    assert _plan(6) == [0, 1, 2, 3, 4]
    assert _plan(1) == [0] * 5
    assert plan_placement(SIZES, ["cpu"] * 2).group_device == plan_placement(SIZES, ["cpu"] * 2, "auto").group_device


def test_a_device_budget_caps_each_part() -> None:
    # 4 devices at 45 bytes each: capacity 30 leaves head without a device, 40 fits: 10+30 | 30 | 30 | 20
    assert _plan(4, budget=45) == [0, 0, 1, 2, 3]
    with pytest.raises(MergetuneError, match=r"does not fit 3 device\(s\) with resources.device_memory 45 B each"):
        _plan(3, budget=45)  # 40 | 30 | 30, and head (20) is left over
    with pytest.raises(MergetuneError, match=r"largest group 30 B"):
        _plan(8, budget=25)  # no device holds a block


def test_the_plan_reports_each_device_its_groups_and_bytes() -> None:
    plan = plan_placement(SIZES, ["cuda:0", "cuda:1", "cuda:2"], "balanced")
    assert plan.device_bytes() == [40, 30, 50]
    assert plan.describe() == (
        "device map: 0:cuda:0 ← embed..blocks.0 (40 B); 1:cuda:1 ← blocks.1 (30 B); 2:cuda:2 ← blocks.2..head (50 B)"
    )
    idle = plan_placement({"embed": 5, "head": 7}, ["cpu"] * 3)
    assert idle.group_device == (0, 1) and idle.describe().endswith("2:cpu ← nothing (0 B)")


TENSORS = {
    "embed": ["model.embed_tokens.weight"],
    "blocks.0": ["model.layers.0.mlp.weight", "model.layers.0.attn.weight"],
    "blocks.1": ["model.layers.1.mlp.weight", "model.layers.1.attn.weight"],
    "blocks.2": ["model.layers.2.mlp.weight"],
    "head": ["model.norm.weight", "lm_head.weight"],
}


def _explicit(device_map: dict[str, str | int], devices: list[str] | None = None) -> list[int]:
    return list(plan_placement(SIZES, devices or ["cpu", "cpu"], device_map, group_tensors=TENSORS).group_device)


def test_an_explicit_map_takes_group_names_module_prefixes_and_positions() -> None:
    # the most specific key wins: "model.layers.1" over "model"; "" covers the rest
    device_map = {"": 0, "model.layers.1": 1, "blocks.2": 1, "lm_head": 0}
    assert _explicit(device_map) == [0, 0, 1, 1, 0]
    by_name = {"embed": "cuda:1", "model.layers": "cuda:0", "head": "cuda:1"}
    assert _explicit(by_name, ["cuda:0", "cuda:1"]) == [1, 0, 0, 0, 1]


def test_an_explicit_map_must_cover_every_group_on_one_device() -> None:
    with pytest.raises(MergetuneError, match=r"does not cover the layer group\(s\) \['blocks.1', 'head'\]"):
        _explicit({"embed": 0, "blocks.0": 0, "blocks.2": 1})
    with pytest.raises(MergetuneError, match=r"splits layer group 'blocks.0' over several devices"):
        _explicit({"": 0, "model.layers.0.mlp": 1})
    with pytest.raises(MergetuneError, match=r"'cuda:3' is not one of resources.devices \['cpu', 'cpu'\]"):
        _explicit({"": "cuda:3"})
    with pytest.raises(MergetuneError, match=r"2 is not one of resources.devices"):
        _explicit({"": 2})
    with pytest.raises(MergetuneError, match=r"puts 120 B of the store on cpu, over resources.device_memory \(100 B\)"):
        plan_placement(SIZES, ["cpu", "cpu"], {"": 0}, budget=100, group_tensors=TENSORS)


def test_devices_are_checked_against_the_visible_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_devices(["cpu", "cpu"]) == ["cpu", "cpu"]
    with pytest.raises(MergetuneError, match=r"device cuda:7 does not exist here; visible devices: cpu"):
        resolve_devices(["cuda:7"])
    if not torch.cuda.is_available():
        with pytest.raises(MergetuneError, match=r"auto found no accelerator \(visible devices: cpu"):
            resolve_devices("auto")
    # what a two-GPU machine reports (the listing is faked; the rules are the ones that run there)
    monkeypatch.setattr(placement_module, "visible_devices", lambda: ["cpu", "cuda:0", "cuda:1"])
    assert resolve_devices("auto") == ["cuda:0", "cuda:1"]
    assert resolve_devices(["cuda", "cuda:1"]) == ["cuda:0", "cuda:1"]
    with pytest.raises(
        MergetuneError, match=r"device cuda:2 does not exist here; visible devices: cpu, cuda:0, cuda:1"
    ):
        resolve_devices(["cuda:0", "cuda:2"])
    with pytest.raises(MergetuneError, match=r"mixes the CPU with accelerators"):
        resolve_devices(["cuda:0", "cpu"])


# ---- the merge, per device -------------------------------------------------------------------------------------


def _recipe(base: Path, experts: dict[str, Path], method: str, **fields: Any) -> Recipe:
    return Recipe(
        base=str(base),
        experts=[Expert(name=t, model=str(p)) for t, p in experts.items()],
        method=method,
        **{"density": 0.4, **fields},
    )


def _placement(modelset: ModelSet, devices: int, device_map: Any = "balanced") -> Placement:
    groups = modelset.layer_groups(1)
    return plan_placement(
        group_store_bytes(modelset, groups),
        ["cpu"] * devices,
        device_map,
        group_tensors={g: groups.members(g) for g in groups.names},
    )


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("task_arithmetic", {}),
        ("ties", {"options": {"scope": "global"}}),
        ("ties", {"options": {"scope": "tensor"}, "grouping": {"granularity": 2}}),
        ("dare_ties", {"seed": 7}),
        ("breadcrumbs", {}),
        ("pcb", {}),
        ("della", {}),
        ("tsv", {}),  # a whole-tensor (SVD) method: computed from the host store, written into its part
        ("model_stock", {}),
    ],
)
def test_a_placed_merge_equals_the_one_device_merge_bit_for_bit(
    tiny_llama_dir: Dirs, method: str, fields: dict[str, Any]
) -> None:
    base, experts = tiny_llama_dir
    modelset = ModelSet.load(base, experts)
    recipe = _recipe(base, experts, method, **fields)
    want = Merger(modelset, compile=False).merge(recipe)
    # contiguous (2 parts) and scattered (embed and head together, the blocks apart: 3 parts) maps
    for placement in (_placement(modelset, 2), _placement(modelset, 3, {"embed": 1, "head": 1, "blocks.0": 0, "": 2})):
        merger = Merger(modelset, compile=False, placement=placement)
        got = merger.merge(recipe)
        assert list(got) == list(want)
        assert all(torch.equal(got[k], want[k]) for k in want), (method, placement.describe())
        _assert_in_their_parts(merger, placement, got)


def _assert_in_their_parts(merger: Merger, placement: Placement, merged: dict[str, torch.Tensor]) -> None:
    """Each merged tensor is a view of the buffer of its group's device, and its part holds only its groups."""
    groups = merger.modelset.layer_groups(1)
    buffers = merger.output_buffers(torch.float32)
    for name, tensor in merged.items():
        device = placement.device_of(groups.names[groups.index(name)])
        assert tensor.untyped_storage().data_ptr() == buffers[device].untyped_storage().data_ptr(), name
    sizes = [part.numel * (merger.modelset.n_tasks + 1) * 4 for part in merger.parts()]
    assert sizes == placement.device_bytes()


def test_a_bf16_store_on_disk_merges_per_device_like_on_one(tiny_llama_dir: Dirs, tmp_path: Path) -> None:
    """The host side of a placement may be the disk tier: parts are copied from the mapped file, segment by segment."""
    base, experts = tiny_llama_dir
    budget = MemoryBudget(memory=1, disk_dir=str(tmp_path))
    on_disk = ModelSet.load(base, experts, budget=budget, storage_dtype=STORAGE_DTYPES["bfloat16"])
    assert on_disk.residency.tier == "disk"
    recipe = _recipe(base, experts, "ties", dtype="bfloat16", storage_dtype="bfloat16")
    want = Merger(on_disk, compile=False).merge(recipe)
    placement = _placement(on_disk, 2)
    merger = Merger(on_disk, compile=False, placement=placement)
    got = merger.merge(recipe)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    rounded = merger.merge(recipe, into=torch.float32)  # the bf16 merge's values in the float32 buffers
    assert all(v.dtype == torch.float32 and torch.equal(v, want[k].float()) for k, v in rounded.items())
    with pytest.raises(MergetuneError, match=r"not available with several devices"):
        merger.output_buffer(torch.float32)


# ---- evaluation through the same map --------------------------------------------------------------------------


def _tied_llama(root: Path) -> tuple[ModelSet, torch.nn.Module]:
    """A Llama whose output head is its input embedding (one tensor in the checkpoint), with one expert."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert base.lm_head.weight is base.model.embed_tokens.weight
    base.save_pretrained(root / "tied-base")
    with torch.no_grad():
        base.model.norm.weight.add_(0.5)
    base.save_pretrained(root / "tied-expert")
    modelset = ModelSet.load(root / "tied-base", {"x": root / "tied-expert"})
    assert "lm_head.weight" not in modelset.layer_groups(1).of_tensor
    return modelset, LlamaForCausalLM.from_pretrained(root / "tied-base")


def test_module_map_follows_the_groups_and_ties(tiny_llama_dir: Dirs, tiny_bert_dir: Dirs, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base, experts = tiny_llama_dir
    modelset = ModelSet.load(base, experts)
    placement = _placement(modelset, 2)  # embed, blocks.0 | blocks.1, head (61.25 | 61.50 KiB)
    assert placement.group_device == (0, 0, 1, 1)
    llama = AutoModelForCausalLM.from_pretrained(base)
    assert module_device_map(llama, placement, modelset.layer_groups(1)) == {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.norm": 1,
        "model.rotary_emb": 1,  # no weights of the store: the device of the module before it
        "lm_head": 1,
    }
    tied_set, tied = _tied_llama(tmp_path)
    tied_placement = _placement(tied_set, 2)
    assert tied_placement.device_of("embed") == 0 and tied_placement.device_of("head") == 1
    assert module_device_map(tied, tied_placement, tied_set.layer_groups(1))["lm_head"] == 0  # with its embedding

    bert_base, bert_experts = tiny_bert_dir
    bert_set = ModelSet.load(bert_base, bert_experts)
    bert_placement = _placement(bert_set, 2)
    folder = next(iter(bert_experts.values()))
    classifier = AutoModelForSequenceClassification.from_pretrained(folder)
    found = module_device_map(classifier, bert_placement, bert_set.layer_groups(1))
    assert found["classifier"] == found["bert.pooler"] == bert_placement.device_of("head")  # the task head follows
    assert found["bert.embeddings"] == 0


def test_a_search_over_two_devices_scores_like_the_one_device_run(
    tmp_path: Path, zoo_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny zoo searched with its store over two (CPU) devices: every score equals the plain worker's."""
    for key, value in zoo_env.items():
        monkeypatch.setenv(key, value)
    cfg = write_search_config(tmp_path / "c.yaml", resources={"devices": ["cpu", "cpu"]}, budget={"candidates": 4})
    config = SearchConfig.load(cfg)
    loop = open_search(config)
    try:
        summary = loop.run()
        placed: Worker = loop.executor.worker  # type: ignore[attr-defined]
        _assert_dispatched_and_bound(placed)
    finally:
        loop.close()
    assert placed.placement is not None and len(placed.merger.parts()) == 2
    executor = summary["meta"]["executor"]
    assert "device map: 0:cpu ← embed" in executor and "; 1:cpu ← " in executor and "head" in executor
    assert executor in json.loads((tmp_path / "run" / "summary.json").read_text())["meta"]["executor"]

    plain = Worker(dataclasses.replace(worker_setup(config, resolve_models(config)), devices=None))
    assert plain.placement is None
    assert plain.references() == placed.references()  # the experts' references, scored through the map too
    trials = trials_by_state(tmp_path / "run" / "search.journal")
    assert set(trials) == {TrialState.COMPLETE} and len(trials[TrialState.COMPLETE]) == 4
    for trial in trials[TrialState.COMPLETE]:
        again = plain.evaluate(trial.user_attrs["recipe"])
        assert again.scores == trial.user_attrs["scores"], trial.number
        assert again.metrics == trial.user_attrs["metrics"], trial.number


def _assert_dispatched_and_bound(worker: Worker) -> None:
    """Every task model runs under accelerate's hooks, its merged weights the buffer of their group's device."""
    placement = worker.placement
    assert placement is not None
    groups = worker.modelset.layer_groups(1)
    buffers = [b.untyped_storage().data_ptr() for b in worker.merger.output_buffers(torch.float32)]
    for model in worker.models.values():
        assert hasattr(model, "_hf_hook")  # dispatch_model's root hook (inputs and outputs on the main device)
        params = dict(model.named_parameters())
        prefix = best_prefix(params, dict.fromkeys(groups.of_tensor))  # type: ignore[arg-type]
        for name, index in groups.of_tensor.items():
            storage = params[prefix + name].untyped_storage().data_ptr()
            assert storage == buffers[placement.device_of(groups.names[index])], name


# ---- configuration ------------------------------------------------------------------------------------------------


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    cases = [
        ({"resources": {"device_map": {"": 0}}}, "resources.device_map applies with resources.devices"),
        ({"resources": {"devices": "auto"}}, "auto takes every accelerator; set evaluation.device"),
        ({"resources": {"devices": ["cuda:0"]}}, r"resources.devices \['cuda:0'\] are not of the kind"),
        (
            {
                "resources": {"devices": ["cuda:0", "cuda:1"]},
                "evaluation": {"device": "cuda"},
                "execution": {"executor": "ray", "gpus_per_worker": 1},
            },
            "gpus_per_worker 1 is fewer than the 2 resources.devices",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(SearchConfigError, match=message):
            SearchConfig.load(write_search_config(tmp_path / "c.yaml", **overrides))


def test_a_ray_worker_reserves_all_its_devices_on_one_actor(tmp_path: Path) -> None:
    """num_gpus = the worker's device count: Ray gives one actor (one process, one node) all of them together."""
    setup = worker_setup(
        SearchConfig.load(
            write_search_config(
                tmp_path / "c.yaml",
                resources={"devices": ["cuda:0", "cuda:1", "cuda:2"]},
                evaluation={"device": "cuda"},
                execution={"executor": "ray"},
            )
        ),
        _models_stub(),
    )
    executor = object.__new__(RayExecutor)  # the reservation rule only: no Ray runtime on this machine's CPU test
    executor.setup, executor.options = setup, RayOptions()
    assert setup.devices == ("cuda:0", "cuda:1", "cuda:2") and executor._gpus_per_worker() == 3.0
    executor.options = RayOptions(gpus_per_worker=4)
    assert executor._gpus_per_worker() == 4


def _models_stub() -> Any:
    from mergetune.search.loop import ResolvedModels

    return ResolvedModels("base", {"a": "a"}, [])
