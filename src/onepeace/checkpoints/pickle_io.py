"""Reading official fairseq ``.pt`` checkpoints (and ``.safetensors`` files) without running pickled code.

An official checkpoint is a ``torch.save`` archive of a dict (``args``, ``cfg``, ``model``, ...). It is read
with a restricted unpickler (real fairseq files may keep ``argparse.Namespace``, omegaconf containers, enum members
or paths in ``cfg`` / ``args``): tensors are rebuilt, configuration objects become inert stand-ins converted to
plain data, any other global is refused before it can run, and what the pickle may allocate is bounded by the
file's size (:mod:`.pickle_bounds`). Every failure raises
:class:`~onepeace.errors.CheckpointError` naming the file (a missing file included).

:func:`open_official_checkpoint` reads a zip archive's pickle with the restricted unpickler alone and gives each
tensor as a :class:`~onepeace.checkpoints.mapped.MappedTensor` (where its bytes lie in the mapped file), so a
loader can convert the weights one tensor at a time.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import json
import pickle
import struct
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import torch

from onepeace.checkpoints.mapped import MappedTensor
from onepeace.checkpoints.pickle_bounds import MAX_PICKLE_BYTES, Bounded, Budget, bounded_global, check_storage
from onepeace.errors import CheckpointError

_MAX_LISTED = 20

# Globals resolved to the real object: tensor rebuilding and plain data types, nothing that runs other code.
_REAL_GLOBALS: dict[str, frozenset[str]] = {
    module: frozenset(names.split())
    for module, names in {
        "torch._utils": "_rebuild_tensor _rebuild_tensor_v2 _rebuild_parameter _rebuild_parameter_with_state",
        "torch._tensor": "_rebuild_from_type_v2",
        "torch": "Size Tensor device",
        "torch.nn.parameter": "Parameter",
        "collections": "OrderedDict defaultdict deque Counter",
        "builtins": "set frozenset complex slice bytearray bytes object list dict tuple int float str bool",
        "_codecs": "encode",
        "copyreg": "_reconstructor",
        "numpy": "ndarray dtype",
        "numpy.core.multiarray": "_reconstruct scalar",
        "numpy._core.multiarray": "_reconstruct scalar",
    }.items()
}
# Modules whose objects (configuration containers, enum members, paths, type hints) become inert stand-ins.
_STAND_IN_ROOTS = frozenset(
    {"argparse", "omegaconf", "enum", "pathlib", "fairseq", "one_peace", "typing", "collections"}
)


class _StandIn:
    """Inert placeholder for an object of an allowlisted configuration module; it only records its data."""

    _origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        obj = object.__new__(cls)
        obj.__dict__.update(_args=args, _kwargs=kwargs, _state=None, _items={}, _list=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._items[key] = value

    def append(self, value: Any) -> None:
        self._list.append(value)

    def extend(self, values: Any) -> None:
        self._list.extend(values)

    def __repr__(self) -> str:
        return f"<stand-in for {self._origin}>"


def _type_of(*args: Any) -> type:
    if len(args) != 1:
        raise CheckpointError("its pickle calls builtins.type to create a class, which could run code")
    return type(args[0])


def _subscript(target: Any, item: Any) -> Any:
    stand_in = target if isinstance(target, type) else type(target)
    if not issubclass(stand_in, _StandIn):
        raise CheckpointError(f"its pickle calls operator.getitem on a {type(target).__name__}, which is not allowed")
    return stand_in(item)


_BASE_PERSISTENT_LOAD = pickle.Unpickler.__dict__["persistent_load"]


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allowlisted globals and refuses every other one before anything runs.

    Allocating constructors are bounded by a :class:`~.pickle_bounds.Budget` (the file's size), and a storage
    loader torch installs (``persistent_load``) first checks the storage's declared size (:func:`check_storage`).
    """

    _shared_budget: Budget | None = None
    _members: dict[str, int] | None = None

    def __init__(self, *args: Any, budget: Budget | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stand_ins: dict[str, type] = {}
        self._budget = budget or self._shared_budget or Budget(0)

    @property
    def persistent_load(self) -> Any:
        return _BASE_PERSISTENT_LOAD.__get__(self)

    @persistent_load.setter
    def persistent_load(self, load: Any) -> None:
        def checked(pid: Any) -> Any:
            check_storage(pid, self._budget, self._members)
            return load(pid)

        _BASE_PERSISTENT_LOAD.__set__(self, checked)

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles may use Python 2 names (__builtin__, commands, ...): map them as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if name in _REAL_GLOBALS.get(module, ()):
            return bounded_global(module, name, getattr(importlib.import_module(module), name), self._budget)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("builtins", "type"):
            return _type_of
        if (module, name) == ("operator", "getitem"):
            return _subscript
        if module.split(".")[0] in _STAND_IN_ROOTS:
            origin = f"{module}.{name}"
            if origin not in self._stand_ins:
                self._stand_ins[origin] = type(name, (_StandIn,), {"_origin": origin, "__module__": module})
            return self._stand_ins[origin]
        raise CheckpointError(f"its pickle references {module}.{name}, which could run code")


def _restricted_pickle_module(path: Path, members: dict[str, int] | None) -> types.ModuleType:
    """A ``pickle``-like module for ``torch.load(pickle_module=...)`` of one file, built on the restricted unpickler:
    all its pickles share one byte budget (the file's size); ``members`` (storage key -> stored bytes of a zip
    archive, None for a legacy file) is what each declared storage is checked against."""
    attrs = {"_shared_budget": Budget(path.stat().st_size), "_members": members}
    unpickler = type("Unpickler", (_RestrictedUnpickler,), attrs)
    module = types.ModuleType("onepeace_restricted_pickle")
    module.Unpickler = unpickler
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    return module


def _archive_members(path: Path) -> dict[str, int]:
    """Storage key -> declared (decompressed) size of a ``torch.save`` zip archive's tensor members; any other
    member bigger than :data:`MAX_PICKLE_BYTES` decompressed is refused (torch would read it whole)."""
    members = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[1] == "data":
                members[parts[2]] = info.file_size
            elif info.file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(
                    f"archive member {info.filename} expands to {info.file_size:,} bytes (at most "
                    f"{MAX_PICKLE_BYTES:,} allowed)"
                )
    return members


def _key(key: Any) -> Any:
    return key if isinstance(key, (str, int, float, bool, type(None))) else repr(key)


def _plain_stand_in(obj: _StandIn, active: set[int]) -> Any:
    state, args = obj._state, obj._args
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        state = {**(state[0] or {}), **state[1]}
    if obj._origin.startswith("omegaconf.") and isinstance(state, dict):
        if "_content" in state:
            return to_plain(state["_content"], active)
        if "_val" in state:
            return to_plain(state["_val"], active)
    if obj._origin.startswith("pathlib.") and args and all(isinstance(a, str) for a in args):
        return str(PurePath(*args))
    if isinstance(state, dict):
        return {str(k): to_plain(v, active) for k, v in state.items()}
    if obj._items:
        return {_key(to_plain(k, active)): to_plain(v, active) for k, v in obj._items.items()}
    if obj._list:
        return [to_plain(v, active) for v in obj._list]
    if len(args) == 1:
        return to_plain(args[0], active)
    return [to_plain(a, active) for a in args] if args else {}


def to_plain(obj: Any, active: set[int] | None = None) -> Any:
    """Turn loaded configuration data (stand-ins included) into plain dicts, lists and scalars."""
    active = set() if active is None else active
    if obj is None or isinstance(obj, (str, bytes, bool, int, float, complex, torch.Tensor)):
        return obj
    if isinstance(obj, type):
        return obj._origin if issubclass(obj, _StandIn) else obj.__name__
    if isinstance(obj, Bounded):
        return getattr(obj.real, "__name__", obj.name)
    if id(obj) in active:
        return None  # reference cycle
    active.add(id(obj))
    try:
        if isinstance(obj, _StandIn):
            return _plain_stand_in(obj, active)
        if isinstance(obj, Mapping):
            return {_key(to_plain(k, active)): to_plain(v, active) for k, v in obj.items()}
        if isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            items = [to_plain(v, active) for v in obj]
            return tuple(items) if isinstance(obj, tuple) else items
        return obj
    finally:
        active.discard(id(obj))


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def _sniff(path: Path) -> str:
    """Container kind from the first bytes: ``zip``, ``pickle``, ``safetensors``, ``empty`` or ``unknown``."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    size = path.stat().st_size
    if not head:
        return "empty"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    return "unknown"


def _check_file(path: Path) -> str:
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    return _sniff(path)


def _restricted_load(path: Path, is_zip: bool, mapped: bool) -> Any:
    if is_zip:
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("constants.pkl") for name in archive.namelist()):
                raise CheckpointError(f"refusing to load {path}: it is a TorchScript archive, not a checkpoint")
    try:
        members = _archive_members(path) if is_zip else None
        return torch.load(
            str(path),
            map_location="cpu",
            weights_only=False,
            mmap=mapped,
            pickle_module=_restricted_pickle_module(path, members),
        )
    except CheckpointError as exc:
        raise CheckpointError(f"refusing to load {path}: {exc}") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: the file is corrupt or truncated ({exc})") from exc


def _torch_load(path: Path, kind: str) -> Any:
    """``torch.load`` the file with the restricted, size-bounded unpickler (torch's own weights-only unpickler
    allows ``bytearray(n)`` of any size, so it is not used on a file from outside)."""
    is_zip = kind == "zip"
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read {path}: the zip archive is truncated (no central directory)")
    mapped = is_zip and _all_stored(path)  # torch maps compressed members as if stored: read those whole
    return _restricted_load(path, is_zip, mapped)


def _all_stored(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


def _state_dict_from(payload: Any, path: Path) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a fairseq checkpoint dict")
    if "model" not in payload:
        keys = [str(k) for k in payload.keys()]
        raise CheckpointError(f"{path} has no 'model' entry; top-level keys found: {_listing(keys) or 'none'}")
    model = payload["model"]
    if not isinstance(model, Mapping):
        raise CheckpointError(f"the 'model' entry of {path} is a {type(model).__name__}, not a state dict")
    bad = [str(k) for k, v in model.items() if not (isinstance(k, str) and isinstance(v, (torch.Tensor, MappedTensor)))]
    if bad:
        raise CheckpointError(f"the 'model' entry of {path} is not a dict of tensors; offending keys: {_listing(bad)}")
    return dict(model)


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an official fairseq checkpoint without importing fairseq or executing pickled code.

    Returns ``(state_dict, cfg)``: the ``model`` entry (tensor name -> tensor, memory-mapped for zip
    archives) and the ``cfg`` entry converted to plain dicts / lists / scalars (``{}`` if absent or ``None``).
    Raises :class:`CheckpointError` naming the file when it is missing, truncated, not a checkpoint, a
    safetensors file, has no ``model`` dict of tensors, or references a global outside the allowlists.
    """
    path = Path(path)
    return _checkpoint_from(_torch_load(path, _checkpoint_kind(path)), path)


def open_official_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor | MappedTensor], dict]:
    """:func:`read_official_checkpoint` with the tensors of a zip archive as handles into the mapped file (nothing
    is read until a handle is loaded). A legacy (non-zip) pickle is read whole, as plain tensors."""
    path = Path(path)
    kind = _checkpoint_kind(path)
    if kind != "zip":
        return _checkpoint_from(_torch_load(path, kind), path)
    from onepeace.checkpoints.torch_zip import NotMappable, mapped_load

    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read {path}: the zip archive is truncated (no central directory)")
    try:
        payload = mapped_load(path)
    except NotMappable:  # a compressed member: read the archive whole
        payload = _torch_load(path, kind)
    except CheckpointError as exc:
        raise CheckpointError(f"refusing to load {path}: {exc}") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: the file is corrupt or truncated ({exc})") from exc
    return _checkpoint_from(payload, path)


