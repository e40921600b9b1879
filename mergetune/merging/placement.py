"""Several devices in one worker: layer groups placed along a device map, merged and evaluated where they live.

A store that does not fit one device is split by layer group (embeddings, each block, head, at
granularity 1): each group's task vectors and base go to one device, in accelerate's device-map
convention (``{layer group or module prefix: device}``). ``plan_placement`` makes the map:

- ``balanced`` (and ``auto``, its alias, as in transformers): groups in layer order, cut into one
  contiguous run per device so that the largest run is as small as possible. Precisely: C is the
  smallest capacity for which filling the devices in order (each takes groups while its bytes stay
  ≤ min(C, its budget)) places every group; that fill is the plan, so earlier devices are full up to C;
- an explicit map: every group takes the device of the most specific key matching it (its group name,
  or a module prefix of its tensors); a group whose tensors match different devices, or no key, is
  an error (a group is merged on one device).

``split_store`` copies each device's groups into a contiguous part on that device (``StorePart``);
the engine then merges each work item from its part on its device, into that device's output
buffer, so merged weights never move. ``dispatch`` places an evaluation model with the same map
(accelerate's ``dispatch_model``: hooks move activations between devices, weights stay).

Devices are names (``cuda:0``, ``cpu``) and may repeat: ``[cpu, cpu]`` makes two parts on the CPU,
which exercises the same code as two GPUs (used by the tests; only CPU placement has been run).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergetune.errors import MergetuneError
from mergetune.forward import best_prefix
from mergetune.merging.context import WorkItem
from mergetune.merging.layer_groups import LayerGroups
from mergetune.merging.modelset import ModelSet, Segment
from mergetune.merging.residency import format_bytes

DeviceSpec = str | Sequence[str]
DeviceMap = str | Mapping[str, str | int]
MAP_STRATEGIES = ("auto", "balanced")


# ---- which devices -------------------------------------------------------------------------------------------
def visible_devices() -> list[str]:
    """The devices this process can use: the CPU and every visible accelerator."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_devices(spec: DeviceSpec, field: str = "resources.devices") -> list[str]:
    """The devices of ``spec`` (a list of names, or ``auto``: every visible accelerator), each checked to exist.

    The CPU cannot be mixed with accelerators: accelerate's device map reads ``cpu`` beside a GPU as
    offloading (weights copied to the GPU for every forward), which would detach merged weights.
    """
    visible = visible_devices()
    if isinstance(spec, str):
        if spec != "auto":
            raise MergetuneError(f"{field}: expected a list of devices or 'auto', got {spec!r}")
        accelerators = [d for d in visible if d != "cpu"]
        if not accelerators:
            raise MergetuneError(
                f"{field}: auto found no accelerator (visible devices: {', '.join(visible)}); list the devices, "
                "e.g. [cpu, cpu] to run the multi-device placement on the CPU"
            )
        return accelerators
    names = [_device_name(d, visible, field) for d in spec]
    if not names:
        raise MergetuneError(f"{field}: the list of devices is empty")
    if "cpu" in names and any(n != "cpu" for n in names):
        raise MergetuneError(f"{field}: {names} mixes the CPU with accelerators; list accelerators only, or cpu only")
    return names


def _device_name(name: str, visible: Sequence[str], field: str) -> str:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    text = str(device) if device is not None else str(name)
    if text not in visible:
        raise MergetuneError(f"{field}: device {name} does not exist here; visible devices: {', '.join(visible)}")
    return text


# ---- the plan ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Which device holds each layer group (granularity 1), and the store bytes each device holds."""

    devices: tuple[str, ...]  # one entry per part; names may repeat (two parts on the CPU)
    groups: tuple[str, ...]  # layer order
    group_device: tuple[int, ...]  # per group, an index into ``devices``
    group_bytes: tuple[int, ...]

    def device_of(self, group: str) -> int:
        return self.group_device[self.groups.index(group)]

    def device_bytes(self) -> list[int]:
        out = [0] * len(self.devices)
        for d, size in zip(self.group_device, self.group_bytes, strict=True):
            out[d] += size
        return out

    def describe(self) -> str:
        """One line for the search's start and status: each device, its groups and their store bytes."""
        parts = []
        for d, (device, size) in enumerate(zip(self.devices, self.device_bytes(), strict=True)):
            names = [g for g, gd in zip(self.groups, self.group_device, strict=True) if gd == d]
            held = _runs(names, self.groups) if names else "nothing"
            parts.append(f"{d}:{device} ← {held} ({format_bytes(size)})")
        return "device map: " + "; ".join(parts)


def _runs(names: list[str], order: tuple[str, ...]) -> str:
    """``embed..blocks.5, head``: contiguous runs of groups (in layer order) written as first..last."""
    positions = [order.index(n) for n in names]
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return ", ".join(order[r[0]] if len(r) == 1 else f"{order[r[0]]}..{order[r[-1]]}" for r in runs)


