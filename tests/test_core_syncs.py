"""The training core's host transfers: none during an update, one per log step, and the logged values are the
micro-batch means computed by hand."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from host_syncs import count_host_syncs
from torch import nn

from onepeace.losses.named import NamedLosses
from onepeace.train import core
from onepeace.train.config import OptimConfig
from onepeace.train.distributed import DistInfo
from onepeace.train.schedule import LRSchedule


@dataclass(frozen=True)
class _Batch:
    x: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> _Batch:
        return _Batch(self.x.to(device, non_blocking=non_blocking))


def _losses(module: nn.Module, x: torch.Tensor) -> NamedLosses:
    y = module(x)
    return NamedLosses.weighted({"sq": y.square().mean(), "abs": y.abs().mean()}, {"abs": 0.5}, {"hits": (y > 0).sum()})


def _compute(wrapped: nn.Module, batch: _Batch) -> core.MicroStep:
    return core.MicroStep(_losses(wrapped, batch.x), samples=3, tokens=batch.x.gt(0).sum(), skipped=1)


def _trainee() -> core.Trainee:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, foreach=True)
    return core.Trainee(module, module, optimizer, LRSchedule(optimizer, OptimConfig(lr=1e-2, total_updates=10)))


def test_an_update_copies_nothing_to_the_host_and_a_log_step_copies_once(tmp_path: Path) -> None:
    trainee, twin = _trainee(), _trainee()
    data = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    batches = iter((_Batch(x), {"micro": i}) for i, x in enumerate(data))
    settings = core.CoreSettings(0, "fp32", 2, 1.0, 1, 1, 1, tmp_path)
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    expected = [_losses(trainee.module, x) for x in data]  # at the starting weights, before the update

    out: list = []
    syncs = count_host_syncs(lambda: out.append(core._update(settings, trainee, _compute, batches, dist, 0)))
    for x in data:  # the optimizer's own step counters are read on the host (CPU tensors even on a GPU)
        _losses(twin.module, x).total.div(2).backward()
    torch.nn.utils.clip_grad_norm_(list(twin.module.parameters()), 1.0)
    own = count_host_syncs(twin.optimizer.step)
    assert not [key for key in syncs if key[1].startswith("train.core")], syncs
    assert sum(syncs.values()) == sum(own.values()), (syncs, own)

    sums, grad_norm, _, position = out[0]
    assert position == {"micro": 1}
    log: list = []
    syncs = count_host_syncs(lambda: log.append(core.reduce_for_log(sums, grad_norm, 1)))
    assert dict(syncs) == {("scalar", "train.core.reduce_for_log"): 1}
    losses, counts = log[0]
    by_hand = {name: sum(float(e.scalars()[name]) for e in expected) / 2 for name in ("total", "sq", "abs", "hits")}
    assert losses.keys() == by_hand.keys()
    for name, value in by_hand.items():
        assert abs(losses[name] - value) < 1e-6, name
    assert counts["samples"] == 6 and counts["skipped"] == 2
    assert counts["tokens"] == sum(int(x.gt(0).sum()) for x in data)
    assert abs(counts["grad_norm"] - float(grad_norm)) < 1e-6 and counts["grad_norm"] > 0
    assert all(torch.equal(a, b) for a, b in zip(trainee.module.parameters(), twin.module.parameters()))


def test_micro_batches_must_log_the_same_names(tmp_path: Path) -> None:
    import pytest

    trainee = _trainee()
    calls = iter([("a",), ("b",)])

    def compute(wrapped: nn.Module, batch: _Batch) -> core.MicroStep:
        name = next(calls)[0]
        return core.MicroStep(NamedLosses.weighted({name: wrapped(batch.x).square().mean()}))

    batches = iter((_Batch(torch.randn(2, 4)), None) for _ in range(2))
    settings = core.CoreSettings(0, "fp32", 2, 1.0, 1, 1, 1, tmp_path)
    with pytest.raises(ValueError, match="micro-batches of one update logged different values"):
        core._update(settings, trainee, compute, batches, DistInfo(0, 1, 0, torch.device("cpu")), 0)
