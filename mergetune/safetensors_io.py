"""Read safetensors files tensor by tensor, with no memory map left open.

The bottom of the package's layers, so both the merging store (which streams experts into it) and
the objectives (which copy a base's tensors into an expert's model) read weights the same way:
``LazyState`` parses each file's header (8 bytes of length, then JSON, as the format specifies) and
reads one tensor at a time with ``pread`` into its own buffer. safetensors' own ``safe_open`` maps the
whole file, and the pages of a map that stays open count in the process's resident memory: copying a
model through one held another model's worth of pages.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mergetune.errors import BadWeightsError, MergetuneError

# safetensors dtype codes (the format's specification) -> torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorMeta:
    """A tensor's shape and dtype, known without reading its values."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorMeta:
        return cls(tuple(tensor.shape), tensor.dtype)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes are in a safetensors file."""

    path: Path
    meta: TensorMeta
    start: int  # absolute byte offset in the file
    stop: int


class LazyState(Mapping[str, torch.Tensor]):
    """A state dict whose tensors stay on disk until asked for, each read alone into its own memory.

    Reading uses ``os.pread`` into a fresh buffer rather than safetensors' memory map: pages of a
    map that stays open count in the process's resident memory, and streaming several experts
    through one open map each would hold all of them in the end.
    """

    def __init__(self, entries: Mapping[str, _Entry]) -> None:
        self._entries = dict(entries)

    @classmethod
    def of_files(cls, files: list[Path]) -> LazyState:
        entries: dict[str, _Entry] = {}
        for file in files:
            entries.update(_safetensors_entries(file))
        return cls(entries)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        return _read_entry(name, entry)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def meta(self, name: str) -> TensorMeta:
        return self._entries[name].meta

    def renamed(self, names: Mapping[str, str]) -> LazyState:
        """The same tensors under new names: ``names[new] = old``."""
        return LazyState({new: self._entries[old] for new, old in names.items()})


def _safetensors_entries(path: Path) -> dict[str, _Entry]:
    """The tensors of a safetensors file from its header: 8 bytes of header length, then JSON."""
    if not path.is_file():
        raise MergetuneError(f"weights file not found: {path} (listed in the folder's index?)")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        data_start = 8 + length
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor '{name}' has dtype {info['dtype']}, which mergetune does not read")
            start, stop = info["data_offsets"]
            meta = TensorMeta(tuple(int(d) for d in info["shape"]), _SAFETENSORS_DTYPES[info["dtype"]])
            if not 0 <= start <= stop <= size - data_start or stop - start != meta.numel * meta.dtype.itemsize:
                raise ValueError(f"tensor '{name}' has byte range {start}..{stop}, wrong for its shape or the file")
            entries[name] = _Entry(path, meta, data_start + start, data_start + stop)
        return entries
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise BadWeightsError(f"{path}: cannot read safetensors file: {exc}") from exc


def _read_entry(name: str, entry: _Entry) -> torch.Tensor:
    count = entry.stop - entry.start
    if count == 0:
        return torch.empty(entry.meta.shape, dtype=entry.meta.dtype)
    buffer = bytearray(count)
    with entry.path.open("rb", buffering=0) as f:
        got = f.readinto(memoryview(buffer)) if f.seek(entry.start) == entry.start else 0
    if got != count:
        raise BadWeightsError(f"{entry.path}: tensor '{name}' is cut short ({got} of {count} bytes)")
    return torch.frombuffer(buffer, dtype=entry.meta.dtype).reshape(entry.meta.shape)
