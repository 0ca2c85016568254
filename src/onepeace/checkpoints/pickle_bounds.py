"""Size bounds for the restricted unpickler of :mod:`.pickle_io`: a pickle cannot allocate more than its file holds.

Every allowlisted constructor that can allocate memory in proportion to an argument (``bytearray(n)``,
``bytes(n)``, ``torch.Tensor(n)``, ``numpy.ndarray(shape)``, containers built from a sequence, ``str`` and
``_codecs.encode``) is resolved to a :class:`Bounded` stand-in that charges the size of its result to a
:class:`Budget` before building it. One budget serves every pickle of a file (a legacy ``.pt`` holds several), and
its limit is the file's own size (at least :data:`MIN_BUDGET`): real checkpoints build such objects from data
stored in the pickle, so their sizes add up to less than the file. Tensor storages are checked separately
(:func:`storage_bytes`): a legacy file's storages must fit in the file, and a zip archive's storage member must hold
exactly the bytes the pickle declares, so a deflated member cannot expand past its declared tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from onepeace.errors import CheckpointError

#: The smallest byte budget (a tiny file still may build a few small containers).
MIN_BUDGET = 1 << 20

#: Size bound of an archive member that is not tensor data (``data.pkl``, ``version``, ...), decompressed.
MAX_PICKLE_BYTES = 256 << 20

_POINTER = 8
_TEXT_ENCODINGS = frozenset({"latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii"})


class Budget:
    """Bytes a file's pickles may still allocate through bounded constructors."""

    def __init__(self, limit: int) -> None:
        self.limit, self.spent = max(int(limit), MIN_BUDGET), 0

    def charge(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` for ``what``; raise :class:`CheckpointError` once the total passes the limit."""
        if nbytes < 0:
            raise CheckpointError(f"its pickle calls {what} with a negative size")
        self.spent += nbytes
        if self.spent > self.limit:
            raise CheckpointError(
                f"its pickle asks {what} for {nbytes:,} bytes, more than the file can hold "
                f"({self.limit:,} bytes for all such objects)"
            )


class Bounded:
    """An allowlisted constructor that charges its result's size to a :class:`Budget` before running.

    It compares equal to the real callable (``new_type in (torch.Tensor, ...)`` keeps working); :attr:`real` is the
    callable itself.
    """

    def __init__(self, real: Any, name: str, size_of: Callable[..., int], budget: Budget) -> None:
        self.real, self.name, self._size_of, self._budget = real, name, size_of, budget

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._budget.charge(self._size_of(*args, **kwargs), self.name)
        return self.real(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return self.real == (other.real if isinstance(other, Bounded) else other)

    def __hash__(self) -> int:
        return hash(self.real)

    def __repr__(self) -> str:
        return f"<bounded {self.name}>"


def unwrap(value: Any) -> Any:
    """The real callable of a :class:`Bounded` (anything else unchanged)."""
    return value.real if isinstance(value, Bounded) else value


def _length(value: Any, what: str) -> int:
    try:
        return len(value)
    except TypeError:
        raise CheckpointError(f"its pickle calls {what} on a {type(value).__name__}, which is not allowed") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bytes_size(source: Any = b"", *_: Any, **__: Any) -> int:
    return source if _is_int(source) else _length(source, "builtins.bytes")


def _items_size(*args: Any, **kwargs: Any) -> int:
    first = args[0] if args else ()
    return _POINTER * (_length(first, "a container constructor") + len(kwargs))


def _deque_size(iterable: Any = (), *_: Any, **__: Any) -> int:
    return _POINTER * _length(iterable, "collections.deque")


def _defaultdict_size(*args: Any, **kwargs: Any) -> int:
    return _items_size(*args[1:], **kwargs)


def _str_size(value: Any = "", *rest: Any, **kwargs: Any) -> int:
    if isinstance(value, (bytes, bytearray)):
        return len(value) * (1 if rest or kwargs else 4) + 3
    if isinstance(value, str) or value is None or isinstance(value, (bool, int, float, complex)):
        return len(value) if isinstance(value, str) else 0
    raise CheckpointError(f"its pickle calls builtins.str on a {type(value).__name__}, which is not allowed")


def _encode_size(value: Any, encoding: str = "utf-8", *_: Any, **__: Any) -> int:
    if not isinstance(value, str) or str(encoding).lower() not in _TEXT_ENCODINGS:
        raise CheckpointError(f"its pickle calls _codecs.encode with {str(encoding)[:20]!r}, which is not allowed")
    return len(value) * 4


def _shape_bytes(shape: Any, itemsize: int, what: str) -> int:
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    if not all(_is_int(d) for d in dims):
        raise CheckpointError(f"its pickle calls {what} with a shape that is not a list of integers")
    if any(d < 0 for d in dims):
        raise CheckpointError(f"its pickle calls {what} with a negative size")
    return math.prod(dims) * itemsize


def _tensor_size(*args: Any, **kwargs: Any) -> int:
    if args and all(_is_int(a) for a in args):
        return _shape_bytes(args, 8, "torch.Tensor")
    if len(args) == 1 and not kwargs and isinstance(args[0], (tuple, list)):
        return _POINTER * len(args[0])
    if not args and not kwargs:
        return 0
    raise CheckpointError("its pickle calls torch.Tensor with arguments that are not allowed")


def _itemsize(dtype: Any) -> int:
    import numpy as np

    try:
        return max(np.dtype(dtype).itemsize, 1)
    except TypeError:
        raise CheckpointError(f"its pickle names a numpy dtype {str(dtype)[:40]!r}, which is not allowed") from None


def _ndarray_size(shape: Any = (), dtype: Any = float, *_: Any, **__: Any) -> int:
    return _shape_bytes(shape, _itemsize(dtype), "numpy.ndarray")


def _reconstruct_size(subtype: Any = None, shape: Any = (), dtype: Any = b"b", *_: Any, **__: Any) -> int:
    return _shape_bytes(shape, _itemsize(dtype), "numpy _reconstruct")


def _size_rules() -> dict[tuple[str, str], Callable[..., int]]:
    rules: dict[tuple[str, str], Callable[..., int]] = {
        ("builtins", "bytes"): _bytes_size,
        ("builtins", "bytearray"): _bytes_size,
        ("builtins", "str"): _str_size,
        ("_codecs", "encode"): _encode_size,
        ("collections", "deque"): _deque_size,
        ("collections", "defaultdict"): _defaultdict_size,
        ("torch", "Tensor"): _tensor_size,
        ("torch", "Size"): _items_size,
        ("numpy", "ndarray"): _ndarray_size,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_size,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_size,
    }
    for name in ("list", "tuple", "set", "frozenset", "dict"):
        rules["builtins", name] = _items_size
    for name in ("OrderedDict", "Counter"):
        rules["collections", name] = _items_size
    return rules


SIZE_RULES = _size_rules()


def bounded_global(module: str, name: str, real: Any, budget: Budget) -> Any:
    """``real`` (the resolved global ``module.name``) behind its size rule, or ``real`` itself if it has none."""
    rule = SIZE_RULES.get((module, name))
    if rule is None:
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return lambda func, new_type, args, state: real(func, unwrap(new_type), args, state)
        return real
    if name == "_reconstruct":
        return Bounded(lambda subtype, *rest: real(unwrap(subtype), *rest), f"{module}.{name}", rule, budget)
    return Bounded(real, f"{module}.{name}", rule, budget)


def storage_bytes(pid: Any) -> tuple[str, int]:
    """``(key, bytes)`` a ``torch.save`` persistent id declares for a storage; :class:`CheckpointError` otherwise."""
    import torch

    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and _is_int(pid[4]) and pid[4] >= 0):
        raise CheckpointError(f"its pickle holds an unsupported persistent id {str(pid)[:60]}")
    dtype = getattr(pid[1], "dtype", None)
    size = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 8
    return str(pid[2]), pid[4] * size


def check_storage(pid: Any, budget: Budget, members: Mapping[str, int] | None) -> None:
    """Refuse a storage a file cannot hold: in a zip archive (``members``: storage key -> stored bytes) its member
    must hold exactly the declared bytes; in a legacy file the storages together must fit in the file."""
    key, nbytes = storage_bytes(pid)
    if members is None:
        budget.charge(nbytes, f"tensor storage {key!r}")
    elif members.get(key, -1) != nbytes:
        found = members.get(key)
        held = "no such member" if found is None else f"{found:,} bytes"
        raise CheckpointError(f"its pickle declares {nbytes:,} bytes for storage {key!r}, but the archive holds {held}")
