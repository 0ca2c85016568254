"""The project's own checkpoint format: a directory with ``model.safetensors`` and ``config.json``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from onepeace.checkpoints.mapped import MappedTensor, as_tensor, open_safetensors, write_safetensors
from onepeace.config import OnePeaceConfig
from onepeace.errors import CheckpointError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "onepeace/1"


def is_native_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory holding a native checkpoint."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def save_native(
    model: nn.Module | Mapping[str, torch.Tensor | MappedTensor],
    cfg: OnePeaceConfig,
    out_dir: str | Path,
    metadata: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a model's parameters (or a state dict of tensors or mapped handles; no buffers) and config to
    ``out_dir``, floating tensors cast to ``dtype`` when given.

    Tensors are written one at a time (a handle is read, written and freed before the next); each file is written
    atomically.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model if isinstance(model, Mapping) else model.state_dict()
    info = {"format": FORMAT, "config": cfg.to_dict(), **(metadata or {})}
    _atomic(out / WEIGHTS, lambda tmp: write_safetensors(tmp, state, dtype, metadata={"format": FORMAT}))
    _atomic(out / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return out


def _atomic(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_native_config(path: str | Path) -> OnePeaceConfig:
    """The model config of a native checkpoint directory, checked."""
    root = Path(path)
    try:
        info = json.loads((root / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{root / CONFIG}: cannot read the model config ({exc})") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT or "config" not in info:
        raise CheckpointError(f"{root / CONFIG} is not a onepeace model config (expected format {FORMAT!r})")
    try:
        return OnePeaceConfig.from_dict(info["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{root / CONFIG}: {exc}") from exc


def read_native(path: str | Path) -> tuple[OnePeaceConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a native checkpoint directory, viewing the memory-mapped file (no pickle involved)."""
    cfg, tensors = open_native(path)
    return cfg, {k: as_tensor(v) for k, v in tensors.items()}


def open_native(path: str | Path) -> tuple[OnePeaceConfig, dict[str, MappedTensor]]:
    """Config and :class:`MappedTensor` handles (header read, no tensor data) of a native checkpoint directory."""
    root = Path(path)
    cfg = read_native_config(root)
    weights = root / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{root} has no {WEIGHTS}")
    return cfg, open_safetensors(weights)[0]