def group_store_bytes(modelset: ModelSet, groups: LayerGroups) -> dict[str, int]:
    """Store bytes of each layer group (its task vectors and base), in layer order."""
    sizes = dict.fromkeys(groups.names, 0)
    per_entry = (modelset.n_tasks + 1) * modelset.storage_dtype.itemsize
    for seg in modelset.segments:
        sizes[groups.names[groups.index(seg.name)]] += seg.numel * per_entry
    return sizes


def plan_placement(
    group_bytes: Mapping[str, int],
    devices: Sequence[str],
    device_map: DeviceMap = "auto",
    budget: int | None = None,
    group_tensors: Mapping[str, Sequence[str]] | None = None,
) -> Placement:
    """Assign each layer group (``group_bytes`` in layer order) to one of ``devices`` (module doc).

    ``budget``: the store bytes each device may hold (``resources.device_memory``); ``group_tensors``:
    each group's tensor names, for explicit maps keyed by module prefix.
    """
    groups = tuple(group_bytes)
    sizes = tuple(group_bytes.values())
    if isinstance(device_map, str):
        if device_map not in MAP_STRATEGIES:
            raise MergetuneError(f"resources.device_map: {device_map!r} is not one of {MAP_STRATEGIES} or a mapping")
        assignment = _balanced(sizes, len(devices), budget)
        if assignment is None:
            raise MergetuneError(
                f"the store ({format_bytes(sum(sizes))}) does not fit {len(devices)} device(s) with "
                f"resources.device_memory {format_bytes(budget or 0)} each, layer groups placed contiguously "
                f"(largest group {format_bytes(max(sizes, default=0))}); add devices, raise device_memory or "
                "use resources.storage_dtype bfloat16"
            )
    else:
        assignment = _explicit(groups, device_map, devices, group_tensors or {g: [] for g in groups})
    placement = Placement(tuple(devices), groups, tuple(assignment), sizes)
    _check_budget(placement, budget)
    return placement


def _balanced(sizes: Sequence[int], n_devices: int, budget: int | None) -> list[int] | None:
    """The contiguous fill at the smallest capacity that places every group; None when the budget forbids all."""
    runs = sorted({sum(sizes[a:b]) for a in range(len(sizes)) for b in range(a + 1, len(sizes) + 1)})
    if not runs:
        return []
    lo = bisect.bisect_left(runs, max(sizes))  # no capacity below the largest group can work
    found = None
    hi = len(runs) - 1
    while lo <= hi:  # placing is monotone in the capacity: binary search the sorted candidates
        mid = (lo + hi) // 2
        fill = _fill(sizes, n_devices, runs[mid] if budget is None else min(runs[mid], budget))
        if fill is None:
            lo = mid + 1
        else:
            found, hi = fill, mid - 1
    return found


def _fill(sizes: Sequence[int], n_devices: int, capacity: int) -> list[int] | None:
    """Groups in order, device by device, each device taking groups while its total stays ≤ capacity."""
    out, device, load = [], 0, 0
    for size in sizes:
        if load + size > capacity:
            device, load = device + 1, 0
            if device == n_devices or size > capacity:
                return None
        out.append(device)
        load += size
    return out


def _explicit(
    groups: tuple[str, ...],
    device_map: Mapping[str, str | int],
    devices: Sequence[str],
    tensors: Mapping[str, Sequence[str]],
) -> list[int]:
    index = {key: _map_device(value, devices) for key, value in device_map.items()}
    out, missing = [], []
    for group in groups:
        found: dict[int, list[str]] = {}
        for name in tensors.get(group) or [group]:
            key = _most_specific(group, name, index)
            if key is None:
                missing.append(group)
                break
            found.setdefault(index[key], []).append(name)
        else:
            if len(found) > 1:
                spread = "; ".join(f"{devices[d]}: {names[0]}" for d, names in found.items())
                raise MergetuneError(
                    f"resources.device_map splits layer group '{group}' over several devices ({spread}); "
                    "a layer group is merged on one device: map the whole group"
                )
            out.append(next(iter(found)))
    if missing:
        raise MergetuneError(
            f"resources.device_map does not cover the layer group(s) {sorted(set(missing), key=groups.index)}; "
            f"map each group (names: {list(groups)}) or a module prefix of its tensors"
        )
    return out


def _most_specific(group: str, tensor: str, keys: Mapping[str, int]) -> str | None:
    """The longest key naming the group, the tensor, or a module prefix of it ('' covers everything)."""
    hits = [k for k in keys if k in (group, tensor) or k == "" or tensor.startswith(k + ".")]
    return max(hits, key=lambda k: (k in (group, tensor), len(k)), default=None)


