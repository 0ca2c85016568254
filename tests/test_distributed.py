"""Distributed helpers: single-process fallbacks, and a real 2-process gloo run on CPU checked against one process.

The 2-process run launches this file under ``torch.distributed.run --standalone`` (the rendezvous binds a free
port itself) once per test module; each rank writes its results to a file and the tests below compare them with
single-process references computed here.

Gradient conventions checked (W = 2 ranks, B = 2 rows per rank, N = W * B):
* ``all_gather_with_grad``: rank r's local gradient is d(sum_j L_j)/dx_r. DDP/FSDP then average over ranks, so
  the parameter update follows d(mean_j L_j) = the single-process gradient when each L_j is a per-rank mean.
* Official contrastive loss (keys gathered without gradient): the rank losses average to the single-process loss,
  but gradients only flow through each rank's queries; rank r's gradient divided by W equals the single-process
  gradient of the same loss with detached keys, and differs from the full single-process gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchrun import launch

from onepeace.losses import contrastive_loss
from onepeace.train import distributed as D

WORLD, LOCAL = 2, 2
LAUNCH_TIMEOUT_S = 120


def _gather_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * LOCAL, 3, generator=g), torch.randn(WORLD, WORLD * LOCAL, 3, generator=g)


def _gather_loss(y: torch.Tensor, weights: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank-dependent loss over the gathered ``[N, 3]`` tensor, mixing every row."""
    return (y.square() * weights[rank]).sum() + (y[rank] * y[-1]).sum()


def _pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    a = F.normalize(torch.randn(WORLD * LOCAL, 8, generator=g), dim=-1)
    b = F.normalize(a + 0.8 * torch.randn(WORLD * LOCAL, 8, generator=g), dim=-1)
    return a, b, torch.tensor(5.0)


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(4, 1000, (WORLD * LOCAL, 8), generator=g), torch.randn(64, generator=g)


