"""The training core shared by pretraining and fine-tuning: updates, rank-averaged logging, checkpoints, resume.

An entry (``train/loop.py::pretrain``, ``finetune/loop.py::finetune``) builds and wraps its module, makes the
optimizer and schedule, and hands :func:`run` a :class:`Trainee`, the :data:`Compute` function giving the losses of
one micro-batch, and an iterator of ``(batch, data_position)``. Every update here:

1. seeds torch from ``(seed, rank, step)`` (:func:`step_seed`), so a resumed run draws the same drop-path masks;
2. runs ``grad_accum`` micro-batches, each moved with ``non_blocking`` where the batch supports it, its forward
   under autocast (bf16 when ``precision`` is ``"bf16"``) and its backward on ``total / grad_accum``; gradients are
   synchronised only on the last micro-batch (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync``);
3. accumulates the total, every loss term and every metric as float64 tensors on the device (no host transfer);
4. clips, steps and advances the schedule (:func:`onepeace.train.optim.apply_update`);
5. on log steps (the first and every ``log_every``-th), averages the micro-batch means over ranks in one all-reduce
   and copies them to the host once; ``samples``, ``tokens`` and ``skipped`` are summed over ranks;
6. every ``save_every`` updates and after the last, writes a checkpoint: one process the single-file layout of
   :mod:`onepeace.train.checkpoint`, several processes the sharded one of :mod:`onepeace.train.sharded`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onepeace.losses.named import NamedLosses
from onepeace.train.distributed import DistInfo


@dataclass(frozen=True)
class CoreSettings:
    """The run settings the core reads; :meth:`of` takes them from a pretraining or fine-tuning recipe."""

    seed: int
    precision: str
    grad_accum: int
    clip_grad_norm: float
    log_every: int
    save_every: int
    keep_last: int
    out_dir: Path
    recipe_yaml: str = ""
    """The resolved recipe, written into every checkpoint as ``config.yaml``."""
    tensorboard: bool = False
    desc: str = "train"
    """Progress-bar label."""

    @classmethod
    def of(cls, cfg: Any, desc: str) -> CoreSettings:
        """Settings of a :class:`~onepeace.train.config.TrainConfig` or :class:`FinetuneConfig`."""
        from onepeace.train.config import dump_recipe

        return cls(
            seed=cfg.seed,
            precision=cfg.precision,
            grad_accum=cfg.grad_accum,
            clip_grad_norm=cfg.optim.clip_grad_norm,
            log_every=cfg.log_every,
            save_every=cfg.save_every,
            keep_last=cfg.keep_last,
            out_dir=Path(cfg.out_dir),
            recipe_yaml=dump_recipe(cfg),
            tensorboard=getattr(cfg, "tensorboard", False),
            desc=desc,
        )


@dataclass(frozen=True)
class MicroStep:
    """What :data:`Compute` returns for one micro-batch.

    Attributes:
        losses: the named losses; ``losses.total`` is back-propagated (scaled by ``1 / grad_accum``).
        samples: real examples in the micro-batch.
        tokens: non-padding text tokens (a scalar tensor on the device, or an int).
        skipped: records the data pipeline replaced in this micro-batch.
    """

    losses: NamedLosses
    samples: int = 0
    tokens: torch.Tensor | int = 0
    skipped: int = 0


@dataclass(frozen=True)
class Trainee:
    """What is trained: the unwrapped module, what its forward runs through, the optimizer and the LR schedule.

    ``module`` owns the parameters (state dicts, clipping, the optimizer's groups); ``wrapped`` is the
    :class:`~torch.nn.parallel.DistributedDataParallel` around it, the FSDP2 module itself, or ``module``.
    """

    module: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any


@dataclass(frozen=True)
class RunState:
    """Where :func:`run` stopped: the update count and the last checkpoint of the run directory (None if none)."""

    step: int
    checkpoint: Path | None


Compute = Callable[[nn.Module, Any], MicroStep]
"""``compute(wrapped, batch_on_device) -> MicroStep``: the forward of one micro-batch (called under autocast)."""
Batches = Iterator[tuple[Any, Any]]
"""This rank's ``(batch, data_position)`` pairs; the position (plain values) is where to restart after the batch."""


def step_seed(seed: int, rank: int, step: int) -> None:
    """Seed the per-update randomness (drop path) from (seed, rank, step), so a resumed run draws the same."""
    torch.manual_seed((seed * 1_000_003 + rank * 7919 + step) % (2**63 - 1))


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision == "bf16"``, a disabled one for ``"fp32"``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch.to(device, non_blocking=True)`` where the batch class takes it, else ``batch.to(device)``."""
    if "non_blocking" in inspect.signature(batch.to).parameters:
        return batch.to(device, non_blocking=True)
    return batch.to(device)


def gradient_sync(wrapped: nn.Module, sync: bool) -> AbstractContextManager:
    """Context for one micro-batch's forward and backward: gradients are reduced over ranks only when ``sync``."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel):
        return nullcontext() if sync else wrapped.no_sync()
    setter = getattr(wrapped, "set_requires_gradient_sync", None)  # an FSDP2 module
    if setter is not None:
        setter(sync)
    return nullcontext()


def maybe_compile(module: nn.Module, enabled: bool) -> None:
    """Compile each fusion block of ``module`` (``compile: true`` recipes); call it between building and wrapping."""
    if enabled:
        from onepeace.train.compile import compile_blocks

        compile_blocks(module)


# ---------------------------------------------------------------------------------------------- one update
class _Sums:
    """Per-update sums on the device: the loss values (in a fixed name order) and the data counts."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] | None = None
        self.values: torch.Tensor | None = None
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = 0
        self.skipped = 0

    def add(self, micro: MicroStep, weight: float) -> None:
        losses = micro.losses
        names = ["total", *losses.terms, *losses.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"loss terms and metrics share a name: {names}")
        if self.names is not None and names != self.names:
            raise ValueError(f"micro-batches of one update logged different values: {self.names} and {names}")
        parts = [losses.total, *losses.terms.values(), *losses.metrics.values()]
        values = torch.stack([torch.as_tensor(v, device=self.device).detach().double().reshape(()) for v in parts])
        self.names = names
        self.values = values * weight if self.values is None else self.values + values * weight
        self.tokens = self.tokens + torch.as_tensor(micro.tokens, device=self.device).double()
        self.samples += int(micro.samples)
        self.skipped += int(micro.skipped)


def _update(settings: CoreSettings, trainee: Trainee, compute: Compute, batches: Batches, dist: DistInfo, step: int):
    """One optimizer update over ``grad_accum`` micro-batches; returns (sums, grad_norm, lr, data position)."""
    from onepeace.train.optim import apply_update

    step_seed(settings.seed, dist.rank, step)
    trainee.wrapped.train()
    sums, position = _Sums(dist.device), None
    for i in range(settings.grad_accum):
        batch, position = next(batches)
        batch = to_device(batch, dist.device)
        with gradient_sync(trainee.wrapped, i == settings.grad_accum - 1):
            with autocast(settings.precision, dist.device):
                micro = compute(trainee.wrapped, batch)
            (micro.losses.total / settings.grad_accum).backward()
        sums.add(micro, 1.0 / settings.grad_accum)
    grad_norm, lr = apply_update(trainee.module, trainee.optimizer, trainee.schedule, settings.clip_grad_norm)
    return sums, grad_norm, lr, position


def reduce_for_log(sums: _Sums, grad_norm: torch.Tensor, world_size: int) -> tuple[dict[str, float], dict[str, float]]:
    """Loss values averaged over ranks and counts summed over ranks, copied to the host once (a collective).

    Returns ``(losses, counts)``: ``losses`` by name (total, terms, metrics, each the mean over micro-batches and
    ranks) and ``counts`` with ``grad_norm``, ``samples``, ``tokens`` and ``skipped`` (the job's totals).
    """
    if hasattr(grad_norm, "full_tensor"):  # a DTensor norm under FSDP2 (a collective)
        grad_norm = grad_norm.full_tensor()
    counts = torch.tensor([sums.samples, sums.skipped], dtype=torch.float64).to(sums.device, non_blocking=True)
    norm = torch.as_tensor(grad_norm, device=sums.device).detach().double().reshape(1)
    vector = torch.cat([sums.values, norm, sums.tokens.reshape(1), counts])
    if world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(vector, op=tdist.ReduceOp.SUM)  # gloo has no AVG
    host = vector.tolist()  # the one device-to-host copy of this log step
    n = len(sums.names)
    losses = {name: value / world_size for name, value in zip(sums.names, host[:n])}
    samples, tokens, skipped = host[n + 2], host[n + 1], host[n + 3]
    return losses, {"grad_norm": host[n] / world_size, "samples": samples, "tokens": tokens, "skipped": skipped}


# ---------------------------------------------------------------------------------------------- checkpoints
def save(settings: CoreSettings, trainee: Trainee, dist: DistInfo, step: int, position: Any) -> Path:
    """Write the checkpoint of update ``step`` (every rank calls it; several processes write it sharded)."""
    if dist.world_size > 1:
        from onepeace.train.sharded import save_sharded

        return save_sharded(
            settings.out_dir,
            step,
            trainee.module,
            trainee.optimizer,
            trainee.schedule,
            rank=dist.rank,
            world_size=dist.world_size,
            data_position=position,
            config_yaml=settings.recipe_yaml,
            keep_last=settings.keep_last,
        )
    from onepeace.train.checkpoint import save_training_state

    return save_training_state(
        settings.out_dir,
        step,
        trainee.module,
        trainee.optimizer,
        trainee.schedule,
        data_position=position,
        config_yaml=settings.recipe_yaml,
        keep_last=settings.keep_last,
    )


def resume(run_dir: str | Path | None, trainee: Trainee, dist: DistInfo) -> tuple[int, Any]:
    """Restore the latest complete checkpoint of ``run_dir`` on every rank; ``(step, data_position)``.

    ``(0, None)`` when ``run_dir`` is None or an existing folder without a complete checkpoint (a fresh start); a
    missing ``run_dir`` is a :class:`~onepeace.errors.CheckpointError`. A checkpoint that cannot be read (a damaged
    file behind its ``COMPLETE`` marker) is skipped with a warning naming it and the previous complete one is
    restored, in one process; under several processes (whose loads are collective) it is an error naming it. A
    sharded checkpoint loads under any number of processes; a single-file one into several is read whole by every rank.
    """
    import warnings

    from onepeace.errors import CheckpointError, OnePeaceWarning
    from onepeace.train.checkpoint import complete_checkpoints

    if run_dir is None:
        return 0, None
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"cannot resume from {run_dir}: no such run folder")
    skipped: list[str] = []
    for step_dir in complete_checkpoints(run_dir):
        try:
            return _restore(step_dir, trainee, dist)
        except Exception as exc:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            reason = f"{step_dir}: {' '.join(str(exc).split()) or type(exc).__name__}"
            if dist.world_size > 1:
                raise CheckpointError(f"cannot resume from damaged checkpoint {reason}") from exc
            skipped.append(reason)
            warnings.warn(
                f"skipping damaged checkpoint {reason}; trying the previous one", OnePeaceWarning, stacklevel=2
            )
    if skipped:
        raise CheckpointError(
            f"cannot resume from {run_dir}: no complete checkpoint is readable ({'; '.join(skipped)})"
        )
    return 0, None


def _restore(step_dir: Path, trainee: Trainee, dist: DistInfo) -> tuple[int, Any]:
    from onepeace.train.checkpoint import is_sharded, load_training_state

    if is_sharded(step_dir):
        from onepeace.train.sharded import load_sharded

        state = load_sharded(step_dir, trainee.module, trainee.optimizer, trainee.schedule)
    elif dist.world_size > 1:
        state = _load_single_into_ranks(step_dir, trainee)
    else:
        state = load_training_state(step_dir, trainee.module, trainee.optimizer, trainee.schedule, restore_rng=False)
    return state["step"], state["data_position"]


def _load_single_into_ranks(step_dir: Path, trainee: Trainee) -> dict[str, Any]:
    from safetensors.torch import load_file

    from onepeace.train.checkpoint import WEIGHTS, read_trainer
    from onepeace.train.distributed import load_full_state

    trainer = read_trainer(step_dir)
    load_full_state(trainee.module, trainee.optimizer, load_file(str(step_dir / WEIGHTS)), trainer["optimizer"])
    trainee.schedule.load_state_dict(trainer["schedule"])
    return trainer


# ---------------------------------------------------------------------------------------------- the loop
def run(
    settings: CoreSettings,
    trainee: Trainee,
    compute: Compute,
    batches: Batches,
    dist: DistInfo,
    start: int,
    stop: int,
) -> RunState:
    """Updates ``start + 1 .. stop``: log to ``out_dir/metrics.jsonl`` (rank 0), checkpoint, show progress."""
    from onepeace.train.tracking import MetricsLogger, progress_bar

    logger = MetricsLogger(settings.out_dir, dist.rank, settings.tensorboard, dist.device)
    bar = progress_bar(stop, dist.rank, initial=start, desc=settings.desc)
    step, checkpoint = start, None
    try:
        while step < stop:
            began = time.perf_counter()
            sums, grad_norm, lr, position = _update(settings, trainee, compute, batches, dist, step)
            if (step + 1) % settings.log_every == 0 or step == 0:
                losses, counts = reduce_for_log(sums, grad_norm, dist.world_size)
                extra = {"grad_norm": counts["grad_norm"]}
                if isinstance(position, dict) and "epoch" in position:
                    extra["epoch"] = position["epoch"]
                seconds = time.perf_counter() - began
                logger.log(step + 1, losses, lr, counts["samples"], counts["tokens"], seconds, counts["skipped"], extra)
            step += 1
            bar.update(1)
            if step % settings.save_every == 0 or step == stop:
                checkpoint = save(settings, trainee, dist, step, position)
    finally:
        bar.close()
        logger.close()
    if checkpoint is None:  # nothing left to train (a resumed run that had finished)
        from onepeace.train.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(settings.out_dir)
    return RunState(step, checkpoint)
