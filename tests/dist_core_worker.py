"""Gradient sync on accumulation micro-steps under 2 gloo ranks; run under ``torch.distributed.run``.

Usage: ``dist_core_worker.py OUT_DIR``. For DDP and FSDP2, each rank runs two micro-batches of its own data through
:func:`onepeace.train.core.gradient_sync`: the first with ``sync=False``, the second with ``sync=True``. It writes
``OUT_DIR/rank<r>.pt`` with, per strategy, the gradients after the first micro-step as this rank holds them (DDP:
the local gradient; FSDP2: whether any parameter has a gradient yet), the full gradients after the second, and the
reference: this rank's own accumulated gradient from an unwrapped copy, averaged over the ranks.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

from onepeace.train.core import gradient_sync
from onepeace.train.distributed import init_distributed, wrap_model


def _data(rank: int, micro: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 * rank + micro))


def _loss(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x).square().mean()


def _full(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def _reference(module: nn.Module, rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's gradient of both micro-batches (no wrapper), averaged over ranks."""
    for micro in range(2):
        _loss(module, _data(rank, micro)).backward()
    out = {}
    for name, param in module.named_parameters():
        grad = param.grad.clone()
        tdist.all_reduce(grad)
        out[name] = grad / world
    return out


def main(out_dir: Path) -> None:
    from onepeace.train.distributed import cleanup

    _run(init_distributed("gloo"), out_dir)
    cleanup()  # the wrapped modules are unreachable now: the process group goes down before interpreter exit


def _run(info, out_dir: Path) -> None:
    results: dict[str, object] = {}
    for strategy in ("ddp", "fsdp"):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        reference = _reference(copy.deepcopy(module), info.rank, info.world_size)
        wrapped = wrap_model(module, strategy)
        with gradient_sync(wrapped, False):
            _loss(wrapped, _data(info.rank, 0)).backward()
        first = {n: None if p.grad is None else _full(p.grad).clone() for n, p in module.named_parameters()}
        with gradient_sync(wrapped, True):
            _loss(wrapped, _data(info.rank, 1)).backward()
        final = {n: _full(p.grad).clone() for n, p in module.named_parameters()}
        results[strategy] = {"first": first, "final": final, "reference": reference}
    torch.save({"rank": info.rank, **results}, out_dir / f"rank{info.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
