"""``mergetune merge`` streams tensor by tensor: the same bits as the resident merge, shards written in place.

Real tiny Llama and BERT checkpoints (``conftest``), saved in bfloat16 where ties matter (rounded
weights tie often, at every top-k cut). The reference is the resident engine (``ModelSet`` +
``Merger``), computed independently of the streaming code.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import time
from enum import Enum
from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.errors import BadWeightsError
from mergetune.merging.engine import Merger
from mergetune.merging.methods import METHODS, MethodOptions, parse_recipe
from mergetune.merging.modelset import ModelSet
from mergetune.merging.oneshot import GlobalThresholds, StreamInputs
from mergetune.merging.save import merge_to_folder
from mergetune.merging.shards import INDEX_FILE, PARTIAL_SUFFIX
from mergetune.parallel import torch_threads
from mergetune.recipe import Recipe

# Per-task weights and per-group densities (anchors over the layer groups): each group has its own k.
WEIGHT = {"math": 0.7, "code": 1.2, "*": 0.9}
DENSITY = {"*": [0.3, 0.5]}


@pytest.fixture(scope="module")
def bf16_llama(tiny_llama_dir, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The tiny Llama base and experts rounded to bfloat16 (their task vectors tie like real checkpoints')."""
    from transformers import LlamaForCausalLM

    base_dir, experts = tiny_llama_dir
    root = tmp_path_factory.mktemp("bf16_llama")
    out = {}
    for name, folder in {"base": base_dir, **experts}.items():
        LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(root / name)
        out[name] = root / name
    return out.pop("base"), out


def recipe_of(models: tuple[Path, dict[str, Path]], method: str, **fields: Any) -> Recipe:
    """A recipe over the experts, as many as the method takes (SLERP, Arcee Fusion: one; NuSLERP: two)."""
    base, experts = models
    _, most = METHODS[method].experts
    listed = [{"name": task, "model": str(folder)} for task, folder in list(experts.items())[:most]]
    names = {e["name"] for e in listed} | {"*"}
    for key in ("weight", "density"):  # per-task values of the experts listed only
        if isinstance(fields.get(key), dict):
            fields[key] = {t: v for t, v in fields[key].items() if t in names}
    return parse_recipe({"base": str(base), "experts": listed, "method": method, **fields})


def resident(recipe: Recipe) -> dict[str, torch.Tensor]:
    """The in-memory merge on one torch thread: what an eager one-shot merge on CPU equals whatever its threads
    (each tensor merges on one; matrix products and SVDs round by their thread count)."""
    with torch_threads(1):
        modelset = ModelSet.from_recipe(recipe)
        merged = Merger(modelset, compile=False).merge(recipe)
    return {**{k: v.clone() for k, v in merged.items()}, **modelset.passthrough}


