"""ModelSet: a base, its experts and their task vectors, resident in memory.

The merged tensors of all experts live in one flat ``[T, D]`` store of task vectors
(τ_t = θ_t − θ_0) and one flat ``[D]`` base, so a merge streams over contiguous memory and a
tensor is a ``(offset, shape)`` segment of the store. What cannot be merged is kept aside:

- per-task tensors: those only experts have, or that match a task-specific pattern (classification
  heads, whose shapes differ by design); they are never merged and stay with their task;
- passthrough tensors: non-floating buffers (position ids, ...), taken from the base unchanged.

Every incompatibility is an error naming the model, the tensor and the mismatch.

Loading streams: the models' safetensors are opened lazily (``open_model``) and the store is filled
one tensor at a time (the base's tensor, then each expert's in turn), so no whole state dict is
ever held beside the store. The store's dtype (``storage_dtype``: float32, bfloat16 or float16) and
its residency tier (on the merge device, in host memory, or memory-mapped from a file: see
``residency.py``) are chosen at construction.

A ModelSet pickles its flat stores as NumPy arrays (bf16 as its 16-bit pattern): put once in Ray's
object store, every actor on a node then maps the same read-only memory instead of holding its own
copy (the merge only reads τ and θ_0). A disk-tier store pickles as its file's path: every actor
maps the same file. An unpickled ModelSet also shares its task-sized caches (PCB's β, DELLA's ranks,
order scores) with the other processes of its machine that unpickled it (``shared_scores.py``).
``placed(device)`` moves a device-tier store onto its accelerator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mergetune.errors import BadWeightsError, IncompatibleModelsError
from mergetune.merging.layer_groups import LayerGroups, build_layer_groups
from mergetune.merging.loading import LazyState, LoadedModel, TensorMeta, open_model, tensor_meta
from mergetune.merging.residency import (
    MemoryBudget,
    allocate_store,
    discard_disk_store,
    finish_disk_store,
    open_disk_store,
    scratch_buffer,
)
from mergetune.merging.tokenizers import tokenizer_differences

ModelSource = str | os.PathLike[str] | Mapping[str, torch.Tensor] | torch.nn.Module
DEFAULT_TASK_SPECIFIC = (r"(^|\.)(classifier|score|qa_outputs)\.",)
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_VOCAB_HINT = re.compile(r"(embed_tokens|word_embeddings|token_embedding|wte|shared|embed_in|embed_out|lm_head)")


@dataclass(frozen=True)
class Segment:
    """Where one merged tensor lives in the flat store."""

    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_length(self) -> int:
        return self.shape[-1] if self.shape else 1

    @property
    def end(self) -> int:
        return self.offset + self.numel


class ModelSet:
    """Base + experts with task vectors computed once, ready for repeated in-memory merges."""

    def __init__(
        self,
        base: LoadedModel,
        experts: Sequence[LoadedModel],
        task_names: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        storage_dtype: torch.dtype = torch.float32,
        budget: MemoryBudget | None = None,
        stage_on_host: bool = False,
        task_specific: Sequence[str] = DEFAULT_TASK_SPECIFIC,
        check_finite: bool = True,
        tokenizer_mismatch: Literal["error", "warn"] = "error",
    ) -> None:
        """``device`` merges; ``budget`` chooses the store's tier (none: on the merge device). ``stage_on_host``
        fills a device-tier store in CPU memory, for a driver that shares it through Ray before ``placed``."""
        if len(experts) != len(task_names) or not experts:
            raise ValueError("give one task name per expert, and at least one expert")
        repeated = sorted({t for t in task_names if list(task_names).count(t) > 1})
        if repeated:
            raise ValueError(f"task names must be unique; repeated: {repeated}")
        self.base_info = base
        self.task_names = list(task_names)
        self.expert_names = [e.name for e in experts]
        # each expert's head label map (config id2label), written beside its head by merging.save
        self.head_label_maps = [dict(e.config.get("id2label") or {}) for e in experts]
        self.storage_dtype = storage_dtype
        # Names this load's store for caches shared between the processes that unpickle it (shared_scores.py).
        self.share_token = uuid.uuid4().hex[:16]
        self.shares_caches = False  # True in a process that got this ModelSet by unpickling (a Ray actor's copy)
        patterns = [re.compile(p) for p in task_specific]

        _check_tokenizers(base, experts, tokenizer_mismatch)
        expert_states = [_align_prefix(base.state, e) for e in experts]
        merged, self.passthrough, self.task_tensors = _classify(base, experts, expert_states, patterns)
        if check_finite:
            for expert, tensors in zip(experts, self.task_tensors, strict=True):
                for name, tensor in tensors.items():
                    _check_finite(expert.name, name, tensor)
        self.segments = _layout(merged, base.state)
        self.numel = self.segments[-1].end if self.segments else 0
        self.dtypes = {s.name: tensor_meta(base.state, s.name).dtype for s in self.segments}
        store_bytes = (len(experts) + 1) * self.numel * storage_dtype.itemsize
        key = _store_key(base, experts, storage_dtype)
        self.residency = (budget or MemoryBudget()).choose(store_bytes, device, key)
        self.tau, self.base_flat = allocate_store(
            self.residency, len(experts), self.numel, storage_dtype, on_host=stage_on_host
        )
        self.device = self.tau.device
        try:
            if self.device.type != "meta":  # a header ModelSet has no values to fill (and arithmetic on meta
                self._fill(base, experts, expert_states, check_finite)  # tensors would import torch's compiler)
        except BaseException:
            discard_disk_store(self.residency)
            raise
        if self.residency.tier == "disk":  # the merge only reads: map the finished file read-only
            finish_disk_store(self.residency)
            self.tau, self.base_flat = open_disk_store(self.residency, self.n_tasks, self.numel, storage_dtype)
        # The base weights now live in base_flat; keeping the state dict would hold a second copy.
        self.base_info = dataclasses.replace(base, state={})

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        base: ModelSource,
        experts: Mapping[str, ModelSource] | Sequence[tuple[str, ModelSource]],
        **kwargs: Any,
    ) -> ModelSet:
        """Load from paths, hub ids, state dicts or modules. ``experts`` maps task name -> source."""
        items = list(experts.items()) if isinstance(experts, Mapping) else list(experts)
        base_model = open_model(base, name=_display_name(base, "base"))
        expert_models = [open_model(src, name=_display_name(src, f"expert '{task}'")) for task, src in items]
        return cls(base_model, expert_models, [task for task, _ in items], **kwargs)

    @classmethod
    def from_recipe(cls, recipe: Any, **kwargs: Any) -> ModelSet:
        """The ModelSet a recipe merges, in the recipe's storage dtype (so its merge is reproduced bit for bit)."""
        kwargs.setdefault("tokenizer_mismatch", "warn" if recipe.allow_tokenizer_mismatch else "error")
        kwargs.setdefault("storage_dtype", STORAGE_DTYPES[recipe.storage_dtype])
        return cls.load(recipe.base, [(e.name, e.model) for e in recipe.experts], **kwargs)

    def _fill(
        self,
        base: LoadedModel,
        experts: Sequence[LoadedModel],
        expert_states: Sequence[Mapping[str, torch.Tensor]],
        check_finite: bool,
    ) -> None:
        """Stream the store in, one tensor at a time: the base's, then each expert's minus it (in float32)."""
        for seg in self.segments:
            b = _read(base.name, base.state, seg.name, check_finite).to(torch.float32).reshape(-1)
            self._store(self.base_flat[seg.offset : seg.end], b, base.name, seg.name)
            for t, (expert, state) in enumerate(zip(experts, expert_states, strict=True)):
                e = _read(expert.name, state, seg.name, check_finite).to(torch.float32).reshape(-1)
                self._store(self.tau[t, seg.offset : seg.end], e - b, expert.name, seg.name)

    def _store(self, dest: torch.Tensor, values: torch.Tensor, model: str, name: str) -> None:
        """Copy float32 values into the store; float16 overflows past 65504, which must not pass as inf."""
        dest.copy_(values)
        if self.storage_dtype == torch.float16 and not bool(torch.isfinite(dest).all()):
            raise BadWeightsError(
                f"{model}: tensor '{name}' has values beyond float16's range ({float(values.abs().max()):.4g}); "
                "use resources.storage_dtype bfloat16 or float32"
            )

    # ---- views -----------------------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    @property
    def model_type(self) -> str | None:
        return self.base_info.model_type

    @property
    def base_folder(self) -> Path | None:
        return self.base_info.folder

    def layer_groups(self, granularity: int = 1) -> LayerGroups:
        return build_layer_groups([s.name for s in self.segments], self.model_type, granularity)

    def task_vector(self, task: int | str, name: str) -> torch.Tensor:
        t = self.task_names.index(task) if isinstance(task, str) else task
        seg = self.segment(name)
        return self.tau[t, seg.offset : seg.end].view(seg.shape)

    def base_tensor(self, name: str) -> torch.Tensor:
        seg = self.segment(name)
        return self.base_flat[seg.offset : seg.end].view(seg.shape)

    def segment(self, name: str) -> Segment:
        if not hasattr(self, "_by_name"):
            self._by_name = {s.name: s for s in self.segments}
        return self._by_name[name]

    @property
    def merge_device(self) -> torch.device:
        """The device that merges this store (where the output buffer and the kernels are)."""
        return torch.device(self.residency.merge_device)

    def task_sized_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """An empty ``[T, D]`` buffer for a cache as large as the task vectors (PCB's β, DELLA's ranks, order
        scores): beside a disk-tier store a scratch file mapped like the store (``residency.scratch_buffer``), so
        that the memory budget holds; otherwise memory beside the store."""
        if self.residency.tier == "disk":
            return scratch_buffer(self.residency, (self.n_tasks, self.numel), dtype)
        return torch.empty(self.n_tasks, self.numel, dtype=dtype, device=self.device)

    def to(self, device: str | torch.device) -> ModelSet:
        """This ModelSet on ``device`` (itself when already there); the stores are copied once."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = object.__new__(ModelSet)
        moved.__dict__.update(self.__dict__)
        moved.device = device
        moved.residency = dataclasses.replace(self.residency, tier="device").on(device)
        moved.tau, moved.base_flat = self.tau.to(device), self.base_flat.to(device)
        moved.passthrough = {k: v.to(device) for k, v in self.passthrough.items()}
        moved.task_tensors = [{k: v.to(device) for k, v in d.items()} for d in self.task_tensors]
        return moved

    def placed(self, merge_device: str | torch.device) -> ModelSet:
        """This ModelSet ready to merge on ``merge_device`` in its tier: a device-tier store is moved there (once);
        a host or disk store stays where it is and the engine streams it to the device chunk by chunk."""
        merge_device = torch.device(merge_device)
        if self.residency.tier == "device":
            return self.to(merge_device)
        if merge_device == self.merge_device:
            return self
        moved = object.__new__(ModelSet)
        moved.__dict__.update(self.__dict__)
        moved.residency = self.residency.on(merge_device)
        moved.passthrough = {k: v.to(merge_device) for k, v in self.passthrough.items()}
        moved.task_tensors = [{k: v.to(merge_device) for k, v in d.items()} for d in self.task_tensors]
        return moved

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k != "_by_name"}
        if self.residency.tier == "disk":  # every process maps the same file: only its path travels
            state["tau"] = state["base_flat"] = None
        else:
            state["tau"], state["base_flat"] = _to_numpy(self.tau), _to_numpy(self.base_flat)
        state["device"] = str(self.device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.device = torch.device(state["device"])
        self.shares_caches = True
        if self.residency.tier == "disk":
            self.tau, self.base_flat = open_disk_store(self.residency, self.n_tasks, self.numel, self.storage_dtype)
        else:
            self.tau = _from_numpy(state["tau"], self.storage_dtype)
            self.base_flat = _from_numpy(state["base_flat"], self.storage_dtype)

    def resident_bytes(self) -> int:
        """Bytes of the resident task vectors and base (what every candidate streams over)."""
        return self.tau.numel() * self.tau.element_size() + self.base_flat.numel() * self.base_flat.element_size()


def _to_numpy(tensor: torch.Tensor) -> Any:
    tensor = tensor.detach().cpu()
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _from_numpy(array: Any, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():  # a shared (read-only) buffer from Ray's object store: never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor


def _display_name(source: ModelSource, role: str) -> str:
    if isinstance(source, str | os.PathLike):
        return f"{role} ({source})"
    return role


def _check_finite(model: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise BadWeightsError(f"{model}: tensor '{name}' has {bad} NaN/inf value(s); fix or re-export this checkpoint")


def _read(model: str, state: Mapping[str, torch.Tensor], name: str, check_finite: bool) -> torch.Tensor:
    """One tensor of a (possibly lazy) state, checked for NaN/inf when asked."""
    tensor = state[name]
    if check_finite:
        _check_finite(model, name, tensor)
    return tensor


def _store_key(base: LoadedModel, experts: Sequence[LoadedModel], dtype: torch.dtype) -> str:
    """A short name for a disk-tier store file: the same models and dtype write the same file (replaced)."""
    text = "|".join([base.name, *(e.name for e in experts), str(dtype)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _align_prefix(base: Mapping[str, torch.Tensor], expert: LoadedModel) -> Mapping[str, torch.Tensor]:
    """Strip a wrapper prefix (``bert.``, ``roberta.``, ``model.``) so expert names match the base's.

    A task model (``BertForSequenceClassification``) prefixes the encoder's names with the base
    model prefix; the base (``BertModel``) does not. The prefix kept is the one under which most
    expert names match a base name (no prefix wins ties, so a matching model is left as it is).
    Names that are not under the prefix (the classification head) are kept as they are.
    """
    state = expert.state
    candidates = {""} | {k.split(".", 1)[0] + "." for k in state if "." in k}
    best = max(sorted(candidates), key=lambda p: (_prefix_matches(base, state, p), p == ""))
    if not best:
        return state
    cut = len(best)
    names = {(k[cut:] if k.startswith(best) else k): k for k in state}
    if isinstance(state, LazyState):  # renamed without reading a tensor
        return state.renamed(names)
    return {new: state[old] for new, old in names.items()}


def _prefix_matches(base: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many expert names become base names once ``prefix`` is stripped."""
    cut = len(prefix)
    return sum(1 for k in state if k.startswith(prefix) and k[cut:] in base)


