"""Safe loading of weights, and the ModelSet's task vectors, per-task tensors and input checks."""

from __future__ import annotations

import itertools
import json
import pathlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergetune.errors import BadWeightsError, IncompatibleModelsError, MergetuneError
from mergetune.merging.loading import load_model, read_folder
from mergetune.merging.modelset import ModelSet

StateDict = dict[str, torch.Tensor]
Dirs = tuple[Path, dict[str, Path]]  # (base folder, {task: expert folder}), from conftest


class SomeClass:
    """An arbitrary object: pickling it into a checkpoint must make weights_only refuse the file."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


class TouchOnLoad:
    """Unpickling this would create a file: proof that a refused checkpoint ran no code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return pathlib.Path.touch, (self.marker,)


def assert_same_state(a: StateDict, b: StateDict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def states(dirs: Dirs) -> tuple[StateDict, dict[str, StateDict]]:
    """Fresh copies of the base's and experts' state dicts (safe to corrupt in a test)."""
    base_dir, expert_dirs = dirs
    return load_file(base_dir / "model.safetensors"), {
        t: load_file(d / "model.safetensors") for t, d in expert_dirs.items()
    }


# ---- loading ---------------------------------------------------------------------------------------


def test_single_safetensors_folder_loads_weights_and_config(tiny_bert_dir: Dirs) -> None:
    from transformers import BertModel

    base_dir, _ = tiny_bert_dir
    loaded = load_model(base_dir)
    assert loaded.model_type == "bert" and loaded.folder == base_dir
    reference = dict(BertModel.from_pretrained(base_dir).state_dict())
    assert_same_state(loaded.state, reference)


def test_sharded_safetensors_loads_the_same_tensors(tiny_bert_dir: Dirs, tmp_path: Path) -> None:
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_bert_dir[0])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_same_state(load_model(tmp_path).state, load_model(tiny_bert_dir[0]).state)


def test_bin_checkpoint_loads_through_weights_only(tiny_bert_dir: Dirs, tmp_path: Path) -> None:
    reference = load_model(tiny_bert_dir[0]).state
    torch.save(reference, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((tiny_bert_dir[0] / "config.json").read_text())
    loaded = load_model(tmp_path)
    assert loaded.model_type == "bert"
    assert_same_state(loaded.state, reference)


def test_sharded_bin_checkpoint_loads(tiny_bert_dir: Dirs, tmp_path: Path) -> None:
    reference = load_model(tiny_bert_dir[0]).state
    names = sorted(reference)
    halves = {"pytorch_model-1.bin": names[::2], "pytorch_model-2.bin": names[1::2]}
    for fname, keys in halves.items():
        torch.save({k: reference[k] for k in keys}, tmp_path / fname)
    weight_map = {k: fname for fname, keys in halves.items() for k in keys}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_state(read_folder(tmp_path), reference)


def test_bin_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1), "x": SomeClass()}, path)
    pattern = r"pytorch_model\.bin: refused.*weights_only=True.*SomeClass.*safetensors"
    with pytest.raises(BadWeightsError, match=pattern):
        load_model(tmp_path)


def test_refused_bin_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"w": torch.zeros(1), "x": TouchOnLoad(marker)}, tmp_path / "evil.bin")
    with pytest.raises(BadWeightsError, match="refused"):
        load_model(tmp_path / "evil.bin")
    assert not marker.exists()


def test_bin_with_non_tensor_entries_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(BadWeightsError, match=r"not tensors.*'step'"):
        load_model(tmp_path)


def test_folder_without_weights_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MergetuneError, match=rf"{tmp_path}: no weights found"):
        load_model(tmp_path)