def written(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    state: dict[str, torch.Tensor] = {}
    for fname in files or ["model.safetensors"]:
        state.update(load_file(folder / fname))
    return state


def assert_same_bits(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), name


def _choices(options: type[MethodOptions], field: str) -> list[str]:
    annotation = options.model_fields[field].annotation if field in options.model_fields else None
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [m.value for m in annotation]
    return [str(v) for v in get_args(annotation)]


def variants() -> list[tuple[str, dict[str, Any]]]:
    """Every registered static method with its defaults, then once per scope × tie rule it offers."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name, method in sorted(METHODS.items()):
        if method.dynamic or method.needs_data:  # RegMean's Gram files: its streamed merge is tested in test_regmean
            continue
        out.append((name, {}))
        scopes = _choices(method.Options, "scope") or [None]
        rules = _choices(method.Options, "tie_rule") or [None]
        for scope in scopes:
            for rule in rules:
                options = {k: v for k, v in {"scope": scope, "tie_rule": rule}.items() if v is not None}
                if options:
                    out.append((name, options))
    out += [("ties", {"sign_cancel": rule}) for rule in ("plus_one", "model_majority")]
    out += [("dare_ties", {"trim_density": 0.4, "scope": scope}) for scope in ("global", "tensor", "row")]
    return out


# What needs every entry of the model at once, merged resident (a reason is reported).
def needs_whole_model(method: str, options: dict[str, Any]) -> bool:
    scope = options.get("scope", METHODS[method].Options().model_dump().get("scope"))
    if options.get("sign_cancel") == "model_majority":
        return True
    return scope == "global" and (method == "pcb" or options.get("tie_rule") == "mergekit")


@pytest.mark.parametrize(("method", "options"), variants(), ids=lambda v: v if isinstance(v, str) else str(v))
def test_streamed_merge_equals_the_resident_merge_bit_for_bit(bf16_llama, tmp_path, method, options) -> None:
    recipe = recipe_of(bf16_llama, method, weight=WEIGHT, density=DENSITY, options=options, dtype="bfloat16", seed=7)
    with torch_threads(2):  # two tensors merge at once (streamed) or one per call, on two threads (resident)
        done = merge_to_folder(recipe, tmp_path / "out", compile=False)
        assert torch.get_num_threads() == 2  # restored after the streamed merge's one thread per tensor
    assert_same_bits(written(tmp_path / "out"), resident(recipe))
    assert done.streamed is not needs_whole_model(method, options), done.resident_reason
    if not done.streamed:
        assert done.resident_reason


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_a_recipe_found_on_a_rounded_store_streams_the_same_bits(bf16_llama, tmp_path, storage: str) -> None:
    """A search with ``resources.storage_dtype`` merged from a rounded store: ``merge`` rounds the same way."""
    recipe = recipe_of(bf16_llama, "ties", weight=WEIGHT, density=0.4, storage_dtype=storage)
    done = merge_to_folder(recipe, tmp_path / "out", compile=False)
    assert done.streamed
    assert_same_bits(written(tmp_path / "out"), resident(recipe))
    exact = merge_to_folder(recipe.model_copy(update={"storage_dtype": "float32"}), tmp_path / "f32", compile=False)
    assert exact.streamed and any(  # the rounding shows: the check above is not vacuous
        not torch.equal(a, written(tmp_path / "out")[name]) for name, a in written(tmp_path / "f32").items()
    )


@pytest.mark.parametrize(("storage", "passes"), [("float32", 3), ("bfloat16", 2)])
def test_global_scope_counts_and_ties_at_the_cut_are_kept_like_the_sort(
    bf16_llama, tmp_path, storage: str, passes: int
) -> None:
    """bf16 task vectors tie at the cut; the counted threshold is the sorted k-th largest, so all ties stay.

    Count, refine the cut buckets' low bits, merge; task vectors stored in bf16 hold one value per bucket, so
    the counting pass finds every cut and the refining pass is skipped."""
    recipe = recipe_of(bf16_llama, "ties", density=0.37, dtype="float32", storage_dtype=storage)
    done = merge_to_folder(recipe, tmp_path / "out", compile=False)
    assert done.streamed and done.passes == passes
    expected = resident(recipe)
    assert_same_bits(written(tmp_path / "out"), expected)


def test_float32_experts_with_one_shard_per_few_tensors_load_in_transformers(tiny_llama_dir, tmp_path) -> None:
    from transformers import LlamaForCausalLM

    recipe = recipe_of(tiny_llama_dir, "dare_linear", weight=0.5, density=0.6, seed=3)
    merge_to_folder(recipe, tmp_path / "out", compile=False, max_shard_bytes=4096)
    out = tmp_path / "out"
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    assert not list(out.glob(f"*{PARTIAL_SUFFIX}"))
    expected = resident(recipe)
    assert_same_bits(written(out), expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    model = LlamaForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    assert torch.equal(params["model.layers.1.mlp.up_proj.weight"], expected["model.layers.1.mlp.up_proj.weight"])


def test_bert_experts_with_a_prefix_and_heads_stream_like_the_resident_folder(tiny_bert_dir, tmp_path) -> None:
    """Expert names under ``bert.`` are matched to the base's; classifiers go to heads/ with their labels."""
    recipe = recipe_of(tiny_bert_dir, "ties", density=0.4, options={"scope": "tensor"})
    done = merge_to_folder(recipe, tmp_path / "out", compile=False)
    assert done.streamed
    assert_same_bits(written(tmp_path / "out"), resident(recipe))
    modelset = ModelSet.from_recipe(recipe)
    for task, heads in zip(modelset.task_names, modelset.task_tensors, strict=True):
        assert_same_bits(load_file(tmp_path / "out" / "heads" / f"{task}.safetensors"), heads)


def test_global_thresholds_equal_the_sorted_kth_largest_with_heavy_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    tau = (torch.randn(2, 5000, generator=gen) * 1e-3).to(torch.bfloat16).to(torch.float32)
    tau[0, :700] = 0.0  # many exact zeros, and -0.0 counts as 0
    tau[1, :3] = -0.0
    n = tau.shape[1]
    thresholds = GlobalThresholds(2)
    ks = [1, 2, 999, 2500, 4300, n]
    thresholds.lookup(torch.tensor([ks, ks]))  # records what is wanted
    assert thresholds.count(lambda: iter([tau[:, :1234], tau[:, 1234:]])) == 2
    got = thresholds.lookup(torch.tensor([ks, ks]))
    srt = tau.abs().sort(dim=1).values
    for t in range(2):
        for j, k in enumerate(ks):
            assert got[t, j].item() == srt[t, n - k].item()
    bf16 = GlobalThresholds(2)  # the values are bf16: one pass, the same thresholds
    bf16.lookup(torch.tensor([ks, ks]))
    assert bf16.count(lambda: iter([tau]), bf16_values=True) == 1
    assert torch.equal(bf16.lookup(torch.tensor([ks, ks])), got)
    assert math.isinf(thresholds.lookup(torch.tensor([[0], [0]]))[0, 0].item())


@pytest.mark.parametrize("spread", ["one_bucket", "many"])
def test_global_thresholds_refine_buckets_of_several_values_in_a_second_pass(spread: str) -> None:
    """float32 |τ| whose cut buckets hold several values (all in one bucket, or spread): the second pass counts
    the low bits; every k-th largest equals the sort's."""
    gen = torch.Generator().manual_seed(1)
    tau = torch.randn(3, 6000, generator=gen) * 1e-3
    if spread == "one_bucket":  # all values share their top 16 bits: every cut is in one many-valued bucket
        tau = torch.full((3, 6000), 1.5e-3) + torch.rand(3, 6000, generator=gen) * 1e-8
    tau[0, :50] = -tau[0, :50]
    n = tau.shape[1]
    thresholds = GlobalThresholds(3)
    ks = [1, 7, 3001, n - 1, n]
    thresholds.lookup(torch.tensor([ks] * 3))
    assert thresholds.count(lambda: iter([tau[:, :2500], tau[:, 2500:]])) == 2
    got = thresholds.lookup(torch.tensor([ks] * 3))
    srt = tau.abs().sort(dim=1).values
    for t in range(3):
        for j, k in enumerate(ks):
            assert got[t, j].item() == srt[t, n - k].item(), (t, k)


def test_a_truncated_expert_file_is_one_clear_error_naming_it_and_nothing_is_left_half_written(
    tiny_llama_dir, tmp_path
) -> None:
    base, experts = tiny_llama_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((experts["code"] / "config.json").read_text())
    data = (experts["code"] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 64])
    recipe = recipe_of((base, {**experts, "code": broken}), "task_arithmetic")
    with pytest.raises(BadWeightsError, match=r"broken/model\.safetensors.*truncated or corrupt"):
        merge_to_folder(recipe, tmp_path / "out", compile=False)


