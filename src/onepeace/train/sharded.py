"""Sharded training checkpoints through ``torch.distributed.checkpoint`` (runs of several processes).

A sharded step directory (see :mod:`onepeace.train.checkpoint` for the run directory around it)::

    step_00001000/state/          DCP files: ``.metadata`` and one ``__<rank>_0.distcp`` per rank
    step_00001000/trainer.pt      step, schedule, data position, extra (written by rank 0)
    step_00001000/config.yaml     the resolved recipe
    step_00001000/COMPLETE        the marker, written by rank 0 after every rank has finished writing

``state`` holds ``{"model": ..., "optim": ...}`` as :func:`torch.distributed.checkpoint.state_dict.get_state_dict`
gives them: under FSDP2 each rank writes and later reads only its own shards of the parameters and optimizer
moments; replicated tensors (DDP, parameters FSDP leaves unsharded) are written once, spread over the ranks. No rank
ever holds the full optimizer state. The files load under any number of processes (DCP reshards), and one process
can read the model part alone (:func:`read_sharded_model`) to export it or to start another stage.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onepeace.errors import CheckpointError

STATE_DIR = "state"


def _collective() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _collective():
        import torch.distributed as dist

        dist.barrier()


def save_sharded(
    run_dir: str | Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    *,
    rank: int,
    world_size: int,
    data_position: Any = None,
    config_yaml: str = "",
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``run_dir/step_{step:08d}`` from every rank (a collective), mark it complete, point ``latest`` at it.

    ``module`` is the unwrapped training module (an FSDP2 module is its own unwrapped module). Rank 0 writes
    ``trainer.pt``, ``config.yaml``, the marker and the pointer, and prunes to the newest ``keep_last``. Returns the
    step directory.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from onepeace.train.checkpoint import publish_pointer, step_dir_name, write_marker, write_trainer_files

    run = Path(run_dir)
    step_dir = run / step_dir_name(step)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        if step_dir.exists():  # an unfinished save of this step, or the same step saved again
            shutil.rmtree(step_dir)
        step_dir.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(step_dir / STATE_DIR))
    _barrier()  # every rank's shards are on disk (dcp.save returns on each rank once its own files are written)
    if rank == 0:
        trainer = {
            "step": int(step),
            "schedule": schedule.state_dict() if schedule is not None else None,
            "data_position": data_position,
            "extra": extra or {},
            "world_size": int(world_size),
        }
        write_trainer_files(step_dir, trainer, config_yaml)
        write_marker(step_dir, step, "sharded", world_size)
        publish_pointer(run, step_dir, keep_last)
    _barrier()
    return step_dir


def load_sharded(
    step_dir: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer | None = None, schedule: Any = None
) -> dict[str, Any]:
    """Restore a sharded step directory into ``module`` (and ``optimizer``, ``schedule``) on every rank.

    Each rank reads only what it holds. Returns ``{"step", "data_position", "extra", "path"}``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from onepeace.train.checkpoint import read_trainer

    path = Path(step_dir)
    if not (path / STATE_DIR).is_dir():
        raise CheckpointError(f"{path} has no sharded state ({STATE_DIR}/)")
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(module)}
        dcp.load(state, checkpoint_id=str(path / STATE_DIR))
        set_model_state_dict(module, state["model"])
    else:
        model_state, optim_state = get_state_dict(module, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path / STATE_DIR))
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = read_trainer(path)
    if schedule is not None and trainer["schedule"] is not None:
        schedule.load_state_dict(trainer["schedule"])
    return {"step": trainer["step"], "data_position": trainer["data_position"], "extra": trainer["extra"], "path": path}


def read_sharded_model(step_dir: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full CPU tensors of the model part of a sharded step directory, read by this process alone (not a collective).

    Keys are those of the training module's state dict; only keys starting with ``prefix`` are read.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state_dir = Path(step_dir) / STATE_DIR
    if not state_dir.is_dir():
        raise CheckpointError(f"{step_dir} has no sharded state ({STATE_DIR}/)")
    metadata = dcp.FileSystemReader(str(state_dir)).read_metadata()
    model: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        name = key.removeprefix("model.")
        if key.startswith("model.") and name.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            model[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not model:
        raise CheckpointError(f"{state_dir}: no model tensors under {prefix!r}")
    with warnings.catch_warnings():  # DCP warns that it reads in one process: that is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": model}, checkpoint_id=str(state_dir), no_dist=True)
    return model
