"""A 2-rank gloo pretraining step (DDP and FSDP2, stages 1 and 2) against one process on the whole batch.

``dist_pretrain_worker.py`` runs one forward + backward of the tiny objective per (stage, strategy) on 2 ranks, each
on its half of a 6-sample batch, and saves losses and full gradients; this module computes the single-process
reference with the same objective and data (see the worker's docstring for the setup) and compares.

What "the same as one process" means here (W = 2 ranks, B = 3 samples per rank):

* Contrastive term (ITC / ATC, spec §5.2, §10 item 11): keys are gathered from all ranks **without gradient**, so
  rank r's loss is the mean over its B queries against all W·B keys. The mean of the W rank losses is the loss of
  one process on the concatenated W·B batch, and the average of the rank gradients (what DDP and FSDP apply) is
  the gradient of that loss with **detached keys**, which is what one process computes: without a process group
  ``all_gather_no_grad`` returns ``x.detach()``. Hit counts add up over ranks.
* Denoising terms (DCL, spec §5.3, §10 item 9): keys are the teacher tokens of the **local** batch only (no
  gather), so the 2-rank step optimises the mean of the DCL losses of the two halves, not the DCL loss of the
  concatenated batch (which has more negatives; the tests check the two differ). The reference DCL term is therefore
  ``mean_r DCL(half_r)``, computed by running the objective on each half.

Reference loss = ``ITC(whole batch, detached keys) + sum_w w * mean_r DCL_w(half_r)``; reference gradient = its
gradient. Compared at atol = rtol = 1e-5: the rank-averaged total loss and terms, every rank's DCL terms, and the
gradient of every parameter that has one (the same set on every rank and in the reference; after DDP / FSDP both
ranks hold the averaged gradient, bit-identical). Stage 2 trains with the text branch frozen (spec §5.6), so text
parameters have no gradient there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dist_pretrain_worker as W
import pytest
import torch
from torchrun import launch

from onepeace.losses.named import NamedLosses

WORKER = Path(__file__).with_name("dist_pretrain_worker.py")
LAUNCH_TIMEOUT_S = 180
TOL = dict(atol=1e-5, rtol=1e-5)
CONTRASTIVE_TERMS = ("itc_loss", "atc_loss")
RUN_IDS = [f"stage{stage}-{strategy}" for stage, strategy in W.RUNS]

Results = dict[str, torch.Tensor]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the reference with one intra-op thread (tiny matrices; extra threads only contend), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[Results]:
    """Launch the worker on 2 gloo ranks once; the per-rank result dicts in rank order."""
    out_dir = tmp_path_factory.mktemp("dist_pretrain")
    launch([str(WORKER), str(out_dir)], W.WORLD, LAUNCH_TIMEOUT_S)
    results = [torch.load(out_dir / f"rank{r}.pt") for r in range(W.WORLD)]
    assert [int(r["rank"]) for r in results] == list(range(W.WORLD))
    return results


class Reference:
    """Single-process reference of one stage: the whole-batch and per-half outputs and the reference gradient.

    Attributes:
        whole: objective output on the whole ``W * B`` batch (contrastive term and hit counts used from it).
        halves: objective outputs on each rank's half (denoising terms used from them).
        loss: the reference :class:`NamedLosses` (contrastive from ``whole``, denoising averaged over ``halves``).
        grads: gradient of ``loss.total`` for every parameter that gets one.
    """

    def __init__(self, stage: int) -> None:
        with _one_thread():
            objective = W.build_tiny_objective(stage)
            batch = W.global_batch(stage)
            self.whole = objective(batch)
            self.halves = [objective(W.rank_slice(batch, r)) for r in range(W.WORLD)]
            terms = {
                name: value if name in CONTRASTIVE_TERMS else self.half_mean(name)
                for name, value in self.whole.terms.items()
            }
            self.loss = NamedLosses.weighted(terms, self.whole.weights)
            self.loss.total.backward()
        self.grads = {n: p.grad.detach().clone() for n, p in objective.named_parameters() if p.grad is not None}

    def half_mean(self, name: str) -> torch.Tensor:
        """Mean of term ``name`` over the per-rank halves (keeps the graph)."""
        return sum(h.terms[name] for h in self.halves) / W.WORLD


@pytest.fixture(scope="module")
def references() -> dict[int, Reference]:
    """The single-process reference of each stage."""
    return {stage: Reference(stage) for stage in sorted({s for s, _ in W.RUNS})}


def _run(ranks: list[Results], stage: int, strategy: str) -> list[Results]:
    """The results of one (stage, strategy) run on each rank, with the run prefix stripped."""
    prefix = f"{stage}.{strategy}."
    return [{k[len(prefix) :]: v for k, v in r.items() if k.startswith(prefix)} for r in ranks]


def _rank_mean(run: list[Results], key: str) -> torch.Tensor:
    return sum(r[key] for r in run) / len(run)


@pytest.mark.dist
@pytest.mark.parametrize(("stage", "strategy"), W.RUNS, ids=RUN_IDS)
def test_loss_and_terms_match_one_process(
    ranks: list[Results], references: dict[int, Reference], stage: int, strategy: str
) -> None:
    ref, run = references[stage], _run(ranks, stage, strategy)
    torch.testing.assert_close(_rank_mean(run, "total"), ref.loss.total.detach(), **TOL)
    names = {k.removeprefix("term.") for k in run[0] if k.startswith("term.")}
    assert names == set(ref.loss.terms)
    for name, value in ref.loss.terms.items():
        torch.testing.assert_close(
            _rank_mean(run, f"term.{name}"), value.detach(), **TOL, msg=lambda m, n=name: f"{n}: {m}"
        )
        if name not in CONTRASTIVE_TERMS:  # denoising is local: rank r's term is that of half r alone
            for rank, half in enumerate(ref.halves):
                torch.testing.assert_close(run[rank][f"term.{name}"], half.terms[name].detach(), **TOL)


@pytest.mark.dist
@pytest.mark.parametrize(("stage", "strategy"), W.RUNS, ids=RUN_IDS)
def test_contrastive_metrics_add_up(
    ranks: list[Results], references: dict[int, Reference], stage: int, strategy: str
) -> None:
    ref, run = references[stage], _run(ranks, stage, strategy)
    for name, value in ref.whole.metrics.items():
        if name.endswith("_ncorrect"):
            assert float(sum(r[f"metric.{name}"] for r in run)) == float(value), name
        else:
            for r in run:
                torch.testing.assert_close(r[f"metric.{name}"], value, **TOL)


@pytest.mark.dist
@pytest.mark.parametrize(("stage", "strategy"), W.RUNS, ids=RUN_IDS)
def test_gradients_match_one_process(
    ranks: list[Results], references: dict[int, Reference], stage: int, strategy: str
) -> None:
    ref, run = references[stage], _run(ranks, stage, strategy)
    grads = [{k.removeprefix("grad."): v for k, v in r.items() if k.startswith("grad.")} for r in run]
    assert set(grads[0]) == set(grads[1]) == set(ref.grads)
    assert len(ref.grads) > 50 and "model.logit_scale" in ref.grads
    if stage == 2:
        assert not any(name.startswith("model.adapters.text.") for name in ref.grads)  # frozen text branch
    for name, expected in ref.grads.items():
        assert torch.equal(grads[0][name], grads[1][name]), f"{name}: ranks hold different averaged gradients"
        torch.testing.assert_close(grads[0][name], expected, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("stage", sorted({s for s, _ in W.RUNS}))
def test_denoising_reference_is_not_the_whole_batch_loss(references: dict[int, Reference], stage: int) -> None:
    """DCL over the concatenated batch (more negatives) is a different number: the half-batch mean is needed."""
    ref = references[stage]
    for name, value in ref.loss.terms.items():
        if name not in CONTRASTIVE_TERMS:
            assert not torch.allclose(ref.whole.terms[name], value, atol=1e-3), name
