"""Input preprocessing: text (:mod:`.tokenizer`), images (:mod:`.image`) and audio (:mod:`.audio`).

The submodules are imported on demand so that importing :mod:`onepeace.data` stays cheap. The tokenizer, image and
audio modules import torch only inside the functions that return tensors, so their numpy functions also serve the
torch-free ONNX runtime (:mod:`onepeace.onnx`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def is_tensor(x: Any) -> bool:
    """True when ``x`` is a ``torch.Tensor``, without importing torch (no tensor exists before torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def as_list(items: Any) -> list[Any]:
    """A single input (a string, path, bytes, PIL image or 1-D array or tensor) becomes a one-item list."""
    if isinstance(items, (str, bytes, bytearray, os.PathLike)):
        return [items]
    if hasattr(items, "shape") and len(items.shape) <= 1:
        return [items]
    if type(items).__module__.startswith("PIL."):
        return [items]
    return list(items)


def batched(items: list[Any], size: int, encode: Callable[[list[Any]], T], concat: Callable[[list[T]], T]) -> T:
    """``encode`` over consecutive chunks of ``size`` items, joined by ``concat``: ``[len(items), D]``."""
    from onepeace.errors import InputError

    if not items:
        raise InputError("nothing to embed: the input list is empty")
    return concat([encode(items[i : i + size]) for i in range(0, len(items), size)])