def test_a_nan_found_mid_stream_names_the_model_and_tensor_and_removes_partial_shards(tiny_llama_dir, tmp_path) -> None:
    base, experts = tiny_llama_dir
    state = load_file(experts["chat"] / "model.safetensors")
    last = sorted(state)[-1]
    state[last][0] = float("nan")
    bad = tmp_path / "nan"
    bad.mkdir()
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_text((experts["chat"] / "config.json").read_text())
    recipe = recipe_of((base, {**experts, "chat": bad}), "task_arithmetic")
    with pytest.raises(BadWeightsError, match=rf"expert 'chat'.*'{last}' has 1 NaN/inf"):
        merge_to_folder(recipe, tmp_path / "out", compile=False)
    assert not list((tmp_path / "out").glob("*.safetensors*"))


def test_shard_headers_are_aligned_and_ordered_like_safetensors_expects(tiny_llama_dir, tmp_path) -> None:
    recipe = recipe_of(tiny_llama_dir, "task_arithmetic", dtype="bfloat16")
    merge_to_folder(recipe, tmp_path / "out", compile=False)
    raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    assert header.pop("__metadata__") == {"format": "pt"}
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert 8 + length + spans[-1][1] == len(raw)


def test_cli_merge_says_it_streamed(tiny_llama_dir, tmp_path) -> None:
    recipe = recipe_of(tiny_llama_dir, "ties", density=0.5)
    path = tmp_path / "recipe.yaml"
    recipe.save(path)
    result = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out"), "--engine", "eager", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "streamed" in result.output and "3 passes" in result.output
    assert_same_bits(written(tmp_path / "out"), resident(recipe))