class _Objective(nn.Module):
    """Everything with a gradient runs inside ``forward`` (as DDP requires): ``mean(emb @ w) * exp(logit_scale)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        from onepeace.modality import Modality

        emb = self.model(text=tokens)[Modality.TEXT]  # [B, D]
        return (emb @ w).mean() * self.model.logit_scale_exp()


def _tiny_objective() -> _Objective:
    from onepeace.model import OnePeaceModel
    from onepeace.variants import get_variant

    torch.manual_seed(0)
    return _Objective(OnePeaceModel(get_variant("onepeace-tiny"))).eval()


def _sgd_step(objective: nn.Module, module: nn.Module, tokens: torch.Tensor, w: torch.Tensor) -> None:
    module(tokens, w).backward()
    torch.optim.SGD(objective.parameters(), lr=1.0).step()


def _full_params(objective: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in objective.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


# ----------------------------------------------------------------------------- worker (runs under torchrun)


def _worker_gather(rank: int) -> dict[str, torch.Tensor]:
    x_full, weights = _gather_inputs()
    local = x_full[rank * LOCAL : (rank + 1) * LOCAL].clone().requires_grad_()
    gathered = D.all_gather_no_grad(local)
    y = D.all_gather_with_grad(local)
    _gather_loss(y, weights, rank).backward()
    return {
        "no_grad.value": gathered,
        "no_grad.requires_grad": torch.tensor(gathered.requires_grad),
        "with_grad.value": y.detach(),
        "with_grad.grad": local.grad,
        "reduce_mean": D.reduce_mean(torch.tensor([float(rank), 1.0])),
    }


def _worker_contrastive(rank: int) -> dict[str, torch.Tensor]:
    a_full, b_full, scale = _pairs()
    out = {}
    for kind, gather in (("official", D.all_gather_no_grad), ("with_grad", D.all_gather_with_grad)):
        a = a_full[rank * LOCAL : (rank + 1) * LOCAL].clone().requires_grad_()
        b = b_full[rank * LOCAL : (rank + 1) * LOCAL].clone().requires_grad_()
        res = contrastive_loss(a, b, scale, gather=gather, rank=rank)
        res.loss.backward()
        out.update({f"{kind}.loss": res.loss.detach(), f"{kind}.a_grad": a.grad, f"{kind}.b_grad": b.grad})
        out.update({f"{kind}.a2b": res.a2b_correct, f"{kind}.b2a": res.b2a_correct})
    return out


def _worker_wrap(rank: int, strategy: str) -> dict[str, torch.Tensor]:
    objective = _tiny_objective()
    tokens, w = _tokens()
    wrapped = D.wrap_model(objective, strategy, find_unused_parameters=True)  # type: ignore[arg-type]
    _sgd_step(objective, wrapped, tokens[rank * LOCAL : (rank + 1) * LOCAL], w)
    params = _full_params(objective)
    return {f"{strategy}.{name}": value for name, value in params.items()}


def _worker(out_dir: Path) -> None:
    info = D.init_distributed("gloo")
    assert info.world_size == WORLD and dist_ready()
    results = {"rank": torch.tensor(info.rank), "is_main": torch.tensor(D.is_main())}
    results.update(_worker_gather(info.rank))
    results.update(_worker_contrastive(info.rank))
    results.update(_worker_wrap(info.rank, "ddp"))
    results.update(_worker_wrap(info.rank, "fsdp"))
    D.barrier()
    torch.save(results, out_dir / f"rank{info.rank}.pt")
    D.cleanup()


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ----------------------------------------------------------------------------- launcher and tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    """Run the worker on 2 gloo ranks once; the per-rank result dicts in rank order."""
    out_dir = tmp_path_factory.mktemp("dist")
    launch([str(Path(__file__).resolve()), str(out_dir)], WORLD, LAUNCH_TIMEOUT_S)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.dist
def test_ranks_and_main(ranks: list[dict[str, torch.Tensor]]) -> None:
    assert [int(r["rank"]) for r in ranks] == [0, 1]
    assert [bool(r["is_main"]) for r in ranks] == [True, False]


@pytest.mark.dist
def test_gathers_values_and_reduce_mean(ranks: list[dict[str, torch.Tensor]]) -> None:
    x_full, _ = _gather_inputs()
    for r in ranks:
        assert torch.equal(r["no_grad.value"], x_full) and not bool(r["no_grad.requires_grad"])
        assert torch.equal(r["with_grad.value"], x_full)
        assert torch.allclose(r["reduce_mean"], torch.tensor([0.5, 1.0]))


@pytest.mark.dist
def test_with_grad_gather_gradient_is_that_of_the_summed_rank_losses(ranks: list[dict[str, torch.Tensor]]) -> None:
    x_full, weights = _gather_inputs()
    x = x_full.clone().requires_grad_()
    sum(_gather_loss(x, weights, j) for j in range(WORLD)).backward()
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["with_grad.grad"], x.grad[rank * LOCAL : (rank + 1) * LOCAL])


@pytest.mark.dist
def test_official_contrastive_loss_matches_one_process_in_value(ranks: list[dict[str, torch.Tensor]]) -> None:
    a, b, scale = _pairs()
    single = contrastive_loss(a, b, scale)
    for kind in ("official", "with_grad"):
        mean = sum(r[f"{kind}.loss"] for r in ranks) / WORLD
        torch.testing.assert_close(mean, single.loss)
        assert sum(r[f"{kind}.a2b"] for r in ranks) == single.a2b_correct
        assert sum(r[f"{kind}.b2a"] for r in ranks) == single.b2a_correct


@pytest.mark.dist
def test_official_contrastive_gradient_is_the_query_side_only(ranks: list[dict[str, torch.Tensor]]) -> None:
    a_full, b_full, scale = _pairs()
    a, b = a_full.clone().requires_grad_(), b_full.clone().requires_grad_()
    contrastive_loss(a, b, scale, gather=torch.Tensor.detach).loss.backward()  # keys detached
    a2, b2 = a_full.clone().requires_grad_(), b_full.clone().requires_grad_()
    contrastive_loss(a2, b2, scale).loss.backward()  # full gradient through both sides
    for rank, r in enumerate(ranks):
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        torch.testing.assert_close(r["official.a_grad"] / WORLD, a.grad[rows])
        torch.testing.assert_close(r["official.b_grad"] / WORLD, b.grad[rows])
        assert not torch.allclose(r["official.a_grad"] / WORLD, a2.grad[rows], atol=1e-4)
        torch.testing.assert_close(r["with_grad.a_grad"] / WORLD, a2.grad[rows])
        torch.testing.assert_close(r["with_grad.b_grad"] / WORLD, b2.grad[rows])


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_wrapped_sgd_step_matches_one_process(ranks: list[dict[str, torch.Tensor]], strategy: str) -> None:
    objective = _tiny_objective()
    before = {name: p.detach().clone() for name, p in objective.named_parameters()}
    tokens, w = _tokens()
    _sgd_step(objective, objective, tokens, w)
    prefix = f"{strategy}."
    per_rank = [{k[len(prefix) :]: v for k, v in r.items() if k.startswith(prefix)} for r in ranks]
    assert set(per_rank[0]) == set(before) == set(per_rank[1])
    changed = 0
    for name, p in objective.named_parameters():
        assert torch.equal(per_rank[0][name], per_rank[1][name]), name
        torch.testing.assert_close(per_rank[0][name] - before[name], p.detach() - before[name], rtol=1e-4, atol=1e-7)
        changed += int(not torch.equal(p, before[name]))
    assert changed > 10 and not torch.equal(per_rank[0]["model.logit_scale"], before["model.logit_scale"])


def test_single_process_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    info = D.init_distributed("gloo")
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, torch.device("cpu"))
    assert info.is_main and D.is_main() and D.get_world_size() == 1 and not dist_ready()
    x = torch.randn(3, 2, requires_grad=True)
    assert not D.all_gather_no_grad(x).requires_grad and D.all_gather_with_grad(x) is x
    assert torch.equal(D.reduce_mean(x), x.detach())
    D.barrier()
    D.cleanup()


def test_wrap_model_without_a_group_and_checkpointing() -> None:
    objective = _tiny_objective()
    assert D.wrap_model(objective, "ddp") is objective and D.wrap_model(objective, "fsdp") is objective
    with pytest.raises(ValueError, match="strategy"):
        D.wrap_model(objective, "zero3")  # type: ignore[arg-type]
    assert D.apply_activation_checkpointing(objective) == 1
    assert objective.model.encoder.grad_checkpointing
    assert D.apply_activation_checkpointing(nn.Linear(2, 2)) == 0


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
