"""Learning-rate schedule: linear warmup, then one cosine period down to ``min_lr`` (spec §5.5).

``lr_at(step)`` is the LR of the update that follows ``step`` completed updates: ``warmup_init_lr`` (default
``min_lr``) at step 0, the peak ``lr`` at the end of warmup, ``min_lr`` at ``total_updates`` and after.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from onepeace.train.config import OptimConfig


def updates_per_epoch(batches_per_epoch: int, grad_accum: int = 1) -> int:
    """Optimizer updates in one epoch: ``ceil(batches / grad_accum)``."""
    if batches_per_epoch < 1 or grad_accum < 1:
        raise ValueError(f"need batches_per_epoch >= 1 and grad_accum >= 1, got {batches_per_epoch}, {grad_accum}")
    return math.ceil(batches_per_epoch / grad_accum)


def resolve_total(cfg: OptimConfig, batches_per_epoch: int, grad_accum: int = 1) -> OptimConfig:
    """Copy of ``cfg`` with ``epochs`` turned into ``total_updates = epochs * updates_per_epoch`` (no-op otherwise)."""
    if cfg.epochs is None:
        return cfg
    total = cfg.epochs * updates_per_epoch(batches_per_epoch, grad_accum)
    return dataclasses.replace(cfg, epochs=None, total_updates=total)


def total_updates(cfg: OptimConfig) -> int:
    """Schedule length; ``ValueError`` while it is still given in epochs."""
    if cfg.total_updates is None:
        raise ValueError("the schedule length is unresolved: set total_updates, or call resolve_total for epochs")
    return cfg.total_updates


def warmup_updates(cfg: OptimConfig) -> int:
    """Warmup length: ``warmup_updates``, or ``floor(total * warmup_ratio)``, or 0; never more than the total."""
    total = total_updates(cfg)
    if cfg.warmup_updates is not None:
        warmup = cfg.warmup_updates
    elif cfg.warmup_ratio is not None:
        warmup = math.floor(total * cfg.warmup_ratio)
    else:
        warmup = 0
    return min(warmup, total)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """LR after ``step`` completed updates (pure function of the step and the config)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    total, warmup = total_updates(cfg), warmup_updates(cfg)
    start = cfg.min_lr if cfg.warmup_init_lr is None else cfg.warmup_init_lr
    if step < warmup:
        return start + (cfg.lr - start) * step / warmup
    if step >= total:
        return cfg.min_lr
    progress = (step - warmup) / (total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Sets every group's ``lr`` to ``lr_at(step) * group["lr_scale"]``; the state is only the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int = 0) -> None:
        total_updates(cfg)
        self.optimizer = optimizer
        self.cfg = cfg
        self.step_count = step
        self.apply()

    @property
    def lr(self) -> float:
        """Base LR (multiplier 1) for the next update."""
        return lr_at(self.step_count, self.cfg)

    def apply(self) -> None:
        """Write the LR of the current step into the optimizer's groups."""
        base = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = base * group.get("lr_scale", 1.0)

    def step(self) -> None:
        """Advance by one completed update and set the LR of the next one."""
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.apply()
