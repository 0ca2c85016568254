"""The pretraining loop: ``onepeace pretrain --config RECIPE.yaml`` (single process or ``torchrun``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from onepeace.train.config import TrainConfig
from onepeace.train.core import MicroStep
from onepeace.train.distributed import DistInfo


@dataclass(frozen=True)
class RunResult:
    """Where a run ended: its directory, the last update, the final checkpoint and exported model."""

    out_dir: Path
    step: int
    checkpoint: Path | None
    model_dir: Path | None


def _gather(cfg: TrainConfig):
    from onepeace.train.distributed import all_gather_no_grad, all_gather_with_grad

    return all_gather_with_grad if cfg.loss.contrastive_gather == "with_grad" else all_gather_no_grad


def _batches(cfg: TrainConfig, dist: DistInfo, epoch: int, skip: int):
    """This rank's batches from ``(epoch, skip)`` on, forever (epochs roll over), each with the data position after
    it: ``{"epoch", "batch"}`` (batches of that epoch consumed)."""
    from onepeace.data.pretrain import build_pretrain_loader

    while True:
        loader = build_pretrain_loader(cfg.data, dist.rank, dist.world_size, cfg.seed, epoch, skip, dist.device)
        for i, batch in enumerate(loader, start=skip):
            yield batch, {"epoch": epoch, "batch": i + 1}
        epoch, skip = epoch + 1, 0


def _batches_per_epoch(cfg: TrainConfig, dist: DistInfo) -> int:
    from onepeace.data.pretrain import build_pretrain_loader

    return len(build_pretrain_loader(replace(cfg.data, num_workers=0), dist.rank, dist.world_size, cfg.seed, 0))


def _micro(wrapped, batch) -> MicroStep:
    """The losses of one micro-batch (the objective computes them itself) and its bookkeeping."""
    return MicroStep(
        wrapped(batch),
        samples=int(batch.num_samples or batch.batch_size),
        tokens=batch.num_text_tokens if batch.num_text_tokens is not None else batch.text.ne(1).sum(),
        skipped=sum(getattr(batch, "skipped", {}).values()),
    )


def build_and_wrap(cfg: TrainConfig, dist: DistInfo) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The pretraining objective on this rank's device, then wrapped: ``(objective, wrapped)``.

    The one place the module is made: build, activation checkpointing, per-block compile, data-parallel wrap.
    Under DDP/FSDP with several processes it is built on the meta device and each rank materialises only what it
    holds (:func:`onepeace.train.build.build_for_ranks`), with the values of the eager build.
    """
    from onepeace.train.build import build_for_ranks
    from onepeace.train.core import maybe_compile
    from onepeace.train.distributed import wrap_kwargs

    return build_for_ranks(cfg, dist, _gather(cfg), lambda m: maybe_compile(m, cfg.compile), **wrap_kwargs(cfg))


def pretrain(cfg: TrainConfig, resume: str | Path | None = None) -> RunResult:
    """Run (or resume) a pretraining recipe; rank 0 logs and exports the final backbone, every rank checkpoints."""
    from onepeace.train.distributed import cleanup, init_distributed

    if getattr(cfg.data, "stage", cfg.stage) != cfg.stage:
        raise ValueError(f"data.stage ({cfg.data.stage}) differs from stage ({cfg.stage})")
    result = _pretrain(cfg, resume, init_distributed())
    cleanup()  # the run's modules are unreachable now
    return result


def _pretrain(cfg: TrainConfig, resume: str | Path | None, dist: DistInfo) -> RunResult:
    from onepeace.train import core
    from onepeace.train.optim import build_optimizer
    from onepeace.train.schedule import LRSchedule, resolve_total

    objective, wrapped = build_and_wrap(cfg, dist)
    optim_cfg = resolve_total(cfg.optim, _batches_per_epoch(cfg, dist), cfg.grad_accum)
    optimizer = build_optimizer(objective, optim_cfg)
    trainee = core.Trainee(objective, wrapped, optimizer, LRSchedule(optimizer, optim_cfg))
    step, position = core.resume(resume, trainee, dist)
    epoch, skip = (position["epoch"], position["batch"]) if position else (0, 0)
    last = optim_cfg.total_updates if cfg.max_updates is None else min(cfg.max_updates, optim_cfg.total_updates)
    batches = _batches(cfg, dist, epoch, skip)
    state = core.run(core.CoreSettings.of(cfg, f"stage {cfg.stage}"), trainee, _micro, batches, dist, step, last)
    model_dir = _export(cfg, dist, objective, Path(cfg.out_dir) / "model")
    return RunResult(Path(cfg.out_dir), state.step, state.checkpoint, model_dir)


def _export(cfg: TrainConfig, dist: DistInfo, objective, out: Path) -> Path | None:
    """Write the trained backbone as a native model directory (rank 0; a collective under FSDP)."""
    from onepeace.train.export import export_pretrain_backbone

    if cfg.strategy == "fsdp" and dist.world_size > 1:
        from onepeace.train.distributed import full_model_state

        state = full_model_state(objective)
    else:
        state = objective.state_dict()
    if not dist.is_main:
        return None
    return export_pretrain_backbone(cfg, state, out)
