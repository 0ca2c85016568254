"""Checkpoint tensors read one at a time from a memory-mapped file, and safetensors files written one at a time.

A :class:`MappedTensor` records where a tensor's bytes lie in a mapped file; nothing is read until it is used.
:meth:`MappedTensor.load` copies those bytes into a new tensor of the wanted dtype and then hands the file's pages
back to the kernel (``madvise(MADV_DONTNEED)``), so converting a whole checkpoint keeps at most one source tensor
resident beside the converted ones. :meth:`MappedTensor.view` is the zero-copy alternative (pages stay mapped).
:func:`write_safetensors` writes tensors (loaded ones or handles) one by one, so a converted file is never held
twice in memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from onepeace.errors import CheckpointError

_PAGE = mmap.PAGESIZE

#: Source bytes copied between two page releases when a tensor is loaded.
CHUNK_BYTES = 32 << 20

#: safetensors dtype codes (https://github.com/huggingface/safetensors, format description).
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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
}
_SAFETENSORS_CODES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


class MappedFile:
    """A whole file mapped copy-on-write: tensors viewing it may be written to, the file never changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            self.size = os.fstat(fh.fileno()).st_size
            if self.size == 0:
                raise CheckpointError(f"{self.path} is empty")
            self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)

    def span(self, start: int, nbytes: int) -> torch.Tensor:
        """Bytes ``start:start + nbytes`` of the file as a uint8 tensor viewing the mapping (no copy)."""
        if start < 0 or nbytes < 0 or start + nbytes > self.size:
            raise CheckpointError(
                f"{self.path}: tensor data at bytes {start}..{start + nbytes} lies outside the file "
                f"({self.size} bytes); the file is truncated or corrupt"
            )
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=start)

    def release(self, start: int, nbytes: int) -> None:
        """Drop the process's pages of bytes ``start:start + nbytes`` (they are read again from the file if used)."""
        if nbytes <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = start - start % _PAGE
        end = min(self.size, start + nbytes)
        self.map.madvise(mmap.MADV_DONTNEED, first, end - first)


@dataclass(frozen=True, eq=False)
class MappedTensor:
    """One tensor of a mapped checkpoint file, read on use.

    Attributes:
        file: the mapped file.
        start: byte offset in the file of the storage the tensor views.
        nbytes: size of that storage in bytes.
        dtype: element type as stored.
        shape: tensor shape.
        stride: tensor strides in elements.
        offset: element offset of the tensor in its storage.
    """

    file: MappedFile
    start: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def view(self) -> torch.Tensor:
        """The tensor as a view of the mapping (no copy; pages are read when touched and stay resident)."""
        size = self.element_size()
        if self.nbytes % size:
            raise CheckpointError(f"{self.file.path}: a {self.dtype} storage of {self.nbytes} bytes is corrupt")
        storage = self.file.span(self.start, self.nbytes).view(self.dtype)
        try:
            return storage.as_strided(self.shape, self.stride, self.offset)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.file.path}: a tensor does not fit its stored data ({exc})") from exc

    def is_contiguous(self) -> bool:
        return self.stride == tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))

    def load(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new contiguous tensor holding a copy (cast to ``dtype`` when floating); the source pages are dropped.

        A contiguous tensor is copied ``CHUNK_BYTES`` of source at a time, each chunk's pages dropped before the
        next is read, so a large tensor never has its whole source resident beside its copy.
        """
        target = dtype if dtype is not None and self.dtype.is_floating_point else self.dtype
        source = self.view()  # checks the shape against the stored bytes before anything is allocated
        out = torch.empty(self.shape, dtype=target)
        if not self.is_contiguous() or source.numel() == 0:
            out.copy_(source)
            self.file.release(self.start, self.nbytes)
            return out
        flat_in, flat_out, size = source.reshape(-1), out.view(-1), self.element_size()
        step = max(1, CHUNK_BYTES // size)
        for first in range(0, flat_in.numel(), step):
            last = min(flat_in.numel(), first + step)
            flat_out[first:last].copy_(flat_in[first:last])
            self.file.release(self.start + (self.offset + first) * size, (last - first) * size)
        return out


def materialize(value: torch.Tensor | MappedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor from a loaded tensor or a handle, floating values cast to ``dtype`` (None keeps the stored dtype)."""
    if isinstance(value, MappedTensor):
        return value.load(dtype)
    return value.to(dtype) if dtype is not None and value.is_floating_point() else value


def as_tensor(value: torch.Tensor | MappedTensor) -> torch.Tensor:
    """A tensor for a loaded tensor or a handle, without copying (a handle gives a view of its mapping)."""
    return value.view() if isinstance(value, MappedTensor) else value


def open_safetensors(path: str | Path) -> tuple[dict[str, MappedTensor], dict[str, str]]:
    """Handles for every tensor of a safetensors file (header read, no tensor data), and its metadata."""
    path = Path(path)
    try:
        file = MappedFile(path)
        length = int.from_bytes(file.map[:8], "little") if file.size >= 8 else -1
        if not 0 < length <= file.size - 8:
            raise ValueError("the header length is out of range")
        header = json.loads(bytes(file.map[8 : 8 + length]))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, CheckpointError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _safetensors_entry(file, path, name, entry, 8 + length)
    return tensors, metadata if isinstance(metadata, dict) else {}


def _safetensors_entry(file: MappedFile, path: Path, name: str, entry: Any, base: int) -> MappedTensor:
    try:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file (bad header entry for {name!r})") from exc
    numel = math.prod(shape)
    size = torch.empty((), dtype=dtype).element_size()
    if end - begin != numel * size or begin < 0 or base + end > file.size:
        raise CheckpointError(f"{path}: not a readable safetensors file ({name!r} does not match its data range)")
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return MappedTensor(file, base + begin, end - begin, dtype, shape, stride)


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor | MappedTensor],
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` (floating ones cast to ``dtype`` when given) as a safetensors file, one tensor at a time:
    a handle is loaded, written and freed before the next, so memory holds one tensor beyond the caller's."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, value in tensors.items():
        stored = dtype if dtype is not None and value.is_floating_point() else value.dtype
        if stored not in _SAFETENSORS_CODES:
            raise CheckpointError(f"{name}: dtype {stored} cannot be written to safetensors")
        nbytes = math.prod(value.shape) * torch.empty((), dtype=stored).element_size()
        code, shape = _SAFETENSORS_CODES[stored], list(value.shape)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for value in tensors.values():
            tensor = materialize(value, dtype).detach().cpu().contiguous()
            if tensor.numel():
                fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
