"""Layer groups on the real parameter names of tiny random models built from config classes.

Each architecture is checked three ways: the group names in depth order, the exact set of
tensors in ``embed`` (everything else outside a block must be ``head``), and every block tensor
in the block its name says, with stacks (T5's encoder/decoder, CLIP's towers) numbered one after
the other. Names are taken both as a module has them in memory and as its checkpoint stores them
(tied weights once; transformers 5 renames ViT's blocks in memory only), and the grouping must not
depend on their order: a safetensors file lists them sorted, a module in registration order.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from mergetune.merging.layer_groups import EMBED, HEAD, LayerGroups, build_layer_groups
from mergetune.merging.loading import module_state

DIMS = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
DECODER_DIMS = {**DIMS, "vocab_size": 99, "num_key_value_heads": 1}


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=99, **DIMS))


def _roberta() -> torch.nn.Module:
    from transformers import RobertaConfig, RobertaModel

    return RobertaModel(RobertaConfig(vocab_size=99, **DIMS))


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**DECODER_DIMS))


def _mistral() -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**DECODER_DIMS))


def _qwen2() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**DECODER_DIMS))


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=16, n_layer=2, n_head=2, n_positions=32))


def _t5() -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=99, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=2)
    return T5ForConditionalGeneration(config)


def _vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=8, patch_size=4, **DIMS))


def _clip() -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": 99, "max_position_embeddings": 16, **DIMS}
    vision = {"image_size": 8, "patch_size": 4, **DIMS}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))


@dataclass(frozen=True)
class Case:
    """What one architecture's tensors must group into."""

    build: Callable[[], torch.nn.Module]
    groups: tuple[str, ...]
    embed: frozenset[str]
    block: str  # regex on block tensors: group 1 the stack, group 2 the index
    stack_offset: dict[str, int]  # first global block number of each stack
    head_examples: tuple[str, ...]