def _checkpoint_kind(path: Path) -> str:
    kind = _check_file(path)
    if kind == "safetensors":
        raise CheckpointError(
            f"{path} is a safetensors file, not a fairseq .pt checkpoint; read it with load_state_dict_file"
        )
    if kind in ("empty", "unknown"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({kind} content, not a zip archive or pickle)")
    return kind


def _checkpoint_from(payload: Any, path: Path) -> tuple[dict[str, Any], dict]:
    state_dict = _state_dict_from(payload, path)
    cfg = to_plain(payload.get("cfg"))
    return state_dict, cfg if isinstance(cfg, dict) else {}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            state_dict = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a safetensors file: {exc}") from exc
    cfg: dict = {}
    if "cfg" in metadata:
        try:
            cfg = json.loads(metadata["cfg"])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"the 'cfg' metadata of {path} is not valid JSON: {exc}") from exc
    return state_dict, cfg if isinstance(cfg, dict) else {}


def load_state_dict_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a ``.safetensors`` file or an official ``.pt`` checkpoint (chosen by content, not by suffix).

    Returns ``(state_dict, cfg)``. For safetensors, ``cfg`` is the JSON-decoded ``cfg`` metadata entry when
    present, else ``{}``; for ``.pt`` files see :func:`read_official_checkpoint`.
    """
    path = Path(path)
    if _check_file(path) == "safetensors":
        return _read_safetensors(path)
    return read_official_checkpoint(path)
