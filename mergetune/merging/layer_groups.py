"""Map every tensor of a model to a layer group: embeddings, transformer blocks, head.

Per-layer merge parameters are stored per group. Groups are ordered by depth:
``embed``, then ``blocks.<first>-<last>`` (or ``blocks.<i>`` at granularity 1), then ``head``.
Stacks of blocks (an encoder and a decoder in T5, a text and a vision tower in CLIP) are numbered
one after the other: encoder-side stacks first, decoder stacks last, ties by name. The grouping
depends only on the set of names, never on their order, so a model read from a safetensors file
(names sorted: ``decoder.*`` before ``encoder.*``) groups exactly like the same model in memory,
and a recipe's per-group values mean the same thing however the model was loaded.

Architecture-aware rules come first (BERT/RoBERTa, Llama/Mistral/Qwen, GPT-2, T5, ViT/CLIP);
any other model falls back to the generic rule: the first ``<name>.<integer>.`` component that
follows a block-container word (``layer``, ``layers``, ``h``, ``block``, ``blocks``) is the block
index. Tensors outside every block are embeddings if their name says so (``embed``, ``emb``,
``wte``, ``shared``, a pre-block norm such as CLIP's ``pre_layrnorm``, ...), else head (final
norms, including T5's encoder and decoder final norms, poolers, ``lm_head``, projections,
``logit_scale``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

EMBED = "embed"
HEAD = "head"

# Block containers, by family. Each pattern captures (stack prefix, block index).
_BLOCK_PATTERNS: dict[str, re.Pattern[str]] = {
    "bert": re.compile(r"^(.*?(?:^|\.)encoder\.layer)\.(\d+)\."),
    "llama": re.compile(r"^(.*?(?:^|\.)layers)\.(\d+)\."),
    "gpt2": re.compile(r"^(.*?(?:^|\.)h)\.(\d+)\."),
    "t5": re.compile(r"^(.*?(?:^|\.)block)\.(\d+)\."),
    "clip": re.compile(r"^(.*?(?:^|\.)encoder\.layers?)\.(\d+)\."),
}
_FAMILY_OF_MODEL_TYPE = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "distilbert": "generic",
    "electra": "bert",
    "deberta": "bert",
    "deberta-v2": "bert",
    "vit": "bert",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "phi3": "llama",
    "mixtral": "llama",
    "gpt2": "gpt2",
    "gpt_neo": "gpt2",
    "t5": "t5",
    "mt5": "t5",
    "umt5": "t5",
    "clip": "clip",
    "clip_vision_model": "clip",
    "clip_text_model": "clip",
    "siglip": "clip",
}
_GENERIC_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|block|blocks))\.(\d+)\.")
# "emb" at the start of a word (embed_tokens, word_embeddings, tok_emb) but not GPT-NeoX's output
# head "embed_out"; pre-block norms (CLIP's pre_layrnorm, OpenCLIP's ln_pre) sit before block 0.
_EMBED_WORDS = re.compile(
    r"((?<![a-z])emb(?!ed_out)|wte|wpe|shared\.|^shared|patch|cls_token|position|token_type|mask_token"
    r"|pre_layrnorm|pre_layernorm|ln_pre)"
)
_DECODER_WORD = re.compile(r"(^|\.)decoder(\.|$)")


@dataclass(frozen=True)
class LayerGroups:
    """The grouping of a model's tensors, in depth order."""

    names: tuple[str, ...]
    of_tensor: dict[str, int]

    def index(self, tensor: str) -> int:
        return self.of_tensor[tensor]

    def members(self, group: str) -> list[str]:
        g = self.names.index(group)
        return [t for t, i in self.of_tensor.items() if i == g]

    def __len__(self) -> int:
        return len(self.names)


def family_of(model_type: str | None) -> str:
    return _FAMILY_OF_MODEL_TYPE.get((model_type or "").lower(), "generic")


def block_position(name: str, family: str) -> tuple[str, int] | None:
    """(stack prefix, block index) of a tensor inside a block, or None outside every block."""
    pattern = _BLOCK_PATTERNS.get(family, _GENERIC_BLOCK)
    match = pattern.match(name) or _GENERIC_BLOCK.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def build_layer_groups(tensor_names: Iterable[str], model_type: str | None = None, granularity: int = 1) -> LayerGroups:
    """Group tensors by depth; ``granularity`` consecutive blocks share one group."""
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    names = list(tensor_names)
    family = family_of(model_type)
    positions = {n: block_position(n, family) for n in names}
    depth = _global_block_depths(p for p in positions.values() if p is not None)

    n_blocks = len(depth)
    bundles = [(start, min(start + granularity, n_blocks) - 1) for start in range(0, n_blocks, granularity)]
    bundle_names = [f"blocks.{a}" if a == b else f"blocks.{a}-{b}" for a, b in bundles]

    assigned: dict[str, str] = {}
    for n in names:
        pos = positions[n]
        if pos is not None:
            assigned[n] = bundle_names[depth[pos] // granularity]
        elif _EMBED_WORDS.search(n):
            assigned[n] = EMBED
        else:
            assigned[n] = HEAD
    order = [g for g in (EMBED, *bundle_names, HEAD) if g in set(assigned.values())]
    return LayerGroups(names=tuple(order), of_tensor={n: order.index(g) for n, g in assigned.items()})


def _global_block_depths(positions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Number blocks across stacks: decoder stacks after the others, then by name; blocks by index."""
    stacks: dict[str, set[int]] = {}
    for prefix, idx in positions:
        stacks.setdefault(prefix, set()).add(idx)
    depth: dict[tuple[str, int], int] = {}
    offset = 0
    for prefix in sorted(stacks, key=lambda p: (bool(_DECODER_WORD.search(p)), p)):
        for i in sorted(stacks[prefix]):
            depth[(prefix, i)] = offset
            offset += 1
    return depth
