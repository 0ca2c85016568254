"""The memory-mapped reading of a ``torch.save`` zip archive, with the restricted unpickler of :mod:`.pickle_io`.

The archive's members are stored uncompressed, so each storage is a byte range of the file. The pickle
(``data.pkl``) is read by the restricted unpickler with tensor rebuilding replaced: a tensor becomes a
:class:`~onepeace.checkpoints.mapped.MappedTensor` naming its byte range, dtype, shape and strides; no tensor
data is read and every global outside the allowlists is refused before anything runs.
"""

from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from onepeace.checkpoints.mapped import MappedFile, MappedTensor
from onepeace.checkpoints.pickle_bounds import MAX_PICKLE_BYTES, Budget
from onepeace.checkpoints.pickle_io import _RestrictedUnpickler
from onepeace.errors import CheckpointError


class NotMappable(Exception):
    """An archive member is compressed, so its bytes cannot be viewed in place."""


#: ``torch.save`` storage classes -> element type.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


@dataclass(frozen=True)
class _StorageKind:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    start: int
    nbytes: int
    dtype: torch.dtype


class _MappedUnpickler(_RestrictedUnpickler):
    """The restricted unpickler for a zip archive's ``data.pkl``: storages become byte ranges of the mapped file
    and tensors :class:`MappedTensor` handles; nothing outside the allowlists is resolved."""

    def __init__(self, data: bytes, file: MappedFile, entries: dict[str, tuple[int, int]]) -> None:
        super().__init__(io.BytesIO(data), budget=Budget(file.size))
        self._file, self._entries = file, entries

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return self._tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *_: data
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _plain_rebuild
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageKind)):
            raise CheckpointError(f"its pickle holds an unsupported persistent id {str(pid)[:60]}")
        key = str(pid[2])
        if key not in self._entries:
            raise CheckpointError(f"its pickle names storage {key!r}, which the archive does not hold")
        start, nbytes = self._entries[key]
        return _Storage(start, nbytes, pid[1].dtype)

    def _tensor(self, storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> MappedTensor:
        if not isinstance(storage, _Storage):
            raise CheckpointError("its pickle rebuilds a tensor from something that is not a stored tensor")
        shape, strides = tuple(int(d) for d in size), tuple(int(d) for d in stride)
        return MappedTensor(self._file, storage.start, storage.nbytes, storage.dtype, shape, strides, int(offset))


def _plain_rebuild(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise CheckpointError(f"its pickle rebuilds a tensor subclass {new_type!r}, which is not allowed")
    return func(*args)


def mapped_load(path: Path) -> Any:
    """The object of a ``torch.save`` zip archive with tensors as :class:`MappedTensor` handles."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        pickles = [i.filename for i in infos if i.filename.endswith("data.pkl") and i.filename.count("/") <= 1]
        if any(i.filename.endswith("constants.pkl") for i in infos):
            raise CheckpointError("it is a TorchScript archive, not a checkpoint")
        if len(pickles) != 1:
            raise ValueError(f"expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0].removesuffix("data.pkl")
        names = {i.filename for i in infos}
        if prefix + "byteorder" in names and archive.read(prefix + "byteorder").strip() != b"little":
            raise ValueError("its tensors are stored big-endian")
        if archive.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"its {pickles[0]} expands to more than {MAX_PICKLE_BYTES:,} bytes")
        data = archive.read(pickles[0])
        file = MappedFile(path)
        stored = [i for i in infos if i.filename.startswith(prefix + "data/")]
        entries = {i.filename.removeprefix(prefix + "data/"): _entry_span(file, i) for i in stored}
    return _MappedUnpickler(data, file, entries).load()


def _entry_span(file: MappedFile, info: zipfile.ZipInfo) -> tuple[int, int]:
    """Byte offset and size of an uncompressed archive member's data in the file."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise NotMappable(info.filename)
    header = bytes(file.map[info.header_offset : info.header_offset + 30])
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"archive member {info.filename} has no local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size