def test_auto_engine_compiles_a_one_shot_merge_only_when_it_is_large(tiny_llama_dir, tmp_path, monkeypatch) -> None:
    """``--engine auto``: a small recipe merges eager (compiling costs more than one pass saves), a merge of
    ``AUTO_COMPILE_ENTRIES`` or more compiles where a compiler is found; the CLI says which ran."""
    from mergetune.merging import oneshot
    from mergetune.merging.engine import compile_available

    recipe = recipe_of(tiny_llama_dir, "task_arithmetic", weight=0.5)
    path = tmp_path / "recipe.yaml"
    recipe.save(path)
    result = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "small"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "eager kernels" in result.output
    monkeypatch.setattr(oneshot, "AUTO_COMPILE_ENTRIES", 1)
    done = merge_to_folder(recipe, tmp_path / "large")
    assert done.compiled is compile_available(torch.device("cpu"))
    assert merge_to_folder(recipe, tmp_path / "forced", compile=False).compiled is False
    torch.testing.assert_close(written(tmp_path / "large"), written(tmp_path / "small"), atol=0, rtol=1e-6)


def test_a_tensor_that_fails_early_stops_the_merge_of_the_tensors_queued_behind_it(
    tiny_llama_dir, tmp_path, monkeypatch
) -> None:
    """Two tensors merge at once; when one fails, the tensors queued behind it are cancelled, not merged."""
    base, experts = tiny_llama_dir
    recipe = recipe_of((base, experts), "task_arithmetic")
    names = list(load_file(base / "model.safetensors"))
    read = StreamInputs.read_tau
    merged: list[str] = []

    def failing_read(self: StreamInputs, segment: Any, device: torch.device) -> Any:
        merged.append(segment.name)
        if len(merged) == 2:
            raise BadWeightsError(f"tensor '{segment.name}' made to fail")
        time.sleep(0.2)  # the others take a while: ample time for the failure to stop what is queued
        return read(self, segment, device)

    monkeypatch.setattr(StreamInputs, "read_tau", failing_read)
    with torch_threads(2), pytest.raises(BadWeightsError, match="made to fail"):
        merge_to_folder(recipe, tmp_path / "out", compile=False)
    # read: the first tensor and the failed one (measured: 2; a thread may take up one or two more meanwhile);
    # without the cancel, the 6 tensors the window had queued behind them were read too (8)
    assert 2 <= len(merged) <= 5 < len(names)
    assert not list((tmp_path / "out").glob("*.safetensors*"))