def test_several_safetensors_without_index_is_an_error(tmp_path: Path) -> None:
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"w": torch.zeros(2)}, str(tmp_path / name))
    with pytest.raises(MergetuneError, match=r"no model\.safetensors\.index\.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("relative", [False, True])
def test_missing_local_path_says_so_without_the_hub(
    tmp_path: Path, offline_hub: Path, monkeypatch: pytest.MonkeyPatch, relative: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    source = "./models/missing-model" if relative else str(tmp_path / "missing" / "model")
    with pytest.raises(MergetuneError, match="no such file or folder"):
        load_model(source)


def test_missing_hub_id_offline_is_a_clear_error(offline_hub: Path) -> None:
    with pytest.raises(MergetuneError, match="neither a local path nor a reachable hub model"):
        load_model("mergetune-tests/no-such-model")


def _tiny_module(arch: str) -> torch.nn.Module:
    """A tiny model whose in-memory names differ from its checkpoint's (tied or renamed weights)."""
    import transformers as tf

    if arch == "gpt2":  # lm_head tied to wte
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    if arch == "t5":  # shared tied to both embed_tokens and lm_head
        config = tf.T5Config(vocab_size=99, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
        return tf.T5ForConditionalGeneration(config)
    dims = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
    return tf.ViTModel(tf.ViTConfig(image_size=8, patch_size=4, **dims))  # blocks renamed in memory


@pytest.mark.parametrize("arch", ["gpt2", "t5", "vit"])
def test_module_source_has_its_checkpoint_names(arch: str, tmp_path: Path) -> None:
    module = _tiny_module(arch)
    module.save_pretrained(tmp_path)
    from_module, from_folder = load_model(module), load_model(tmp_path)
    assert from_module.model_type == from_folder.model_type == arch
    assert_same_state(from_module.state, from_folder.state)
    expert = {k: v + 0.01 for k, v in from_folder.state.items()}
    ms = ModelSet.load(module, {"task": expert})  # a module base against checkpoint-named experts
    assert len(ms.segments) == len(from_folder.state)
    # exactly expert − base in float32 (not 0.01: (v + 0.01) − v rounds for |v| ≳ 0.3)
    for s in ms.segments:
        assert torch.equal(ms.task_vector("task", s.name), expert[s.name] - from_folder.state[s.name])


def test_state_dict_source_must_hold_tensors() -> None:
    with pytest.raises(BadWeightsError, match="'lr'"):
        load_model({"w": torch.zeros(2), "lr": 0.1}, name="my dict")  # type: ignore[dict-item]


# ---- task vectors --------------------------------------------------------------------------------


def test_task_vectors_are_expert_minus_base(tiny_llama_dir: Dirs) -> None:
    base_dir, expert_dirs = tiny_llama_dir
    ms = ModelSet.load(base_dir, expert_dirs)
    base, experts = states(tiny_llama_dir)
    assert ms.task_names == list(expert_dirs) and ms.model_type == "llama"
    assert ms.tau.shape == (3, sum(t.numel() for t in base.values()))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(ms.base_tensor(name), base[name], rtol=0, atol=0)
        for task, state in experts.items():
            torch.testing.assert_close(ms.task_vector(task, name), state[name] - base[name], rtol=0, atol=0)
    assert ms.passthrough == {} and all(not t for t in ms.task_tensors)
    assert ms.layer_groups().names == ("embed", "blocks.0", "blocks.1", "head")


def test_flat_store_covers_each_tensor_once(tiny_llama_dir: Dirs) -> None:
    ms = ModelSet.load(tiny_llama_dir[0], tiny_llama_dir[1])
    offsets = [(s.offset, s.end) for s in ms.segments]
    assert offsets[0][0] == 0 and offsets[-1][1] == ms.numel
    assert all(a_end == b_start for (_, a_end), (b_start, _) in itertools.pairwise(offsets))
    assert ms.resident_bytes() == 4 * ms.numel * (ms.n_tasks + 1)


def test_classification_experts_align_to_a_bare_encoder(tiny_bert_dir: Dirs) -> None:
    base_dir, expert_dirs = tiny_bert_dir
    ms = ModelSet.load(base_dir, expert_dirs)
    base, experts = states(tiny_bert_dir)
    assert sorted(s.name for s in ms.segments) == sorted(base)  # encoder + pooler, no "bert." names
    name = "encoder.layer.0.attention.self.query.weight"
    for task, state in experts.items():
        torch.testing.assert_close(ms.task_vector(task, name), state["bert." + name] - base[name], rtol=0, atol=0)
    for task, heads, num_labels in zip(ms.task_names, ms.task_tensors, (2, 3, 4), strict=True):
        assert sorted(heads) == ["classifier.bias", "classifier.weight"]
        assert heads["classifier.weight"].shape == (num_labels, 16)
        assert torch.equal(heads["classifier.weight"], experts[task]["classifier.weight"])
    assert not any(s.name.startswith("classifier") for s in ms.segments)
    assert ms.layer_groups().names == ("embed", "blocks.0", "blocks.1", "head")
    assert ms.layer_groups(granularity=2).names == ("embed", "blocks.0-1", "head")


def test_causal_lm_experts_align_to_a_bare_decoder(tiny_llama_dir: Dirs) -> None:
    base, experts = states(tiny_llama_dir)
    bare = {k.removeprefix("model."): v for k, v in base.items() if k.startswith("model.")}  # LlamaModel names
    ms = ModelSet.load(bare, experts)
    assert sorted(s.name for s in ms.segments) == sorted(bare)
    name = "layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(ms.task_vector("math", name), experts["math"]["model." + name] - bare[name])
    assert all(sorted(heads) == ["lm_head.weight"] for heads in ms.task_tensors)  # only the experts have it


def test_integer_buffers_pass_through_from_the_base(tiny_bert_dir: Dirs) -> None:
    base, experts = states(tiny_bert_dir)
    position_ids = torch.arange(12).unsqueeze(0)
    base["embeddings.position_ids"] = position_ids
    for i, state in enumerate(experts.values()):
        state["bert.embeddings.position_ids"] = position_ids + i  # experts' copies are ignored
    ms = ModelSet.load(base, experts)
    assert list(ms.passthrough) == ["embeddings.position_ids"]
    assert torch.equal(ms.passthrough["embeddings.position_ids"], position_ids)
    assert "embeddings.position_ids" not in {s.name for s in ms.segments}


def test_module_and_state_dict_sources_match_folders(tiny_llama_dir: Dirs) -> None:
    from transformers import LlamaForCausalLM

    base_dir, expert_dirs = tiny_llama_dir
    from_dirs = ModelSet.load(base_dir, expert_dirs)
    modules = ModelSet.load(
        LlamaForCausalLM.from_pretrained(base_dir),
        {t: LlamaForCausalLM.from_pretrained(d) for t, d in expert_dirs.items()},
    )
    base, experts = states(tiny_llama_dir)
    dicts = ModelSet.load(base, list(experts.items()))
    for other in (modules, dicts):
        assert {s.name: s.shape for s in other.segments} == {s.name: s.shape for s in from_dirs.segments}
        for seg in from_dirs.segments:
            torch.testing.assert_close(other.base_tensor(seg.name), from_dirs.base_tensor(seg.name), rtol=0, atol=0)
            for task in from_dirs.task_names:
                torch.testing.assert_close(
                    other.task_vector(task, seg.name), from_dirs.task_vector(task, seg.name), rtol=0, atol=0
                )
    assert modules.model_type == "llama" and dicts.model_type is None


# ---- bad inputs ------------------------------------------------------------------------------------

UP = "model.layers.0.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"


def _wrong_shape(state: StateDict) -> None:
    state[UP] = torch.zeros(33, 16)


def _other_dtype(state: StateDict) -> None:
    state[UP] = state[UP].to(torch.bfloat16)


def _missing(state: StateDict) -> None:
    del state[UP]


def _bigger_vocab(state: StateDict) -> None:
    state[EMBED] = torch.cat([state[EMBED], torch.zeros(1, 16)])


def _nan(state: StateDict) -> None:
    state[UP][3, 4] = float("nan")


def _inf(state: StateDict) -> None:
    state[UP][0, 0] = float("-inf")


@pytest.mark.parametrize(
    ("corrupt", "error", "pattern"),
    [
        (_wrong_shape, IncompatibleModelsError, rf"tensor '{UP}' has shape \(33, 16\), the base has \(32, 16\)"),
        (_other_dtype, IncompatibleModelsError, rf"tensor '{UP}' is torch\.bfloat16, the base's is torch\.float32"),
        (_missing, IncompatibleModelsError, rf"missing tensor '{UP}'"),
        (_bigger_vocab, IncompatibleModelsError, rf"different vocabulary size in '{EMBED}': 100 rows .* 99"),
        (_nan, BadWeightsError, rf"tensor '{UP}' has 1 NaN/inf"),
        (_inf, BadWeightsError, rf"tensor '{UP}' has 1 NaN/inf"),
    ],
    ids=["shape", "dtype", "missing", "vocab", "nan", "inf"],
)
def test_bad_expert_is_named_with_its_tensor(
    tiny_llama_dir: Dirs,
    corrupt: Callable[[StateDict], None],
    error: type[Exception],
    pattern: str,
) -> None:
    base, experts = states(tiny_llama_dir)
    corrupt(experts["code"])
    with pytest.raises(error, match=rf"^expert 'code': .*{pattern}"):
        ModelSet.load(base, experts)


def test_nan_in_the_base_names_the_base_folder(tiny_llama_dir: Dirs, tmp_path: Path) -> None:
    base, _ = states(tiny_llama_dir)
    _nan(base)
    save_file(base, str(tmp_path / "model.safetensors"))
    with pytest.raises(BadWeightsError, match=rf"base \({tmp_path}\): tensor '{UP}' has 1 NaN/inf"):
        ModelSet.load(tmp_path, {"math": tiny_llama_dir[1]["math"]})


def test_resized_embeddings_of_a_module_expert_are_a_vocabulary_error(
    tiny_bert_dir: Dirs,
) -> None:
    from transformers import BertForSequenceClassification

    base_dir, expert_dirs = tiny_bert_dir
    resized = BertForSequenceClassification.from_pretrained(expert_dirs["mnli"])
    resized.resize_token_embeddings(104)
    experts = {"sst2": expert_dirs["sst2"], "mnli": resized}
    pattern = r"expert 'mnli': different vocabulary size in 'embeddings\.word_embeddings\.weight': 104 rows.*99"
    with pytest.raises(IncompatibleModelsError, match=pattern):
        ModelSet.load(base_dir, experts)


def test_folder_expert_errors_name_the_folder(tiny_llama_dir: Dirs, tmp_path: Path) -> None:
    _, experts = states(tiny_llama_dir)
    _missing(experts["chat"])
    save_file(experts["chat"], str(tmp_path / "model.safetensors"))
    with pytest.raises(IncompatibleModelsError, match=rf"expert 'chat' \({tmp_path}\): missing tensor"):
        ModelSet.load(tiny_llama_dir[0], {"chat": tmp_path})


def test_repeated_task_names_are_an_error(tiny_llama_dir: Dirs) -> None:
    base_dir, expert_dirs = tiny_llama_dir
    with pytest.raises(ValueError, match="unique"):
        ModelSet.load(base_dir, [("math", expert_dirs["math"]), ("math", expert_dirs["code"])])
