"""Training checkpoints for exact resume: one directory per step, complete or ignored.

Layout of a run directory trained by one process::

    step_00001000/model.safetensors   full state dict of the training module (backbone + decoder)
    step_00001000/trainer.pt          optimizer, schedule, RNG states, data position, step, extra (plain types only)
    step_00001000/config.yaml         the resolved recipe
    step_00001000/COMPLETE            the marker, written last
    latest                            name of the newest complete step directory

Runs of several processes write sharded step directories instead (:mod:`onepeace.train.sharded`): ``state/``
(``torch.distributed.checkpoint``: each rank its shard of the model and optimizer), ``trainer.pt`` (schedule, data
position, step, extra), ``config.yaml`` and ``COMPLETE``. In both layouts a step directory counts only once its
``COMPLETE`` marker exists: the marker is written after every file of every rank is on disk.

A single-process step directory is filled under a temporary name in the same parent, synced, then renamed; ``latest``
is replaced atomically afterwards. A crash at any point leaves the previous checkpoint and pointer intact; temporary
directories and step directories without a marker are ignored by :func:`latest_checkpoint` and removed by the next
save. ``trainer.pt`` holds tensors and plain Python values only, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from onepeace.config import OnePeaceConfig
from onepeace.errors import CheckpointError

WEIGHTS = "model.safetensors"
TRAINER = "trainer.pt"
CONFIG = "config.yaml"
MARKER = "COMPLETE"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and (if present) CUDA generator states as tensors and plain values."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- saving
def _check_plain(obj: Any, where: str) -> None:
    """Raise ``TypeError`` for values a ``weights_only`` load would refuse."""
    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(value, f"{where}.{key}")
        return
    if isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__name__} cannot go into {TRAINER}; use tensors and plain values")


def _weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors of a state dict; tensors sharing memory are copied apart."""
    out, seen = {}, set()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_marker(step_dir: Path, step: int, layout: str, world_size: int = 1) -> None:
    """Write ``COMPLETE`` into ``step_dir`` (call it once every other file of the checkpoint is synced)."""
    marker = step_dir / MARKER
    with marker.open("w") as handle:
        handle.write(json.dumps({"step": int(step), "layout": layout, "world_size": int(world_size)}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(step_dir)


def write_trainer_files(step_dir: Path, trainer: dict[str, Any], config_yaml: str) -> None:
    """Write and sync ``trainer.pt`` (plain values and tensors only) and ``config.yaml`` into ``step_dir``."""
    _check_plain(trainer, "trainer")
    torch.save(trainer, step_dir / TRAINER)
    (step_dir / CONFIG).write_text(config_yaml)
    for path in (step_dir / TRAINER, step_dir / CONFIG):
        _fsync(path)


def publish_pointer(run_dir: Path, step_dir: Path, keep_last: int | None) -> None:
    """After a complete save: sync the run directory, point ``latest`` at ``step_dir``, prune old checkpoints."""
    _fsync(run_dir)
    _write_pointer(run_dir, step_dir.name)
    prune_checkpoints(run_dir, keep_last)


def _publish(tmp: Path, final: Path) -> None:
    """Move the filled temporary directory to its final name (an old directory of that name is replaced)."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=_TMP_PREFIX))
        os.rename(final, trash / final.name)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _write_pointer(run_dir: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=_TMP_PREFIX)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, run_dir / LATEST)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync(run_dir)


def save_training_state(
    run_dir: str | Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    rng_states: dict[str, Any] | None = None,
    data_position: Any = None,
    config_yaml: str = "",
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/step_{step:08d}`` atomically, point ``latest`` at it, and keep the newest ``keep_last``.

    ``rng_states`` defaults to :func:`capture_rng_state` now; ``data_position`` and ``extra`` must be tensors or plain
    values. Call on one rank only, with ``module.state_dict()`` holding full tensors, or pass full ``model_state`` /
    ``optimizer_state`` gathered beforehand (sharded training). Returns the step directory.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    trainer = {
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "schedule": schedule.state_dict() if schedule is not None else None,
        "rng": capture_rng_state() if rng_states is None else rng_states,
        "data_position": data_position,
        "extra": extra or {},
    }
    _check_plain(trainer, "trainer")
    tmp = Path(tempfile.mkdtemp(dir=run, prefix=_TMP_PREFIX))
    final = run / step_dir_name(step)
    try:
        weights = _weights(module.state_dict() if model_state is None else model_state)
        save_file(weights, str(tmp / WEIGHTS), metadata={"step": str(step)})
        _fsync(tmp / WEIGHTS)
        write_trainer_files(tmp, trainer, config_yaml)
        write_marker(tmp, step, "single")
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_pointer(run, final, keep_last)
    return final


def _step_dirs(run: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in run.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def prune_checkpoints(run_dir: str | Path, keep_last: int | None) -> list[Path]:
    """Remove leftover temporary entries and all but the newest ``keep_last`` step directories; returns the removed."""
    run = Path(run_dir)
    removed = []
    for path in run.glob(_TMP_PREFIX + "*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    latest = latest_checkpoint(run)
    for _, path in _step_dirs(run):
        if not is_checkpoint(path) and path != latest:  # a save that never finished
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    complete = [p for _, p in _step_dirs(run) if is_checkpoint(p)]
    if keep_last is not None and keep_last >= 1:
        for path in complete[:-keep_last]:
            if path != latest:
                shutil.rmtree(path)
                removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------- loading
def is_checkpoint(path: str | Path) -> bool:
    """True for a complete step directory (of either layout): one whose ``COMPLETE`` marker exists.

    Single-file step directories written before the marker existed (``model.safetensors`` + ``trainer.pt``, no
    ``state/``) count too: that layout is filled under a temporary name and renamed, so it only ever appears whole.
    A sharded directory without its marker never counts.
    """
    path = Path(path)
    if not (path.is_dir() and (path / TRAINER).is_file()):
        return False
    return (path / MARKER).is_file() or (not is_sharded(path) and (path / WEIGHTS).is_file())


def is_sharded(step_dir: str | Path) -> bool:
    """True when ``step_dir`` holds a sharded (``torch.distributed.checkpoint``) state, not ``model.safetensors``."""
    from onepeace.train.sharded import STATE_DIR

    return (Path(step_dir) / STATE_DIR).is_dir()


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete step directory ``path`` names: itself, or the latest of a run directory; else CheckpointError."""
    root = Path(path)
    step_dir = root if is_checkpoint(root) else latest_checkpoint(root)
    if step_dir is None:
        raise CheckpointError(f"{root}: no complete training checkpoint found")
    return step_dir


def read_checkpoint_weights(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full CPU tensors of the training module saved in a step (or run) directory, either layout.

    Only keys starting with ``prefix`` are read (all by default); no optimizer state is loaded.
    """
    step_dir = resolve_checkpoint(path)
    if is_sharded(step_dir):
        from onepeace.train.sharded import read_sharded_model

        return read_sharded_model(step_dir, prefix)
    weights = load_file(str(step_dir / WEIGHTS))
    return {k: v for k, v in weights.items() if k.startswith(prefix)}


def read_trainer(step_dir: str | Path) -> dict[str, Any]:
    """The ``trainer.pt`` of a step directory (loaded with ``weights_only=True``)."""
    return torch.load(Path(step_dir) / TRAINER, map_location="cpu", weights_only=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete step directory ``latest`` names, else the highest complete ``step_*`` directory, else None."""
    run = Path(run_dir)
    if not run.is_dir():
        return None
    pointer = run / LATEST
    if pointer.is_file():
        target = run / pointer.read_text().strip()
        if _STEP_DIR.match(target.name) and is_checkpoint(target):
            return target
    complete = [p for _, p in _step_dirs(run) if is_checkpoint(p)]
    return complete[-1] if complete else None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete step directories of ``run_dir``, newest first: the one ``latest`` names, then the others by
    descending step (empty when ``run_dir`` is not a directory)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    first = latest_checkpoint(run)
    rest = [p for _, p in reversed(_step_dirs(run)) if p != first and is_checkpoint(p)]
    return ([first] if first is not None else []) + rest


def load_training_state(
    path: str | Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    schedule: Any = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Restore weights, optimizer, schedule and RNG from a step directory or a run directory (its latest).

    Returns ``{"step", "data_position", "extra", "config_yaml", "path"}``.
    """
    step_dir = resolve_checkpoint(path)
    if is_sharded(step_dir):
        raise CheckpointError(f"{step_dir} is sharded: load it with onepeace.train.sharded.load_sharded")
    module.load_state_dict(load_file(str(step_dir / WEIGHTS)), strict=strict)
    trainer = read_trainer(step_dir)
    if optimizer is not None:
        optimizer.load_state_dict(trainer["optimizer"])
    if schedule is not None and trainer["schedule"] is not None:
        schedule.load_state_dict(trainer["schedule"])
    if restore_rng:
        restore_rng_state(trainer["rng"])
    config = step_dir / CONFIG
    return {
        "step": trainer["step"],
        "data_position": trainer["data_position"],
        "extra": trainer["extra"],
        "config_yaml": config.read_text() if config.is_file() else "",
        "path": step_dir,
    }


def export_inference_weights(
    model: nn.Module | dict[str, torch.Tensor], cfg: OnePeaceConfig, out_dir: str | Path
) -> Path:
    """Write the backbone (a module or its full state dict) as a native inference checkpoint for ``onepeace.load``."""
    from onepeace.checkpoints.native import save_native

    return save_native(model, cfg, out_dir)
