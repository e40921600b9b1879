"""The merge engine: applies a Recipe to a resident ModelSet, fast and reproducibly.

Per candidate, the engine
1. resolves the recipe's weights and densities into ``[T, G]`` arrays (task × layer group);
2. asks the method to ``prepare`` small per-row tensors (thresholds come from precomputed order
   statistics, see ``stats.py``);
3. streams over the store in chunks of whole rows (about ``chunk_size`` entries, so intermediates
   stay in cache) and writes ``base + kernel(chunk)`` into a preallocated output buffer.

The store may be float32, bfloat16 or float16 (``ModelSet.storage_dtype``): each chunk is widened to
float32 before the kernel, so the merge always computes in float32 and writes the recipe's dtype. A
store that is not on the merge device (host or disk tier, see ``residency.py``) is streamed to it
chunk by chunk (``ChunkStream``); a device-tier store is read in place; a whole disk-tier store is read
with direct I/O by a thread, windows ahead of the merge (``direct_read``). With a ``Placement`` (several
devices, see ``placement.py``) the store is split into one part per device and each work item merges
from its part, on its device, into that device's output buffer; without one, the whole store is the
single part (the same loop).

Kernels run through ``torch.compile`` when it is usable (a C++ compiler on CPU, Triton on CUDA):
one fused pass per chunk instead of a dozen. ``compile=False`` runs the same functions eagerly.
A recipe gives the same bits every time on the same device type and backend; eager and compiled
agree to float rounding (tested), not necessarily bit for bit.
"""

from __future__ import annotations

import logging
import os
import shutil
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mergetune.errors import MergetuneError, RecipeError
from mergetune.forward import best_prefix
from mergetune.merging.context import Layout, MergeContext, item_args
from mergetune.merging.direct_read import open_direct
from mergetune.merging.methods import ChunkMethod, TensorMethod, check_recipe, get_method, method_options
from mergetune.merging.modelset import ModelSet
from mergetune.merging.placement import Placement, StorePart, split_store, whole_store
from mergetune.merging.streaming import ChunkStream, to_device
from mergetune.recipe import Recipe, resolve_parameter

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CHUNK = 1 << 20
# On CPU a chunk's float32 temporaries (1 MiB each at 2**18 entries) stay in cache and are recycled by
# the allocator; at 2**20 each is a fresh 4 MiB mapping with its page faults, which made an eager TIES
# chunk 3x slower (measured: 37 ms per 2**20 entries in 2**20 chunks, 12 ms in 2**18 chunks, 3 tasks).
CPU_CHUNK = 1 << 18


def default_chunk(device: torch.device) -> int:
    """Entries per work item: fewer on CPU (cache, allocator), more on an accelerator (fewer launches)."""
    return CPU_CHUNK if device.type == "cpu" else DEFAULT_CHUNK


RECOMPILE_LIMIT = 64


def compile_available(device: torch.device) -> bool:
    if os.environ.get("MERGETUNE_COMPILE", "1") == "0":
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


