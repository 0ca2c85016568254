"""Counting host synchronisations: operations whose result the host must wait for on an accelerator.

On CUDA these are the calls that copy a value to the host (``item``, ``bool``, ``float``, ``int``, ``tolist``) and
the operations whose output shape depends on tensor values (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``repeat_interleave`` with a tensor of counts). They are counted here on CPU through a dispatch mode,
each attributed to the innermost ``onepeace`` frame that issued it, so a test can name every one it allows.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR = {"_local_scalar_dense", "item"}
_SHAPE = {"nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive"}


def _caller() -> str:
    """``module.function`` of the innermost frame inside the ``onepeace`` package (``?`` if none)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("onepeace."):
            return f"{module.removeprefix('onepeace.')}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostSyncCounter(TorchDispatchMode):
    """Counts host syncs by ``(kind, caller)`` while active; ``kind`` is ``"scalar"``, ``"shape"`` or ``"index"``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func._overloadpacket.__name__
        if name in _SCALAR:
            self.counts["scalar", _caller()] += 1
        elif name in _SHAPE or (name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and len(args) == 1):
            self.counts["shape", _caller()] += 1
        elif name in ("index", "index_put", "index_put_") and _has_bool_index(args):
            self.counts["index", _caller()] += 1
        return func(*args, **(kwargs or {}))


def count_host_syncs(fn: Callable[[], Any]) -> Counter[tuple[str, str]]:
    """Run ``fn()`` and return its host syncs by ``(kind, caller)``; ``tolist`` calls count as ``scalar``."""
    counter = HostSyncCounter()
    original = torch.Tensor.tolist

    def tolist(self: torch.Tensor):  # noqa: ANN202
        counter.counts["scalar", _caller()] += 1
        with torch._C.DisableTorchFunctionSubclass():
            return original(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    try:
        with counter:
            fn()
    finally:
        torch.Tensor.tolist = original  # type: ignore[method-assign]
    return counter.counts
