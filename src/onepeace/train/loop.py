"""The pretraining loop: ``onepeace pretrain --config RECIPE.yaml`` (single process or ``torchrun``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from onepeace.modality import Modality
from onepeace.train.config import TrainConfig, dump_recipe
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


def _step_seed(cfg: TrainConfig, rank: int, step: int) -> None:
    """Seed the per-update randomness (drop path) from (seed, rank, step), so a resumed run draws the same."""
    torch.manual_seed((cfg.seed * 1_000_003 + rank * 7919 + step) % (2**63 - 1))


def _autocast(cfg: TrainConfig, device: torch.device):
    enabled = cfg.precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _batches(cfg: TrainConfig, dist: DistInfo, epoch: int, skip: int):
    """This rank's batches from ``(epoch, skip)`` on, forever (epochs roll over)."""
    from onepeace.data.pretrain import build_pretrain_loader

    while True:
        loader = build_pretrain_loader(cfg.data, dist.rank, dist.world_size, cfg.seed, epoch, skip)
        for i, batch in enumerate(loader, start=skip):
            yield epoch, i + 1, batch
        epoch, skip = epoch + 1, 0


def _batches_per_epoch(cfg: TrainConfig, dist: DistInfo) -> int:
    from onepeace.data.pretrain import build_pretrain_loader

    return len(build_pretrain_loader(replace(cfg.data, num_workers=0), dist.rank, dist.world_size, cfg.seed, 0))


def _accumulate(wrapped, batches, cfg: TrainConfig, device: torch.device) -> tuple[dict[str, float], dict[str, int]]:
    """Forward + backward over ``grad_accum`` micro-batches; returns mean scalars and the data bookkeeping."""
    sums: dict[str, float] = {}
    info = {"samples": 0, "tokens": 0, "skipped": 0, "epoch": 0, "batch": 0}
    for _ in range(cfg.grad_accum):
        epoch, position, batch = next(batches)
        info.update(epoch=epoch, batch=position)
        info["samples"] += int(batch.num_samples or batch.batch_size)
        info["tokens"] += int(batch.text.ne(1).sum())
        info["skipped"] += sum(getattr(batch, "skipped", {}).values())
        with _autocast(cfg, device):
            out = wrapped(batch.to(device))
        (out.total / cfg.grad_accum).backward()
        for name, value in out.scalars().items():
            sums[name] = sums.get(name, 0.0) + value / cfg.grad_accum
    return sums, info


def pretrain(cfg: TrainConfig, resume: str | Path | None = None) -> RunResult:
    """Run (or resume) a pretraining recipe; rank 0 logs, checkpoints and exports the final backbone."""
    from onepeace.train.build import build_objective
    from onepeace.train.checkpoint import latest_checkpoint
    from onepeace.train.distributed import (
        apply_activation_checkpointing,
        cleanup,
        init_distributed,
        wrap_kwargs,
        wrap_model,
    )
    from onepeace.train.optim import build_optimizer
    from onepeace.train.schedule import LRSchedule, resolve_total
    from onepeace.train.tracking import MetricsLogger, progress_bar

    if getattr(cfg.data, "stage", cfg.stage) != cfg.stage:
        raise ValueError(f"data.stage ({cfg.data.stage}) differs from stage ({cfg.stage})")
    dist = init_distributed()
    out_dir = Path(cfg.out_dir)
    objective = build_objective(cfg, _gather(cfg), dist.rank).to(dist.device)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(objective)
    wrapped = wrap_model(objective, cfg.strategy, **wrap_kwargs(cfg))
    optim_cfg = resolve_total(cfg.optim, _batches_per_epoch(cfg, dist), cfg.grad_accum)
    optimizer = build_optimizer(objective, optim_cfg)
    schedule = LRSchedule(optimizer, optim_cfg)
    step, epoch, skip = 0, 0, 0
    if resume is not None and latest_checkpoint(resume) is not None:
        step, (epoch, skip) = _resume(cfg, resume, objective, optimizer, schedule)
    last = optim_cfg.total_updates if cfg.max_updates is None else min(cfg.max_updates, optim_cfg.total_updates)
    logger = MetricsLogger(out_dir, dist.rank, cfg.tensorboard, dist.device)
    bar = progress_bar(last, dist.rank, initial=step, desc=f"stage {cfg.stage}")
    batches = _batches(cfg, dist, epoch, skip)
    checkpoint = None
    try:
        while step < last:
            position = _update(cfg, dist, wrapped, objective, optimizer, schedule, batches, logger, step)
            step += 1
            bar.update(1)
            if step % cfg.save_every == 0 or step == last:
                checkpoint = _save(cfg, dist, objective, optimizer, schedule, step, position)
    finally:
        bar.close()
        logger.close()
    model_dir = _export(cfg, dist, objective, out_dir / "model")
    cleanup()
    return RunResult(out_dir, step, checkpoint, model_dir)