def _classify(
    base: LoadedModel,
    experts: Sequence[LoadedModel],
    states: Sequence[Mapping[str, torch.Tensor]],
    task_specific: Sequence[re.Pattern[str]],
) -> tuple[list[str], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    merged: list[str] = []
    passthrough: dict[str, torch.Tensor] = {}
    per_task: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    is_specific = lambda name: any(p.search(name) for p in task_specific)  # noqa: E731

    for name in base.state:
        b = tensor_meta(base.state, name)
        if not b.is_floating_point():
            passthrough[name] = base.state[name]
            continue
        if is_specific(name):
            for t, state in enumerate(states):
                if name in state:
                    per_task[t][name] = state[name]
            continue
        for expert, state in zip(experts, states, strict=True):
            _check_pair(base.name, expert.name, name, b, tensor_meta(state, name) if name in state else None)
        merged.append(name)

    for t, state in enumerate(states):
        for name in state:
            if name not in base.state:
                per_task[t][name] = state[name]
    return merged, passthrough, per_task


def _check_tokenizers(base: LoadedModel, experts: Sequence[LoadedModel], on_mismatch: str) -> None:
    """Same vocabulary size is not enough: the same row must mean the same token in every model."""
    if base.folder is None:
        return
    for expert in experts:
        if expert.folder is None:
            continue
        found = tokenizer_differences(base.folder, expert.folder)
        if not found:
            continue
        message = (
            f"{expert.name}: its tokenizer differs from that of the {base.name}: {'; '.join(found)}. Merged embeddings "
            "would mix different tokens. Use experts fine-tuned with the base's tokenizer, or set "
            "allow_tokenizer_mismatch: true (in the recipe, or under models: in a search config) if the difference "
            "is known to be harmless"
        )
        if on_mismatch == "error":
            raise IncompatibleModelsError(message)
        warnings.warn(message, stacklevel=3)


def _check_pair(base_name: str, expert_name: str, name: str, b: TensorMeta, e: TensorMeta | None) -> None:
    if e is None:
        raise IncompatibleModelsError(
            f"{expert_name}: missing tensor '{name}' that the {base_name} has; "
            "are both the same architecture? (task-specific tensors can be declared with task_specific=)"
        )
    if e.shape != b.shape:
        if _VOCAB_HINT.search(name) and len(e.shape) == len(b.shape) and e.shape[1:] == b.shape[1:]:
            raise IncompatibleModelsError(
                f"{expert_name}: different vocabulary size in '{name}': {e.shape[0]} rows against the "
                f"base's {b.shape[0]}; resize the embeddings to the base's tokenizer before merging"
            )
        raise IncompatibleModelsError(
            f"{expert_name}: tensor '{name}' has shape {tuple(e.shape)}, the base has {tuple(b.shape)}; "
            "if this tensor is task-specific by design (a classification head), declare it with task_specific="
        )
    if e.dtype != b.dtype:
        raise IncompatibleModelsError(
            f"{expert_name}: tensor '{name}' is {e.dtype}, the base's is {b.dtype}; "
            "save both in the same dtype before merging"
        )


def _layout(merged: Sequence[str], base_state: Mapping[str, torch.Tensor]) -> list[Segment]:
    segments, offset = [], 0
    for name in merged:
        shape = tensor_meta(base_state, name).shape
        seg = Segment(name, offset, shape)
        segments.append(seg)
        offset = seg.end
    return segments
