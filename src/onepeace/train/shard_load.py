"""Loading starting weights shard by shard: each rank reads from a safetensors file only the rows it holds.

:func:`open_safetensors` maps names to :class:`LazyTensor` handles (shape and dtype from the file header, nothing
read); :func:`load_local` copies into a module (sharded by FSDP2, or whole) only this rank's part of each tensor,
read through ``safe_open(...).get_slice`` from the memory-mapped file. Plain tensors (an official ``.pt`` has to
be unpickled whole) are accepted too and sliced in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn


class _Files:
    """Open safetensors handles, one per file."""

    def __init__(self) -> None:
        self.handles: dict[str, object] = {}

    def get(self, path: str):
        from safetensors import safe_open

        if path not in self.handles:
            self.handles[path] = safe_open(path, framework="pt")
        return self.handles[path]


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of a safetensors file, read on demand (whole or a range of rows).

    Attributes:
        files: the shared handle cache.
        path: the file.
        name: the tensor's name in the file.
        shape: its shape.
        as_float: convert to float32 when read (``.float()``, as the eager readers do).
    """

    files: _Files
    path: str
    name: str
    shape: tuple[int, ...]
    as_float: bool = False

    def float(self) -> LazyTensor:
        return replace(self, as_float=True)

    def _cast(self, t: Tensor) -> Tensor:
        return t.float() if self.as_float else t

    def full(self) -> Tensor:
        """The whole tensor."""
        return self._cast(self.files.get(self.path).get_tensor(self.name))

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of dim 0 (read from the file without reading the rest)."""
        if not self.shape:
            return self.full()
        return self._cast(self.files.get(self.path).get_slice(self.name)[start:stop])


def open_safetensors(
    path: str | Path, rename: Callable[[str], str] = str, eager: Callable[[str], bool] = lambda key: False
) -> dict[str, Tensor | LazyTensor]:
    """Names (after ``rename``) to lazy handles of a safetensors file; names for which ``eager(name)`` holds are
    read at once (small tables that are transformed before loading)."""
    from safetensors import SafetensorError

    from onepeace.errors import CheckpointError

    files = _Files()
    try:
        handle = files.get(str(path))
        names = list(handle.keys())
        out: dict[str, Tensor | LazyTensor] = {}
        for name in names:
            key = rename(name)
            lazy = LazyTensor(files, str(path), name, tuple(handle.get_slice(name).get_shape()))
            out[key] = lazy.full() if eager(key) else lazy
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return out


def local_rows(rows: int, like: Tensor) -> tuple[int, int]:
    """The rows of dim 0 this rank holds of a module tensor ``like`` with ``rows`` rows (all of them unless
    ``like`` is an FSDP2 ``DTensor``, sharded ``Shard(0)`` with ``torch.chunk`` semantics)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(like, DTensor):
        return 0, rows
    if len(like.placements) != 1 or like.placements[0] != Shard(0):
        raise ValueError(f"only 1-D meshes sharded on dim 0 are supported, got {like.placements}")
    rank, world = like.device_mesh.get_local_rank(), like.device_mesh.size()
    size = -(-rows // world)
    start = min(rows, rank * size)
    return start, min(rows, start + size)


def local_value(value: Tensor | LazyTensor, like: Tensor) -> Tensor:
    """This rank's part of ``value`` (a full tensor or a lazy handle) for the module tensor ``like``."""
    if not value.shape:
        return value.full() if isinstance(value, LazyTensor) else value
    start, stop = local_rows(value.shape[0], like)
    return value.rows(start, stop) if isinstance(value, LazyTensor) else value[start:stop]


def module_tensor(module: nn.Module, name: str) -> Tensor:
    """The parameter or buffer ``name`` of ``module``."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


def load_local(module: nn.Module, weights: Mapping[str, Tensor | LazyTensor]) -> None:
    """Copy into ``module`` this rank's part of every tensor of ``weights`` (names must be module tensors of the
    same full shape; check keys first, as the callers do)."""
    from onepeace.errors import CheckpointError

    with torch.no_grad():
        for name, value in weights.items():
            target = module_tensor(module, name)
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
            local = target.to_local() if hasattr(target, "to_local") else target
            local.copy_(local_value(value, target))