def _update(cfg, dist, wrapped, objective, optimizer, schedule, batches, logger, step: int) -> dict[str, int]:
    """One optimizer update; returns the data position after it (epoch, batches consumed in that epoch)."""
    from onepeace.train.optim import apply_update

    _step_seed(cfg, dist.rank, step)
    wrapped.train()
    start = time.perf_counter()
    scalars, info = _accumulate(wrapped, batches, cfg, dist.device)
    grad_norm, lr = apply_update(objective, optimizer, schedule, cfg.optim.clip_grad_norm)
    if (step + 1) % cfg.log_every == 0 or step == 0:
        scalars = _mean_over_ranks(scalars, dist)
        extra = {"grad_norm": float(grad_norm), "epoch": info["epoch"]}
        seconds = time.perf_counter() - start
        logger.log(step + 1, scalars, lr, info["samples"], info["tokens"], seconds, info["skipped"], extra)
    return {"epoch": info["epoch"], "batch": info["batch"]}


def _mean_over_ranks(scalars: dict[str, float], dist: DistInfo) -> dict[str, float]:
    """Logged values averaged over ranks (a collective; every rank logs at the same updates)."""
    if dist.world_size == 1:
        return scalars
    from onepeace.train.distributed import reduce_mean

    names = sorted(scalars)
    values = reduce_mean(torch.tensor([scalars[n] for n in names], dtype=torch.float64, device=dist.device))
    return dict(zip(names, values.tolist()))


def _full_states(cfg: TrainConfig, objective, optimizer) -> tuple[dict | None, dict | None]:
    """Full model / optimizer state under FSDP (a collective on every rank); None, None otherwise."""
    if cfg.strategy != "fsdp":
        return None, None
    from onepeace.train.distributed import full_state_dicts

    return full_state_dicts(objective, optimizer)


def _save(cfg, dist, objective, optimizer, schedule, step: int, position: dict[str, Any]) -> Path | None:
    """Checkpoint on rank 0 (after gathering full states under FSDP); every rank waits for it."""
    from onepeace.train.checkpoint import save_training_state
    from onepeace.train.distributed import barrier

    model_state, optimizer_state = _full_states(cfg, objective, optimizer)
    path = None
    if dist.is_main:
        path = save_training_state(
            cfg.out_dir,
            step,
            objective,
            optimizer,
            schedule,
            data_position=position,
            config_yaml=dump_recipe(cfg),
            keep_last=cfg.keep_last,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
    barrier()
    return path


def _resume(cfg: TrainConfig, run_dir, objective, optimizer, schedule) -> tuple[int, tuple[int, int]]:
    """Restore the latest checkpoint of ``run_dir``; returns the update count and the data position."""
    from onepeace.train.checkpoint import latest_checkpoint, load_training_state

    if cfg.strategy == "fsdp":
        from safetensors.torch import load_file

        from onepeace.train.distributed import load_full_state

        step_dir = latest_checkpoint(run_dir)
        trainer = torch.load(step_dir / "trainer.pt", map_location="cpu", weights_only=True)
        load_full_state(objective, optimizer, load_file(str(step_dir / "model.safetensors")), trainer["optimizer"])
        schedule.load_state_dict(trainer["schedule"])
        state = {"step": trainer["step"], "data_position": trainer["data_position"]}
    else:
        state = load_training_state(run_dir, objective, optimizer, schedule, restore_rng=False)
    position = state["data_position"]
    return state["step"], (position["epoch"], position["batch"])


def _export(cfg: TrainConfig, dist, objective, out: Path) -> Path | None:
    """Write the trained backbone as a native model directory (rank 0; a collective under FSDP).

    Stage 2 started from a stage-1 run adds that run's image branch, so the exported model has all three modalities.
    """
    from onepeace.train.checkpoint import export_inference_weights

    if cfg.strategy == "fsdp":
        from onepeace.train.distributed import full_model_state

        state = full_model_state(objective)
        backbone = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    else:
        backbone = dict(objective.model.state_dict())
    if not dist.is_main:
        return None
    model_cfg = objective.model.cfg
    if cfg.stage == 2 and cfg.model.init_from:
        from onepeace.train.build import image_branch, read_start_weights

        image = image_branch(read_start_weights(cfg.model.init_from))
        if image:
            backbone.update(image)
            model_cfg = model_cfg.replace(modalities=(Modality.TEXT, Modality.IMAGE, Modality.AUDIO))
    return export_inference_weights(backbone, model_cfg, out)
