"""Warmup + cosine learning rate against hand-computed values, and the schedule object."""

from __future__ import annotations

import pytest
import torch

from onepeace.train.config import OptimConfig
from onepeace.train.schedule import LRSchedule, lr_at, resolve_total, updates_per_epoch, warmup_updates

# peak 1e-3, floor 1e-5, 10 warmup updates, 110 in total (so the cosine spans 100 updates).
CFG = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_updates=10, total_updates=110)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1e-5),  # warmup starts at min_lr
        (5, 5.05e-4),  # 1e-5 + 0.5 * (1e-3 - 1e-5)
        (10, 1e-3),  # end of warmup = peak
        (35, 8.5501786e-4),  # a quarter into the cosine: 1e-5 + 0.5 * 9.9e-4 * (1 + cos(pi / 4))
        (60, 5.05e-4),  # cosine midpoint: halfway between peak and floor
        (110, 1e-5),  # end
        (500, 1e-5),  # after the end the floor holds (no restart)
    ],
)
def test_hand_computed_values(step: int, expected: float) -> None:
    assert lr_at(step, CFG) == pytest.approx(expected, rel=1e-7)


def test_warmup_init_lr_and_no_warmup() -> None:
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_init_lr=0.0, warmup_updates=10, total_updates=110)
    assert lr_at(0, cfg) == 0.0 and lr_at(5, cfg) == pytest.approx(5e-4)
    flat = OptimConfig(lr=1e-3, min_lr=0.0, total_updates=100)
    assert lr_at(0, flat) == 1e-3 and lr_at(50, flat) == pytest.approx(5e-4) and lr_at(100, flat) == 0.0


def test_ratio_mode_from_epochs() -> None:
    cfg = OptimConfig(lr=2e-4, min_lr=1e-6, warmup_ratio=0.15, epochs=10)
    with pytest.raises(ValueError, match="unresolved"):
        lr_at(0, cfg)
    assert updates_per_epoch(25, 2) == 13
    resolved = resolve_total(cfg, batches_per_epoch=25, grad_accum=2)
    assert resolved.total_updates == 130 and resolved.epochs is None
    assert warmup_updates(resolved) == 19  # floor(130 * 0.15) = floor(19.5)
    assert lr_at(19, resolved) == pytest.approx(2e-4)
    assert lr_at(18, resolved) == pytest.approx(1e-6 + (2e-4 - 1e-6) * 18 / 19)
    assert lr_at(130, resolved) == pytest.approx(1e-6)
    assert resolve_total(CFG, 7) is CFG


def test_schedule_object_sets_scaled_group_lrs_and_round_trips() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.5}], lr=1.0)
    schedule = LRSchedule(opt, CFG)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 5e-6])
    for _ in range(5):
        schedule.step()
    assert schedule.state_dict() == {"step": 5}
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5.05e-4, 2.525e-4])
    other = LRSchedule(opt, CFG)
    other.load_state_dict({"step": 10})
    assert other.lr == pytest.approx(1e-3) and opt.param_groups[1]["lr"] == pytest.approx(5e-4)
