"""Reading official fairseq ``.pt`` checkpoints (and ``.safetensors`` files) without running pickled code.

An official checkpoint is a ``torch.save`` archive of a dict (``args``, ``cfg``, ``model``, ...). It is read with
``torch.load(weights_only=True, mmap=True)`` first. If that refuses a global (real fairseq files may keep
``argparse.Namespace``, omegaconf containers, enum members or paths in ``cfg`` / ``args``), it is read again with a
restricted unpickler (:mod:`onepeace.checkpoints.restricted`): tensors are rebuilt, configuration objects become
inert stand-ins converted to plain data, and any other global is refused before it can run. Every failure raises
:class:`~onepeace.errors.CheckpointError` naming the file (a missing file included).
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from onepeace.checkpoints.restricted import restricted_pickle_module, to_plain
from onepeace.errors import CheckpointError

_MAX_LISTED = 20


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


def _restricted_load(path: Path, is_zip: bool) -> Any:
    if is_zip:
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("constants.pkl") for name in archive.namelist()):
                raise CheckpointError(f"refusing to load {path}: it is a TorchScript archive, not a checkpoint")
    try:
        return torch.load(
            str(path), map_location="cpu", weights_only=False, mmap=is_zip, pickle_module=restricted_pickle_module()
        )
    except CheckpointError as exc:
        raise CheckpointError(f"refusing to load {path}: {exc}") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: the file is corrupt or truncated ({exc})") from exc


def _torch_load(path: Path, kind: str) -> Any:
    """``torch.load`` the file safely: weights-only first, then the restricted unpickler."""
    is_zip = kind == "zip"
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read {path}: the zip archive is truncated (no central directory)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError:
        pass  # a global weights_only does not allow, or damaged data: the restricted reader decides
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {exc}") from exc
    return _restricted_load(path, is_zip)


def _state_dict_from(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a fairseq checkpoint dict")
    if "model" not in payload:
        keys = [str(k) for k in payload.keys()]
        raise CheckpointError(f"{path} has no 'model' entry; top-level keys found: {_listing(keys) or 'none'}")
    model = payload["model"]
    if not isinstance(model, Mapping):
        raise CheckpointError(f"the 'model' entry of {path} is a {type(model).__name__}, not a state dict")
    bad = [str(k) for k, v in model.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"the 'model' entry of {path} is not a dict of tensors; offending keys: {_listing(bad)}")
    return dict(model)


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an official fairseq checkpoint without importing fairseq or executing pickled code.

    Returns ``(state_dict, cfg)``: the ``model`` entry (tensor name -> tensor, memory-mapped for zip archives) and
    the ``cfg`` entry converted to plain dicts / lists / scalars (``{}`` when absent or ``None``).
    Raises :class:`CheckpointError` naming the file when it is missing, truncated, not a checkpoint, a safetensors
    file, has no ``model`` dict of tensors, or references a global outside the allowlists.
    """
    path = Path(path)
    kind = _check_file(path)
    if kind == "safetensors":
        raise CheckpointError(
            f"{path} is a safetensors file, not a fairseq .pt checkpoint; read it with load_state_dict_file"
        )
    if kind in ("empty", "unknown"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({kind} content, not a zip archive or pickle)")
    payload = _torch_load(path, kind)
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
