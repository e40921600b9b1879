"""Write a model's weights as safetensors shards, tensor by tensor, without holding a shard in memory.

``safetensors.torch.save_file`` serialises a whole shard into one byte buffer: writing a merged
model that way holds the shard (up to ``max_shard_bytes``) plus its serialised copy. Here the plan
(which tensor goes into which shard, at which offset) is made up front from names, dtypes and
shapes alone, so each file's header is written first and every tensor's bytes go straight to their
place the moment the tensor exists (``os.pwrite``): the order in which tensors arrive does not matter.

Files follow the safetensors format (8-byte little-endian header length, a JSON header padded with
spaces to 8 bytes, the data) and Hugging Face's sharding convention (``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``). Within a file, tensors
are laid out by element size (largest first), then by name, so every tensor is aligned to its
element size (the safetensors library's rule). A shard is written under a ``.partial`` name and
renamed when its last tensor is in: an interrupted write never leaves a complete-looking file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PARTIAL_SUFFIX = ".partial"
_HEADER_ALIGN = 8
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class TensorSpec:
    """What the plan needs to know about a tensor before it exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, tensor.dtype, tuple(tensor.shape))


def plan_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in the given order, a new shard whenever the next one would push a non-empty shard past ``max_bytes``."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(n_shards: int) -> list[str]:
    if n_shards == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


class _ShardFile:
    """One shard: its header is written at once, each tensor at its offset when it arrives."""

    def __init__(self, path: Path, specs: list[TensorSpec]) -> None:
        self.path = path
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self.specs = {s.name: s for s in specs}
        self.pending = set(self.specs)
        header, self.offsets = _header(specs)
        self.data_start = 8 + len(header)
        self.fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(header)) + header, 0)
        total = sum(s.nbytes for s in specs)
        os.ftruncate(self.fd, self.data_start + total)
        if not self.pending:  # a shard of no tensors is complete at once
            self._complete()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, planned {spec.dtype} {spec.shape}"
            )
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        written = os.pwrite(self.fd, memoryview(raw), self.data_start + self.offsets[name])
        if written != spec.nbytes:
            raise OSError(f"{self.partial}: short write of '{name}' ({written} of {spec.nbytes} bytes)")
        self.pending.discard(name)
        if not self.pending:
            self._complete()

    def _complete(self) -> None:
        self.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        self.close()
        self.partial.unlink(missing_ok=True)


def _header(specs: list[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    """The JSON header (padded with spaces to 8 bytes) and each tensor's data offset."""
    order = sorted(specs, key=lambda s: (-torch.empty((), dtype=s.dtype).element_size(), s.name))
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, start = {}, 0
    for spec in order:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor '{spec.name}': dtype {spec.dtype} has no safetensors name")
        entries[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [start, start + spec.nbytes],
        }
        offsets[spec.name] = start
        start += spec.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % _HEADER_ALIGN)
    return header, offsets


class ShardWriter:
    """Writes planned tensors into their shards as they come; the index once every shard is complete.

    Use as a context manager: on an error the unfinished ``.partial`` files are removed.
    """

    def __init__(self, out: Path, specs: Iterable[TensorSpec], max_shard_bytes: int) -> None:
        self.out = out
        plan = plan_shards(specs, max_shard_bytes)
        self.names = shard_names(len(plan))
        self.shards = [_ShardFile(out / fname, shard) for fname, shard in zip(self.names, plan, strict=True)]
        self.shard_of = {s: i for i, shard in enumerate(plan) for s in (spec.name for spec in shard)}
        self.total = sum(spec.nbytes for shard in plan for spec in shard)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.shards[self.shard_of[name]].write(name, tensor)

    def finish(self) -> None:
        missing = sorted(n for shard in self.shards for n in shard.pending)
        if missing:
            raise ValueError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[:3]}")
        if len(self.shards) > 1:
            weight_map = {name: self.names[i] for name, i in self.shard_of.items()}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            for shard in self.shards:
                shard.abort()
        else:
            self.finish()