def _map_device(value: str | int, devices: Sequence[str]) -> int:
    """A map value as a position in ``devices``: an integer is that position, a name its first occurrence."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(devices):
            return value
    elif isinstance(value, str):
        name = str(torch.device("cuda", 0)) if value == "cuda" else value
        if name in devices:
            return list(devices).index(name)
    raise MergetuneError(
        f"resources.device_map: {value!r} is not one of resources.devices {list(devices)} (a name or a position)"
    )


def _check_budget(placement: Placement, budget: int | None) -> None:
    if budget is None:
        return
    for device, size in zip(placement.devices, placement.device_bytes(), strict=True):
        if size > budget:
            raise MergetuneError(
                f"resources.device_map puts {format_bytes(size)} of the store on {device}, over "
                f"resources.device_memory ({format_bytes(budget)}); move layer groups to other devices"
            )


# ---- the store, split --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorePart:
    """The store of the segments one device holds: ``tau [T, n]`` and ``base [n]`` on ``device``.

    ``offsets`` maps a segment's index to its start in the part; None: the part is the whole flat store
    (one device, as without placement), offsets are the segments' own.
    """

    device: torch.device
    tau: torch.Tensor
    base: torch.Tensor
    numel: int
    offsets: dict[int, int] | None = None

    def holds(self, segment: int) -> bool:
        return self.offsets is None or segment in self.offsets

    def start(self, index: int, segment: Segment) -> int:
        """Where segment ``index`` starts in this part."""
        return segment.offset if self.offsets is None else self.offsets[index]

    def local(self, item: WorkItem, segment: Segment) -> WorkItem:
        """``item`` (flat offsets of the whole store, inside ``segment``) with its range in this part."""
        if self.offsets is None:
            return item
        shift = self.offsets[item.segment] - segment.offset
        return dataclasses.replace(item, start=item.start + shift, stop=item.stop + shift)


def whole_store(modelset: ModelSet) -> StorePart:
    """The one part of an unplaced store: the ModelSet's own tensors, merged on its merge device."""
    return StorePart(modelset.merge_device, modelset.tau, modelset.base_flat, modelset.numel)


def split_store(modelset: ModelSet, placement: Placement) -> list[StorePart]:
    """One part per device of ``placement``: its groups' segments (in store order) copied there, contiguous."""
    groups = modelset.layer_groups(1)
    device_of_segment = [placement.device_of(groups.names[groups.index(s.name)]) for s in modelset.segments]
    parts = []
    for d, name in enumerate(placement.devices):
        mine = [i for i, dev in enumerate(device_of_segment) if dev == d]
        offsets, n = {}, 0
        for i in mine:
            offsets[i], n = n, n + modelset.segments[i].numel
        device = torch.device(name)
        tau = torch.empty(modelset.n_tasks, n, dtype=modelset.storage_dtype, device=device)
        base = torch.empty(n, dtype=modelset.storage_dtype, device=device)
        for i in mine:  # one segment at a time: a host or disk store is read once, never copied whole
            seg, at = modelset.segments[i], offsets[i]
            tau[:, at : at + seg.numel].copy_(modelset.tau[:, seg.offset : seg.end])
            base[at : at + seg.numel].copy_(modelset.base_flat[seg.offset : seg.end])
        parts.append(StorePart(device, tau, base, n, offsets))
    return parts


# ---- evaluation models, dispatched the same way ---------------------------------------------------------------
def module_device_map(model: torch.nn.Module, placement: Placement, groups: LayerGroups) -> dict[str, int]:
    """accelerate's device map of ``model`` along ``placement``: the largest modules whose weights share a device.

    A parameter of the store goes where its group is (tied parameters follow the store's name);
    modules with no store parameter (a task head, rotary tables) take the device of the module before them.
    Values are positions in ``placement.devices`` (names may repeat: two parts on one CPU).
    """
    params = dict(model.named_parameters())
    prefix = best_prefix(params, dict.fromkeys(groups.of_tensor))  # type: ignore[arg-type]
    device_of_param = {
        id(p): placement.device_of(groups.names[groups.of_tensor[n[len(prefix) :]]])
        for n, p in params.items()
        if n.startswith(prefix) and n[len(prefix) :] in groups.of_tensor
    }
    out: dict[str, int] = {}
    _map_module(model, "", device_of_param, out, [0])
    return out


def _map_module(
    module: torch.nn.Module,
    name: str,
    device_of_param: Mapping[int, int],
    out: dict[str, int],
    last: list[int],
) -> None:
    """Map ``module`` whole when its parameters sit on one device, else each child (``last``: the previous device)."""
    found = {device_of_param[id(p)] for p in module.parameters() if id(p) in device_of_param}
    if len(found) <= 1:
        last[0] = found.pop() if found else last[0]
        out[name] = last[0]
        return
    own = [n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]]
    if own:
        raise MergetuneError(
            f"module '{name}' holds tensors {own[:3]} besides children on several devices; "
            "map its layer groups to one device in resources.device_map"
        )
    for child_name, child in module.named_children():
        _map_module(child, f"{name}.{child_name}" if name else child_name, device_of_param, out, last)


def dispatch(model: torch.nn.Module, placement: Placement, groups: LayerGroups) -> torch.nn.Module:
    """``model`` placed along ``placement`` by accelerate's ``dispatch_model`` (hooks move activations).

    Hooks are forced even when every device is the CPU, so a CPU test runs the code a multi-GPU
    worker runs. Bind the merge buffers after this: dispatching moves (copies) the weights.
    """
    from accelerate import dispatch_model  # late: accelerate pulls in much of transformers' stack

    positions = module_device_map(model, placement, groups)
    names = {module: placement.devices[d] for module, d in positions.items()}
    return dispatch_model(model, device_map=names, force_hooks=True)
