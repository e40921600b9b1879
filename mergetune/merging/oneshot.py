"""Streaming one-shot merges: read, merge and write one tensor at a time (``mergetune merge``).

A search merges many candidates of the same models, so it keeps every task vector resident
(``ModelSet``). A one-shot merge reads each weight once: holding base + experts in a flat float32
store costs several times the model in memory and most of the time in loading. Here, for each
merged tensor, the base's and every expert's tensor are read from their safetensors files (only
that tensor's bytes), τ is computed in float32 exactly as ``ModelSet`` computes it, the tensor is
merged by the engine itself (``Merger`` on a one-tensor ModelSet: the same ``prepare`` and kernels,
the same chunks of whole rows) and written straight into its output shard (``shards.py``). On CPU
with eager kernels, as many tensors merge at once as torch has threads, one torch thread each
(``_merged_slices``); otherwise the next tensor is read while the current one merges. Memory: about
one tensor × (experts + 2) per tensor in flight, whatever the model's size; tensors merged ahead of
the next one to be written hold at most the largest tensor's entries.

What a method needs beyond one tensor:

- ``tensor`` and ``row`` scopes, DARE's random keys (seeded by the tensor's name), DELLA's ranks,
  TSV's SVDs and PCB with ``scope: tensor`` are local to a tensor: a one-tensor ModelSet gives the
  resident merge's values (the same sorts of the same blocks); ``tie_rule: mergekit`` with ``scope:
  tensor`` selects the entries before each cut of torch's sort without sorting (``cut_order_scores``);
- layer groups are the whole model's (each tensor keeps its group, so λ[t, g] and d[t, g] apply);
- ``scope: global`` thresholds (the model-wide k-th largest |τ_t|) are found exactly by counting
  before the merge pass (``GlobalThresholds``): a first pass builds, per task, a histogram of the
  upper 16 bits of |τ| (non-negative float32 values order like their bit patterns); a second pass
  counts the lower 16 bits inside the one bucket that holds each cut (skipped for a bf16 store, whose
  buckets hold one value each). Which counts are needed is learnt by running the method once per layer
  group on a one-entry tensor, recording its requests.

Three things need every entry of the model at once and are merged resident instead (``NotStreamable``,
reported as the reason): ``sign_cancel: model_majority`` (the model-wide majority of the elected
signs), ``tie_rule: mergekit`` with ``scope: global`` (ties ranked by one sort of the whole model),
and scores other than |τ| ranked globally (PCB's default ``scope: global``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergetune.errors import BadWeightsError, MergetuneError
from mergetune.merging.context import Layout, MergeContext
from mergetune.merging.engine import DTYPES, Merger, compile_available
from mergetune.merging.layer_groups import LayerGroups
from mergetune.merging.loading import (
    LoadedModel,
    download_from_hub,
    load_model,
    looks_like_hub_id,
    read_config,
    safetensors_files,
)
from mergetune.merging.modelset import STORAGE_DTYPES, ModelSet, Segment, _align_prefix, _check_finite
from mergetune.merging.residency import Residency
from mergetune.merging.shards import SAFETENSORS_DTYPES, ShardWriter, TensorSpec
from mergetune.merging.stats import (
    BUCKET_BITS,
    N_BUCKETS,
    LowHalfCounts,
    NaiveStatistics,
    OrderStatistics,
    RowLayout,
    Scope,
    ScoreFn,
    ScoreSource,
    abs_scores,
    cut_order_scores,
    key_values,
)
from mergetune.parallel import torch_threads
from mergetune.recipe import Recipe

_DTYPE_OF_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_READ_BLOCK = 1 << 30  # bytes per pread call (a single call may return less than asked above 2 GiB)


class NotStreamable(Exception):
    """The recipe needs every entry of the model at once; the message says which option."""


# ---- reading tensors one at a time -----------------------------------------------------------------
class SafetensorsFile:
    """One safetensors file: its header is parsed once, each tensor is read on demand (only its bytes).

    Plain positioned reads, not a memory map: a mapped file's pages would count in the process's
    resident memory until the kernel drops them, and a streaming merge should not appear to hold the
    models it has already read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            size = path.stat().st_size
        except (OSError, struct.error, ValueError) as exc:
            raise BadWeightsError(f"{path}: cannot read safetensors file: {exc}") from exc
        self.data_start = 8 + length
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name != "__metadata__":
                self.entries[name] = self._entry(name, info, size)

    def _entry(self, name: str, info: Any, size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            dtype = _DTYPE_OF_NAME[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BadWeightsError(f"{self.path}: tensor '{name}' has an unreadable header entry: {exc!r}") from exc
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if stop - start != expected or start < 0 or self.data_start + stop > size:
            raise BadWeightsError(
                f"{self.path}: tensor '{name}' has offsets [{start}, {stop}) that do not fit its shape {shape} "
                "or the file; the file is truncated or corrupt: re-download or re-export it"
            )
        return dtype, shape, start, stop

    def meta(self, name: str) -> torch.Tensor:
        """A tensor of the stored shape and dtype that holds no data (for the compatibility checks)."""
        dtype, shape, _, _ = self.entries[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, start, stop = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < stop - start:
                n = os.preadv(fd, [view[done : done + _READ_BLOCK]], self.data_start + start + done)
                if n <= 0:
                    raise BadWeightsError(f"{self.path}: file ended while reading tensor '{name}'")
                done += n
        finally:
            os.close(fd)
        return out


class TensorSource:
    """One model's tensors by name: read from safetensors files on demand, or from a loaded state dict
    (``.bin`` checkpoints, which cannot be read one tensor at a time). Names may be aliased (an
    expert's ``bert.`` prefix stripped to match the base), and every floating tensor read is checked
    finite, as ``ModelSet`` checks whole models.
    """

    def __init__(self, model: str, files: Mapping[str, SafetensorsFile], state: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        self.files = files
        self.state = state
        self.aliases: dict[str, str] = {}

    def meta_state(self) -> dict[str, torch.Tensor]:
        if self.files:
            return {name: file.meta(name) for name, file in self.files.items()}
        return dict(self.state)

    def read(self, name: str) -> torch.Tensor:
        key = self.aliases.get(name, name)
        tensor = self.files[key].read(key) if self.files else self.state[key]
        if tensor.is_floating_point() and not _all_finite(tensor):
            _check_finite(self.model, key, tensor)  # raises, counting the bad values
        return tensor


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no entry is NaN or ±inf: min and max propagate both (one vectorised pass; ``isfinite`` is
    15-50× slower on CPU)."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def open_model(source: str, name: str, revision: str | None = None) -> tuple[LoadedModel, TensorSource]:
    """The model's description (names, shapes, dtypes as data-less tensors; config; folder) and its source.

    Safetensors checkpoints are read from their headers only; anything else is loaded as ``load_model`` does.
    """
    path = Path(source).expanduser()
    folder: Path | None = None
    if path.is_dir():
        folder = path
    elif path.is_file() and path.suffix == ".safetensors":
        files = _open_files([path])
        source_ = TensorSource(name, files, {})
        return LoadedModel(name, source_.meta_state(), path.parent, read_config(path.parent)), source_
    elif not path.exists() and looks_like_hub_id(source):
        folder = download_from_hub(source, revision)
    paths = safetensors_files(folder) if folder is not None else []
    if not paths:  # .bin, a single weights file, or an error load_model words best
        model = load_model(source, name=name, revision=revision)
        return model, TensorSource(name, {}, model.state)
    assert folder is not None
    source_ = TensorSource(name, _open_files(paths), {})
    return LoadedModel(name, source_.meta_state(), folder, read_config(folder)), source_


def _open_files(paths: list[Path]) -> dict[str, SafetensorsFile]:
    by_name: dict[str, SafetensorsFile] = {}
    for p in paths:
        if not p.is_file():
            raise MergetuneError(f"weights file not found: {p} (listed in the folder's index?)")
        file = SafetensorsFile(p)
        by_name.update(dict.fromkeys(file.entries, file))
    return by_name


@dataclass
class StreamInputs:
    """A recipe's models described from their headers: a ModelSet on the ``meta`` device (every check of a
    resident load, no weights) and where each model's tensors are."""

    header: ModelSet
    base: TensorSource
    experts: list[TensorSource]
    storage: torch.dtype = torch.float32  # the recipe's storage dtype: what a search's store rounded to

    @classmethod
    def open(cls, recipe: Recipe) -> StreamInputs:
        base_info, base = open_model(recipe.base, f"base ({recipe.base})")
        infos, experts = [], []
        for e in recipe.experts:
            info, source = open_model(e.model, f"expert '{e.name}' ({e.model})", e.revision)
            source.aliases = _aliases(base_info, info)
            infos.append(info)
            experts.append(source)
        mismatch = "warn" if recipe.allow_tokenizer_mismatch else "error"
        header = ModelSet(
            base_info, infos, recipe.task_names, device="meta", check_finite=False, tokenizer_mismatch=mismatch
        )
        return cls(header, base, experts, STORAGE_DTYPES[recipe.storage_dtype])

    def read_tau(self, segment: Segment, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The base (flat float32) and τ (``[T, n]`` float32) of one tensor, computed as ``ModelSet`` does."""
        base = self.base.read(segment.name).to(device, torch.float32).reshape(-1)
        tau = torch.empty(len(self.experts), segment.numel, dtype=torch.float32, device=device)
        for t, expert in enumerate(self.experts):
            tau[t].copy_(expert.read(segment.name).reshape(-1))  # the exact float32 value of the expert's weight
            tau[t].sub_(base)
        if self.storage != torch.float32:  # as ModelSet stores them: τ from the exact base, then both rounded
            base, tau = base.to(self.storage).to(torch.float32), tau.to(self.storage).to(torch.float32)
        return base, tau

    def load_task_tensors(self) -> None:
        """Replace the header's data-less per-task tensors (heads) and passthrough tensors by their values."""
        self.header.task_tensors = [
            {name: source.read(name) for name in tensors}
            for source, tensors in zip(self.experts, self.header.task_tensors, strict=True)
        ]
        self.header.passthrough = {name: self.base.read(name) for name in self.header.passthrough}


def _aliases(base: LoadedModel, expert: LoadedModel) -> dict[str, str]:
    """Expert name as matched to the base (a wrapper prefix stripped, as ``ModelSet`` does) -> name in its files."""
    original = {id(tensor): name for name, tensor in expert.state.items()}
    return {name: original[id(tensor)] for name, tensor in _align_prefix(base.state, expert).items()}


# ---- one tensor as a ModelSet --------------------------------------------------------------------------
class TensorSlice(ModelSet):
    """One merged tensor of a model as a ModelSet of one segment, in the whole model's layer groups."""

    def __init__(
        self, header: ModelSet, segment: Segment, groups: LayerGroups, base: torch.Tensor, tau: torch.Tensor
    ) -> None:
        self.base_info = header.base_info
        self.task_names = header.task_names
        self.expert_names = header.expert_names
        self.head_label_maps = header.head_label_maps
        self.device = base.device
        self.storage_dtype = torch.float32
        self.passthrough = {}
        self.task_tensors = [{} for _ in header.task_names]
        self.segments = [Segment(segment.name, 0, segment.shape)]
        self.numel = segment.numel
        self.base_flat = base
        self.tau = tau
        self.dtypes = {segment.name: header.dtypes[segment.name]}
        self._groups = groups
        nbytes = (tau.numel() + base.numel()) * base.element_size()
        self.residency = Residency("device", str(base.device), store_bytes=nbytes, reason="one tensor, streamed")
        self.share_token, self.shares_caches = header.share_token, False  # a one-shot merge's own, never shared

    def layer_groups(self, granularity: int = 1) -> LayerGroups:
        return self._groups


@dataclass(frozen=True)
class SliceRows(RowLayout):
    """A slice's rows, whose ``global`` block is the whole model (``model_numel`` entries), not the slice."""

    model_numel: int = 0

    def blocks(self, scope: Scope, modelset: ModelSet) -> tuple[torch.Tensor, torch.Tensor]:
        if scope is Scope.GLOBAL:
            return torch.zeros_like(self.start), torch.full_like(self.start, self.model_numel)
        return super().blocks(scope, modelset)


class GlobalThresholds:
    """Model-wide k-th largest |τ_t|, per task and count k: recorded as requests, then counted exactly."""

    def __init__(self, n_tasks: int) -> None:
        self.n_tasks = n_tasks
        self.recording = True
        self.wanted: set[tuple[int, int]] = set()
        self.values: dict[tuple[int, int], torch.Tensor] = {}

    def lookup(self, k: torch.Tensor) -> torch.Tensor:
        """``[T, n_rows]`` thresholds for counts ``k`` (+inf where k = 0), like ``OrderStatistics.kth_largest``."""
        out = torch.full(k.shape, math.inf, dtype=torch.float32, device=k.device)
        for t in range(k.shape[0]):
            for kk in torch.unique(k[t]).tolist():
                if kk <= 0:
                    continue
                if self.recording:
                    self.wanted.add((t, kk))
                elif (t, kk) not in self.values:
                    raise RuntimeError(f"internal: global threshold k={kk} of task {t} was not counted")
                else:
                    out[t][k[t] == kk] = self.values[(t, kk)].to(out.device)
        return out

    def count(self, taus: Callable[[], Iterator[torch.Tensor]], bf16_values: bool = False) -> int:
        """Find every wanted value in two passes over ``taus()`` (each yields ``[T, n]`` float32), or one
        when ``bf16_values`` (τ rounded to bfloat16: each bucket holds one value). Returns the passes taken.

        Pass 1 counts each task's |τ| by bucket (the top 16 bits of its order key); pass 2 counts the low
        16 bits inside the buckets that hold the cuts (``stats.LowHalfCounts``). The k-th largest is exact,
        with nothing kept but counts."""
        source = ScoreSource(torch.empty(0, 0), magnitude=True)  # |τ| of float32 values, read chunk by chunk
        high = torch.zeros(self.n_tasks, N_BUCKETS, dtype=torch.int64)
        for tau in taus():
            for t in range(self.n_tasks):
                high[t] += source.histogram(tau[t]).cpu()
        cuts = {(t, k): _from_top(high[t], k) for t, k in self.wanted}  # -> (bucket, rank inside it)
        self.recording = False
        if bf16_values:
            for (t, k), (b, _) in cuts.items():
                self.values[(t, k)] = _value((b - N_BUCKETS // 2) << BUCKET_BITS)
            return 1
        prefixes = {t: sorted({b - N_BUCKETS // 2 for (u, _), (b, _) in cuts.items() if u == t}) for t, _ in cuts}
        counters: dict[int, LowHalfCounts] = {}
        for tau in taus():
            for t, wanted in prefixes.items():
                if t not in counters:  # on the device the task vectors are read to
                    counters[t] = LowHalfCounts(source._replace(values=tau[:0]), torch.tensor(wanted))
                counters[t].add(tau[t])
        for (t, k), (b, rank) in cuts.items():
            prefix = b - N_BUCKETS // 2
            low, _ = _from_top(counters[t].counts[prefixes[t].index(prefix)].cpu(), rank)
            self.values[(t, k)] = _value((prefix << BUCKET_BITS) | low)
        return 2


def _value(key: int) -> torch.Tensor:
    """The float32 value of an order key."""
    return key_values(torch.tensor([key], dtype=torch.int32))[0]


def _from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bucket, rank inside it) of the k-th largest item, given counts per bucket in ascending order."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    if k > int(at_or_above[0]):
        raise RuntimeError(f"internal: k={k} beyond the {int(at_or_above[0])} counted entries")
    bucket = int((at_or_above >= k).nonzero().max())
    above = int(at_or_above[bucket + 1]) if bucket + 1 < counts.numel() else 0
    return bucket, k - above


class SliceStatistics(NaiveStatistics):
    """A slice's order statistics: its own blocks for ``tensor``/``row`` scope, the model's for ``global``.

    One candidate per slice: a threshold is a selection (``kthvalue``, as ``NaiveStatistics``), not a
    sort kept for the next candidate; scores and other precomputations are cached for the slice's
    hooks, as ``OrderStatistics`` does. The k-th largest value is the same whichever way it is found.
    """

    scores = OrderStatistics.scores
    cached = OrderStatistics.cached

    def __init__(self, modelset: ModelSet, rows: RowLayout, thresholds: GlobalThresholds) -> None:
        super().__init__(modelset, rows)
        self.thresholds = thresholds

    def kth_largest(self, kind: str, scope: Scope, k: torch.Tensor, compute: ScoreFn = abs_scores) -> torch.Tensor:
        if scope is not Scope.GLOBAL:
            return super().kth_largest(kind, scope, k, compute)
        if kind != "abs":
            raise NotStreamable(f"scores '{kind}' ranked over the whole model (scope: global)")
        return self.thresholds.lookup(k)

    def order_scores(self, scope: Scope, descending: bool, cuts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Scores valid for the given cuts only (one candidate): a selection per cut, not a sort (tensor scope)."""
        if scope is Scope.GLOBAL:
            raise NotStreamable("tie_rule: mergekit with scope: global orders tied magnitudes by one sort of the model")
        if scope is Scope.TENSOR and cuts:
            return cut_order_scores(self.modelset.tau, [c[:, 0] for c in cuts], descending)
        return super().order_scores(scope, descending)


class SliceContext(MergeContext):
    """A slice's MergeContext: a pass over "the whole model" is not available one tensor at a time."""

    def chunks(
        self, row_args: Mapping[str, torch.Tensor], element_args: Mapping[str, torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        raise NotStreamable("sign_cancel: model_majority needs the elected signs of the whole model")


class SliceMerger(Merger):
    """The engine, run on one tensor at a time (kernels compiled once, reused for every tensor)."""

    def __init__(self, first: TensorSlice, thresholds: GlobalThresholds, model_numel: int, compile: bool) -> None:
        super().__init__(first, compile=compile)
        self.thresholds = thresholds
        self.model_numel = model_numel

    def merge_slice(self, piece: TensorSlice, recipe: Recipe) -> torch.Tensor:
        """The merged tensor (in the recipe's dtype), a fresh buffer of its own."""
        self.modelset, self._layouts, self._out = piece, {}, {}
        return self.merge(recipe)[piece.segments[0].name]

    def layout(self, granularity: int) -> Layout:
        if granularity not in self._layouts:
            layout = Layout(self.modelset, granularity, self.chunk_size, self.naive)
            fields = {f.name: getattr(layout.rows, f.name) for f in dataclasses.fields(layout.rows)}
            layout.rows = SliceRows(**fields, model_numel=self.model_numel)
            layout.stats = SliceStatistics(self.modelset, layout.rows, self.thresholds)
            self._layouts[granularity] = layout
        return self._layouts[granularity]

    def context(self, recipe: Recipe) -> tuple[MergeContext, Any]:
        ctx, method = super().context(recipe)
        return SliceContext(ctx.layout, ctx.weight, ctx.density, ctx.options, ctx.seed), method


# ---- the merge -------------------------------------------------------------------------------------------
@dataclass
class StreamedMerge:
    """The models (a header ModelSet whose heads hold their values), timings and how the merge ran."""

    modelset: ModelSet
    setup_seconds: float  # headers, and the counting passes of global thresholds
    merge_seconds: float  # the merge pass (reading, merging and writing overlap)
    passes: int  # passes over the models' weights
    resident_reason: str | None = None  # why the merge ran resident, if it did
    compiled: bool = False  # whether the kernels were compiled (the same backend gives the same bits)


# A one-shot merge runs each kernel once over the model. Compiling costs a fixed 4 s (warm kernel cache) to
# 20-90 s (cold) and saves about 4 ns per task-vector entry (SmolLM2 x 3 experts, 0.4 G entries, TIES merge
# pass: 6.8 s eager, 5.2 s compiled; TA and DARE no faster compiled). That repays a cold compile from about
# 5-20 G entries: 8 G (a 2 B model with 4 experts) is the middle of that range, measured on CPU only.
AUTO_COMPILE_ENTRIES = 8 * 10**9


def auto_compile(header: ModelSet, device: torch.device) -> bool:
    """``--engine auto`` for a one-shot merge: compile only a merge of at least ``AUTO_COMPILE_ENTRIES``."""
    return compile_available(device) and header.n_tasks * header.numel >= AUTO_COMPILE_ENTRIES


def stream_merge(
    recipe: Recipe,
    out: Path,
    *,
    device: str = "cpu",
    compile: bool | None = None,
    max_shard_bytes: int,
) -> StreamedMerge:
    """Merge ``recipe`` tensor by tensor into safetensors shards under ``out`` (see the module doc).

    Recipes that need the whole model at once are merged resident (the reason is returned).
    """
    start = time.perf_counter()
    inputs = StreamInputs.open(recipe)
    dev = torch.device(device)
    header = inputs.header
    compile = auto_compile(header, dev) if compile is None else compile
    merger = _slice_merger(inputs, recipe, dev, compile)
    try:
        passes = _count_global_thresholds(inputs, recipe, merger, dev)
    except NotStreamable as reason:
        return _resident_merge(recipe, out, device, compile, max_shard_bytes, str(reason))
    setup = time.perf_counter()
    inputs.load_task_tensors()
    dtype = DTYPES[recipe.dtype]
    specs = [TensorSpec(s.name, dtype, s.shape) for s in header.segments]
    specs += [TensorSpec.of(name, t) for name, t in header.passthrough.items()]
    with ShardWriter(out, specs, max_shard_bytes) as writer:
        for segment, merged in _merged_slices(inputs, recipe, merger, dev, compile):
            writer.write(segment.name, merged)
        for name, tensor in header.passthrough.items():
            writer.write(name, tensor)
    return StreamedMerge(header, setup - start, time.perf_counter() - setup, passes + 1, compiled=compile)


def _merged_slices(
    inputs: StreamInputs, recipe: Recipe, merger: SliceMerger, device: torch.device, compile: bool
) -> Iterator[tuple[Segment, torch.Tensor]]:
    """Each tensor merged, in the header's order.

    Eager kernels on CPU with several torch threads merge that many tensors at once, each on one torch
    thread with its own ``SliceMerger`` (sharing the counted global thresholds): most of a one-shot merge
    is small tensors, whose element-wise kernels, reads and numpy selections (``tie_rule: mergekit``) gain
    little from torch's threads (measured, TIES with mergekit's rules on SmolLM2 x 3 on 2 cores: 16.6 s
    with two threads per tensor, 12.8-13.2 s with one). One thread per tensor also makes the bits of
    methods with matrix products or SVDs independent of ``--threads``: they equal a one-thread resident
    merge, a search worker's default. Compiled kernels and accelerators merge one tensor at a time, the
    next one read meanwhile.
    """
    header = inputs.header
    groups = header.layer_groups(recipe.grouping.granularity)
    workers = torch.get_num_threads()
    if compile or device.type != "cpu" or workers == 1:
        for segment, (base, tau) in _prefetched(header.segments, lambda s: inputs.read_tau(s, device)):
            yield segment, merger.merge_slice(TensorSlice(header, segment, groups, base, tau), recipe)
        return
    own = threading.local()

    def merge(segment: Segment) -> torch.Tensor:
        if not hasattr(own, "merger"):
            own.merger = _slice_merger(inputs, recipe, device, compile, merger.thresholds)
        base, tau = inputs.read_tau(segment, device)
        return own.merger.merge_slice(TensorSlice(header, segment, groups, base, tau), recipe)

    # Tensors queued behind the one to be written next hold at most the largest tensor's entries: a long
    # tensor (an embedding) does not idle the other workers, and what waits to be written stays bounded.
    behind_limit = max(s.numel for s in header.segments)
    pending: deque[tuple[Segment, Future[torch.Tensor]]] = deque()
    with torch_threads(1), ThreadPoolExecutor(workers, thread_name_prefix="mergetune-slice") as pool:
        try:
            behind = 0
            for segment in header.segments:
                pending.append((segment, pool.submit(merge, segment)))
                behind += segment.numel
                while pending and behind - pending[0][0].numel >= behind_limit:
                    done, result = pending.popleft()
                    behind -= done.numel
                    yield done, result.result()
            while pending:
                done, result = pending.popleft()
                yield done, result.result()
        finally:  # a failed tensor (or a writer that stopped) ends the merge: queued tensors are not merged
            for _, result in pending:
                result.cancel()


def _slice_merger(
    inputs: StreamInputs,
    recipe: Recipe,
    device: torch.device,
    compile: bool,
    thresholds: GlobalThresholds | None = None,
) -> SliceMerger:
    header = inputs.header
    first = header.segments[0] if header.segments else None
    if first is None:
        raise MergetuneError(f"base ({recipe.base}): no floating-point tensor to merge")
    dummy = _one_entry_slice(header, first, header.layer_groups(recipe.grouping.granularity), device)
    return SliceMerger(dummy, thresholds or GlobalThresholds(header.n_tasks), header.numel, compile)


def _one_entry_slice(header: ModelSet, segment: Segment, groups: LayerGroups, device: torch.device) -> TensorSlice:
    """A stand-in for ``segment``: its name (hence group) and number of dims, one zero entry."""
    shape = tuple(1 for _ in segment.shape)
    base = torch.zeros(1, dtype=torch.float32, device=device)
    tau = torch.zeros(header.n_tasks, 1, dtype=torch.float32, device=device)
    return TensorSlice(header, Segment(segment.name, 0, shape), groups, base, tau)


def _count_global_thresholds(inputs: StreamInputs, recipe: Recipe, merger: SliceMerger, device: torch.device) -> int:
    """Run the method once per layer group on a one-entry stand-in, recording the model-wide counts it
    asks for (``NotStreamable`` if it needs more); count them exactly. Returns the passes it took."""
    header = inputs.header
    groups = header.layer_groups(recipe.grouping.granularity)
    first_of_group: dict[int, Segment] = {}
    for seg in header.segments:
        first_of_group.setdefault(groups.index(seg.name), seg)
    for seg in first_of_group.values():
        merger.merge_slice(_one_entry_slice(header, seg, groups, device), recipe)
    if not merger.thresholds.wanted:
        merger.thresholds.recording = False
        return 0

    def taus() -> Iterator[torch.Tensor]:
        for _, (_, tau) in _prefetched(header.segments, lambda s: inputs.read_tau(s, device)):
            yield tau

    return merger.thresholds.count(taus, bf16_values=inputs.storage == torch.bfloat16)


def _prefetched(
    segments: list[Segment], read: Callable[[Segment], tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[tuple[Segment, tuple[torch.Tensor, torch.Tensor]]]:
    """Each segment with its tensors, the next one read in a thread while the caller works on this one."""
    if not segments:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergetune-read") as pool:
        pending: Future[tuple[torch.Tensor, torch.Tensor]] = pool.submit(read, segments[0])
        for i, segment in enumerate(segments):
            current = pending.result()
            if i + 1 < len(segments):
                pending = pool.submit(read, segments[i + 1])
            yield segment, current
            del current


def _resident_merge(
    recipe: Recipe, out: Path, device: str, compile: bool, max_shard_bytes: int, reason: str
) -> StreamedMerge:
    """The in-memory merge (``ModelSet`` + ``Merger``), for recipes that need the whole model at once."""
    start = time.perf_counter()
    modelset = ModelSet.from_recipe(recipe, device=device)
    loaded = time.perf_counter()
    merged = Merger(modelset, compile=compile).merge(recipe)
    state = {**merged, **modelset.passthrough}
    with ShardWriter(out, [TensorSpec.of(n, t) for n, t in state.items()], max_shard_bytes) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
    return StreamedMerge(modelset, loaded - start, time.perf_counter() - loaded, 1, reason, compiled=compile)