class Merger:
    """Merges candidates of a resident ModelSet into one preallocated output buffer.

    ``merge(recipe)`` returns the merged tensors as views of that buffer (valid until the next
    merge). ``bind(module)`` makes a module's parameters share the buffer, so a model used for
    evaluation sees each new candidate without a copy.
    """

    def __init__(
        self,
        modelset: ModelSet,
        *,
        compile: bool | None = None,
        chunk_size: int | None = None,
        naive: bool = False,
        placement: Placement | None = None,
    ) -> None:
        """``placement``: layer groups on several devices; the store is copied into one part per device."""
        self.modelset = modelset
        self.device = modelset.merge_device
        self._placed = None if placement is None else split_store(modelset, placement)
        self.compile = compile_available(self.device) if compile is None else compile
        self.chunk_size = default_chunk(self.device) if chunk_size is None else chunk_size
        self.naive = naive
        self._layouts: dict[int, Layout] = {}
        self._kernels: dict[str, Callable[..., torch.Tensor]] = {}
        self._out: dict[torch.dtype, torch.Tensor] = {}

    # ---- public API ------------------------------------------------------------------------------
    def merge(self, recipe: Recipe, into: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Merge one candidate; returns {tensor name: merged tensor} for every merged tensor.

        ``into``: write into the buffers of this dtype instead of the recipe's, each value rounded to the
        recipe's dtype first: e.g. a bf16 recipe into the float32 buffer that evaluation models are bound
        to, holding exactly the bf16 merge's values without a bf16 buffer beside it.
        """
        ctx, method = self.context(recipe)
        dtype = DTYPES[recipe.dtype]
        out = self.output_buffers(dtype if into is None else into)
        rounding = None if into in (None, dtype) else dtype  # a buffer of the recipe's dtype rounds as it is written
        if isinstance(method, TensorMethod):
            self._run_tensor_method(method, ctx, out, rounding)
        else:
            assert isinstance(method, ChunkMethod)
            self._run_chunk_method(method, ctx, out, rounding)
        return self.views(out)

    def context(self, recipe: Recipe) -> tuple[MergeContext, Any]:
        check_recipe(recipe)  # an unknown method or a bad option is an error naming the field, before any work
        self._check_tasks(recipe)
        method = get_method(recipe.method)
        layout = self.layout(recipe.grouping.granularity)
        tasks, groups = self.modelset.task_names, layout.groups.names
        dev = self.modelset.device
        weight = torch.from_numpy(resolve_parameter(recipe.weight, tasks, groups, "weight")).to(dev)
        density = torch.from_numpy(resolve_parameter(recipe.density, tasks, groups, "density")).to(dev)
        ctx = MergeContext(layout, weight, density, method_options(recipe), recipe.seed)
        method.validate(ctx)
        return ctx, method

    def layout(self, granularity: int) -> Layout:
        if granularity not in self._layouts:
            self._layouts[granularity] = Layout(self.modelset, granularity, self.chunk_size, self.naive)
        return self._layouts[granularity]

    def parts(self) -> list[StorePart]:
        """Where the store is merged from: one part per device of the placement, else the whole store."""
        return self._placed if self._placed is not None else [whole_store(self.modelset)]

    def output_buffers(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """One merge buffer per part, on its device (one buffer without a placement)."""
        if dtype not in self._out:
            self._out[dtype] = [torch.empty(p.numel, dtype=dtype, device=p.device) for p in self.parts()]
        return self._out[dtype]

    def output_buffer(self, dtype: torch.dtype) -> torch.Tensor:
        """The merge buffer, flat in the store's layout: for callers that need one tensor (gradient tuning)."""
        buffers = self.output_buffers(dtype)
        if len(buffers) != 1:
            raise MergetuneError(
                "this feature needs the merged model in one buffer; it is not available with several devices "
                "(resources.devices): run it on one device"
            )
        return buffers[0]

    def views(self, buffers: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each merged tensor as a view of the buffer of the part that holds it (one tensor: the only part's)."""
        buffers = [buffers] if isinstance(buffers, torch.Tensor) else buffers
        parts, out = self.parts(), {}
        for i, seg in enumerate(self.modelset.segments):
            part, buffer = next((p, b) for p, b in zip(parts, buffers, strict=True) if p.holds(i))
            start = part.start(i, seg)
            out[seg.name] = buffer[start : start + seg.numel].view(seg.shape)
        return out

    def bind(self, module: torch.nn.Module, dtype: str = "float32") -> None:
        """Point the module's merged parameters at the output buffer (no copy per candidate).

        The module may wrap the base (a task model's ``bert.`` prefix is matched). Every merged
        tensor must find its parameter: binding half a model would evaluate unmerged weights.
        """
        views = self.views(self.output_buffers(DTYPES[dtype]))
        params = dict(module.named_parameters())
        prefix = best_prefix(params, views)
        unbound = [n for n in views if prefix + n not in params]
        if unbound:
            raise RecipeError(
                f"cannot bind {len(unbound)} merged tensor(s) to {type(module).__name__}, e.g. {unbound[:3]}: "
                "its parameter names differ from the checkpoint's; load the module from the base folder"
            )
        with torch.no_grad():
            for name, view in views.items():
                param = params[prefix + name]
                if param.shape != view.shape:
                    raise RecipeError(
                        f"cannot bind '{name}': module has {tuple(param.shape)}, merged {tuple(view.shape)}"
                    )
                param.data = view

    def extra_bytes(self) -> int:
        """Memory held by precomputed statistics and output buffers, beyond the ModelSet."""
        stats = sum(layout.stats.extra_bytes() for layout in self._layouts.values())
        return stats + sum(b.numel() * b.element_size() for bs in self._out.values() for b in bs)

    # ---- internals -------------------------------------------------------------------------------
    def _check_tasks(self, recipe: Recipe) -> None:
        if recipe.task_names != self.modelset.task_names:
            raise RecipeError(
                f"recipe experts {recipe.task_names} do not match the loaded models "
                f"{self.modelset.task_names} (same names, same order)"
            )

    def _kernel(self, method: ChunkMethod) -> Callable[..., torch.Tensor]:
        if method.name not in self._kernels:
            fn = _with_base(method.kernel)
            if self.compile:
                # torch._dynamo: heavy to import (seconds), needed only when compiling (an eager merge never is)
                import torch._dynamo.config as dynamo_config

                # Each method needs a few graphs (1 row vs many, structural options such as
                # TIES' disjoint mode); a search over methods and options needs more than 8.
                dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
                fn = torch.compile(fn, dynamic=True)
            self._kernels[method.name] = fn
        return self._kernels[method.name]

    def _run_chunk_method(
        self, method: ChunkMethod, ctx: MergeContext, out: list[torch.Tensor], rounding: torch.dtype | None
    ) -> None:
        prepared = method.prepare(ctx)
        kernel = self._kernel(method)
        parts, segments, T = self.parts(), self.modelset.segments, self.modelset.n_tasks
        for part, buffer in zip(parts, out, strict=True):
            # the args were prepared beside the store; the kernels run on the part's device. Per-entry args
            # go whole to a lone part's device, else item by item (each device gets only its slices)
            row_args = to_device(prepared.row_args, part.device)
            whole = len(parts) == 1
            element_args = to_device(prepared.element_args, part.device) if whole else prepared.element_args
            items = [it for it in ctx.layout.items if part.holds(it.segment)]
            args_per_item = item_args(items, row_args, element_args, to_device(prepared.static, part.device))
            local = [part.local(it, segments[it.segment]) for it in items]
            with torch.inference_mode():
                for (it, args), here, (tau, base) in zip(args_per_item, local, self._chunks(part, local), strict=True):
                    R, L = it.rows, it.row_length
                    args = args if whole else to_device(args, part.device)
                    merged = kernel(tau.view(T, R, L), base.view(R, L), **args)
                    buffer[here.start : here.stop].copy_(_rounded(merged.reshape(-1), rounding))

    def _chunks(self, part: StorePart, items: list) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The part's chunks in float32 on its device: a whole disk-tier store by direct I/O ahead of the merge
        where the file system allows it (``direct_read``), anything else through ``ChunkStream``."""
        ms = self.modelset
        if ms.residency.tier == "disk" and part.tau is ms.tau and ms.residency.path is not None:
            reader = open_direct(ms.residency.path, ms.n_tasks, ms.numel, ms.storage_dtype)
            if reader is not None:
                chunks = reader.chunks(items)
                try:
                    for tau, base in chunks:
                        yield tau.to(part.device), base.to(part.device)
                finally:
                    chunks.close()  # stops and joins its thread before the file is closed under it
                    reader.close()
                return
        yield from ChunkStream(part.tau, part.base, items, part.device)

    def _run_tensor_method(
        self, method: TensorMethod, ctx: MergeContext, out: list[torch.Tensor], rounding: torch.dtype | None
    ) -> None:
        parts = self.parts()
        with torch.inference_mode():
            for i, seg in enumerate(self.modelset.segments):
                part, buffer = next((p, b) for p, b in zip(parts, out, strict=True) if p.holds(i))
                start = part.start(i, seg)
                # a whole-tensor method (SVD, ...) computes from the ModelSet's store; its result goes to the part
                delta = method.merge_tensor(ctx, i).reshape(-1).to(part.device)
                b = part.base[start : start + seg.numel].to(part.device, torch.float32)
                buffer[start : start + seg.numel].copy_(_rounded(b + delta, rounding))


def _rounded(merged: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The float32 merge rounded to ``dtype`` (as writing it into a buffer of that dtype would); None: as is."""
    return merged if dtype is None else merged.to(dtype)


def _with_base(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``base + kernel(...)`` as a function with its own code object.

    Dynamo counts recompilations per code object: one shared wrapper for all methods would hit
    the limit after two or three methods and silently fall back to eager for the rest.
    """

    def merged_chunk(tau: torch.Tensor, base: torch.Tensor, **args: Any) -> torch.Tensor:
        return base + kernel(tau, **args)

    name = f"merged_{getattr(kernel, '__name__', 'kernel')}"
    code = merged_chunk.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, merged_chunk.__globals__, name, None, merged_chunk.__closure__)