BERT_EMBED = frozenset(
    f"embeddings.{n}"
    for n in (
        "word_embeddings.weight",
        "position_embeddings.weight",
        "token_type_embeddings.weight",
        "LayerNorm.weight",
        "LayerNorm.bias",
    )
)
FOUR = ("embed", "blocks.0", "blocks.1", "head")
SIX = ("embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head")
LLAMA_LIKE = {
    "groups": FOUR,
    "embed": frozenset({"model.embed_tokens.weight"}),
    "block": r"^(model)\.layers\.(\d+)\.",
    "stack_offset": {"model": 0},
    "head_examples": ("model.norm.weight", "lm_head.weight"),
}
CASES = {
    "bert": Case(_bert, FOUR, BERT_EMBED, r"^(encoder)\.layer\.(\d+)\.", {"encoder": 0}, ("pooler.dense.weight",)),
    "roberta": Case(_roberta, FOUR, BERT_EMBED, r"^(encoder)\.layer\.(\d+)\.", {"encoder": 0}, ("pooler.dense.bias",)),
    "llama": Case(_llama, **LLAMA_LIKE),
    "mistral": Case(_mistral, **LLAMA_LIKE),
    "qwen2": Case(_qwen2, **LLAMA_LIKE),
    "gpt2": Case(
        _gpt2,
        FOUR,
        frozenset({"transformer.wte.weight", "transformer.wpe.weight"}),
        r"^(transformer)\.h\.(\d+)\.",
        {"transformer": 0},
        ("transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"),
    ),
    "t5": Case(
        _t5,
        SIX,
        frozenset({"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}),
        r"^(encoder|decoder)\.block\.(\d+)\.",
        {"encoder": 0, "decoder": 2},
        ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight", "lm_head.weight"),
    ),
    "vit": Case(
        _vit,
        FOUR,
        frozenset(
            {
                "embeddings.cls_token",
                "embeddings.position_embeddings",
                "embeddings.patch_embeddings.projection.weight",
                "embeddings.patch_embeddings.projection.bias",
            }
        ),
        r"^(encoder\.layer|layers)\.(\d+)\.",  # transformers 5 renames checkpoint blocks in memory
        {"encoder.layer": 0, "layers": 0},
        ("layernorm.weight", "pooler.dense.weight"),
    ),
    "clip": Case(
        _clip,
        SIX,
        frozenset(
            {
                "text_model.embeddings.token_embedding.weight",
                "text_model.embeddings.position_embedding.weight",
                "vision_model.embeddings.class_embedding",
                "vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.position_embedding.weight",
                "vision_model.pre_layrnorm.weight",  # applied before the first vision block
                "vision_model.pre_layrnorm.bias",
            }
        ),
        r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.",
        {"text_model": 0, "vision_model": 2},
        (
            "logit_scale",
            "visual_projection.weight",
            "text_projection.weight",
            "text_model.final_layer_norm.weight",
            "vision_model.post_layernorm.bias",
        ),
    ),
}


SOURCES = ("module", "checkpoint")


@functools.cache
def tiny_model(arch: str) -> torch.nn.Module:
    """The tiny random model of ``arch``, built once per session."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CASES[arch].build()


def real_names(arch: str, source: str = "module") -> tuple[tuple[str, ...], str]:
    """(names, model_type): the module's ``state_dict()`` names, or those its checkpoint has
    (tied weights once, legacy names restored) as a ModelSet sees them."""
    model = tiny_model(arch)
    names = model.state_dict() if source == "module" else module_state(model)
    return tuple(names), model.config.model_type


def assignment(groups: LayerGroups) -> dict[str, str]:
    """Tensor name -> group name."""
    return {t: groups.names[i] for t, i in groups.of_tensor.items()}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", list(CASES))
def test_real_names_group_by_depth(arch: str, source: str) -> None:
    case = CASES[arch]
    names, model_type = real_names(arch, source)
    groups = build_layer_groups(names, model_type)
    assert groups.names == case.groups
    assigned = assignment(groups)
    assert set(assigned) == set(names)
    block = re.compile(case.block)
    outside = set()
    for name in names:
        match = block.match(name)
        if match:
            assert assigned[name] == f"blocks.{case.stack_offset[match.group(1)] + int(match.group(2))}", name
        else:
            outside.add(name)
    embed = case.embed & set(names)  # a checkpoint stores tied embeddings (T5's) once
    assert embed and {n for n in outside if assigned[n] == EMBED} == embed
    assert all(assigned[n] == HEAD for n in outside - embed)
    head = [n for n in case.head_examples if n in assigned]  # GPT-2's tied lm_head is not in its checkpoint
    assert head and all(assigned[n] == HEAD for n in head)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", list(CASES))
def test_grouping_does_not_depend_on_name_order(arch: str, source: str) -> None:
    names, model_type = real_names(arch, source)
    reference = build_layer_groups(names, model_type)
    shuffled = list(names)
    random.Random(0).shuffle(shuffled)
    for order in (sorted(names), shuffled):  # sorted: how a safetensors file lists them
        other = build_layer_groups(order, model_type)
        assert other.names == reference.names
        assert assignment(other) == assignment(reference)


@pytest.mark.parametrize(
    ("arch", "granularity", "expected"),
    [
        ("bert", 2, ("embed", "blocks.0-1", "head")),
        ("llama", 2, ("embed", "blocks.0-1", "head")),
        ("t5", 2, ("embed", "blocks.0-1", "blocks.2-3", "head")),
        ("t5", 3, ("embed", "blocks.0-2", "blocks.3", "head")),
        ("clip", 4, ("embed", "blocks.0-3", "head")),
        ("gpt2", 8, ("embed", "blocks.0-1", "head")),
    ],
)
def test_granularity_bundles_consecutive_blocks(arch: str, granularity: int, expected: tuple[str, ...]) -> None:
    names, model_type = real_names(arch)
    groups = build_layer_groups(names, model_type, granularity)
    assert groups.names == expected
    fine_groups = build_layer_groups(names, model_type)
    n_blocks = sum(g.startswith("blocks.") for g in fine_groups.names)
    fine, coarse = assignment(fine_groups), assignment(groups)
    for name, group in fine.items():
        if group.startswith("blocks."):
            i = int(group.split(".")[1])
            first, last = i - i % granularity, min(i - i % granularity + granularity, n_blocks) - 1
            assert coarse[name] == (f"blocks.{first}" if first == last else f"blocks.{first}-{last}"), name
        else:
            assert coarse[name] == group


def test_members_and_index_agree() -> None:
    names, model_type = real_names("llama")
    groups = build_layer_groups(names, model_type)
    assert len(groups) == 4
    assert groups.members("head") == ["model.norm.weight", "lm_head.weight"]
    assert all(groups.index(t) == 1 for t in groups.members("blocks.0"))
    assert sum(len(groups.members(g)) for g in groups.names) == len(names)


GENERIC = [
    "tok_emb.weight",
    "pos_emb",
    *[f"layers.{i}.{p}" for i in (10, 2, 0, 11, 1, 3, 4, 5, 6, 7, 8, 9) for p in ("attn.weight", "mlp.bias")],
    "norm.weight",
    "out.weight",
]


@pytest.mark.parametrize("model_type", [None, "my_new_arch", "llama"])
def test_unknown_architecture_falls_back_to_layers_index(model_type: str | None) -> None:
    groups = build_layer_groups(GENERIC, model_type)
    assert groups.names == ("embed", *[f"blocks.{i}" for i in range(12)], "head")  # 10 after 9, not after 1
    assigned = assignment(groups)
    assert assigned["tok_emb.weight"] == assigned["pos_emb"] == EMBED
    assert assigned["layers.10.mlp.bias"] == "blocks.10"
    assert assigned["norm.weight"] == assigned["out.weight"] == HEAD
    assert build_layer_groups(GENERIC, model_type, granularity=5).names == (
        "embed",
        "blocks.0-4",
        "blocks.5-9",
        "blocks.10-11",
        "head",
    )


def test_generic_names_from_other_families() -> None:
    names = [
        "gpt_neox.embed_in.weight",
        "gpt_neox.layers.0.attention.dense.weight",
        "gpt_neox.final_layer_norm.weight",
        "embed_out.weight",  # GPT-NeoX checkpoints' output head: not an embedding
        "model.decoder.layers.0.fc1.weight",
        "model.encoder.layers.0.fc1.weight",
    ]
    assigned = assignment(build_layer_groups(names, "gpt_neox"))
    assert assigned["gpt_neox.embed_in.weight"] == EMBED
    assert assigned["embed_out.weight"] == assigned["gpt_neox.final_layer_norm.weight"] == HEAD
    assert assigned["model.encoder.layers.0.fc1.weight"] == "blocks.1"  # encoder before decoder
    assert assigned["model.decoder.layers.0.fc1.weight"] == "blocks.2"


def test_model_without_blocks_and_bad_granularity() -> None:
    groups = build_layer_groups(["embeddings.weight", "classifier.weight"], None)
    assert groups.names == ("embed", "head")
    with pytest.raises(ValueError, match="granularity"):
        build_layer_groups(GENERIC, None, granularity=0)
