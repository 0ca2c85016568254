"""Every trainable fine-tuning task on 2 gloo ranks (DDP, and FSDP2 for one task of each kind) against one process.

``dist_finetune_worker.py`` trains each (task, strategy) of its ``CASES`` for two updates on 2 ranks of 4 examples
and saves the full weights; this module trains the same task model for two updates on one process with batches of
8 (the same code: :func:`dist_finetune_worker.train`) and compares every tensor at 1e-5 (as
``test_finetune_ddp.py``). Why the two must agree up to float summation order (no batch-dependent computation,
identical randomness, the retrieval keys gathered without gradient) is in the worker's docstring. The task models
freeze what their task never reads, so DDP runs without ``find_unused_parameters``.

The worker also scores trained models on every rank over an evaluation file of 21 rows (uneven shares: 11 rows in 3
batches against 10 in 2, so under FSDP the second rank runs a stand-in forward to keep the collectives in step); the
metrics must equal those of one process scoring the saved weights over the whole file. The evaluated tasks read
images and text only (no audio padding, and text padding is masked), so the composition of a batch does not change
an example's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dist_finetune_worker as W
import pytest
import torch
from torchrun import launch

pytestmark = pytest.mark.dist

LAUNCH_TIMEOUT_S = 420
TOL = 1e-5


@dataclass(frozen=True)
class Reference:
    """One process: the weights a task starts from and those after two updates on batches of 8."""

    start: dict[str, torch.Tensor]
    trained: dict[str, torch.Tensor]
    frozen: frozenset[str]
    """Parameters that do not require a gradient."""
    without_gradient: frozenset[str]
    """Trainable parameters left without a gradient by some backward pass (DDP would fail on them)."""


@pytest.fixture(scope="module")
def worker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Launch the worker on 2 gloo ranks once; the directory holding its results."""
    out = tmp_path_factory.mktemp("dist_finetune")
    launch([str(Path(W.__file__)), str(out)], W.WORLD, LAUNCH_TIMEOUT_S)
    return out


@pytest.fixture(scope="module")
def references() -> dict[str, Reference]:
    """Each trained task's single-process run on batches of ``WORLD * LOCAL``."""
    from onepeace.finetune.build import build_task_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for task in W.TRAINED:
            cfg = W.task_config(task, W.WORLD * W.LOCAL)
            model = build_task_model(cfg)
            start = {k: v.clone() for k, v in model.state_dict().items()}
            frozen = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
            missing: set[str] = set()

            def check(m: torch.nn.Module, missing: set[str] = missing) -> None:
                missing.update(n for n, p in m.named_parameters() if p.requires_grad and p.grad is None)

            trained = W.train(cfg, "none", task=model, after_backward=check).state_dict()
            out[task] = Reference(start, trained, frozen, frozenset(missing))
        return out
    finally:
        torch.set_num_threads(before)


def test_cases_cover_every_trainable_task_and_kind() -> None:
    from onepeace.finetune.tasks import TASKS

    trainable = {name for name, spec in TASKS.items() if spec.trainable}
    assert len(trainable) == 13 and set(W.TRAINED) == trainable
    assert {task for task, strategy in W.CASES if strategy == "ddp"} == trainable
    fsdp = [task for task, strategy in W.CASES if strategy == "fsdp"]
    assert {TASKS[t].kind for t in fsdp} == {TASKS[t].kind for t in trainable} and len(fsdp) == 8


@pytest.mark.parametrize("task", W.TRAINED)
def test_every_trainable_parameter_gets_a_gradient(references: dict[str, Reference], task: str) -> None:
    assert references[task].without_gradient == frozenset()


def test_a_joint_pass_freezes_what_follows_the_segment_its_head_does_not_read(references: dict[str, Reference]) -> None:
    """VQA pools the text segment of a text-image pass and RefCOCO the image segment: the other segment's rows
    after the last layer feed nothing, and only retrieval reads the projections and the logit scale."""
    last = "model.encoder.layers.1."  # onepeace-tiny has 2 layers
    ffn = {f"{last}ffn.image.{p}" for p in ("gate.weight", "linear.weight", "norm.weight", "norm.bias")}
    ffn |= {f"{last}ffn.image.out.weight", f"{last}ffn.image.out.bias"}
    projections = {f"model.projections.{m}.{p}" for m in ("text", "image") for p in ("weight", "bias")}
    norms = {"model.encoder.final_norms.image.weight", "model.encoder.final_norms.image.bias"}
    table = {"model.adapters.image.rel_pos.tables.1.weight"}
    assert references["vqa"].frozen == ffn | projections | norms | table | {"model.logit_scale"}
    text_side = {n.replace(".image.", ".text.") for n in ffn | norms | table}
    assert references["refcoco"].frozen == text_side | projections | {"model.logit_scale"}
    assert references["coco_retrieval"].frozen == frozenset()


@pytest.mark.parametrize(("task", "strategy"), W.CASES, ids=[f"{t}-{s}" for t, s in W.CASES])
def test_two_ranks_of_four_give_the_weights_of_one_process_of_eight(
    worker_dir: Path, references: dict[str, Reference], task: str, strategy: str
) -> None:
    ref = references[task].trained
    got = torch.load(worker_dir / f"{task}.{strategy}.pt")
    assert set(got) == set(ref)
    worst = max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)
    print(f"{task} {strategy}: largest weight difference against one process {worst:.2e}")
    assert worst < TOL, worst
    changed = [k for k, v in references[task].start.items() if not torch.equal(v, ref[k])]
    assert len(changed) > 10  # the backbone and the head were trained, identically on both sides


@pytest.mark.parametrize(("task", "strategy"), W.EVAL_CASES, ids=[f"{t}-{s}" for t, s in W.EVAL_CASES])
def test_evaluation_on_every_rank_equals_one_process(worker_dir: Path, task: str, strategy: str) -> None:
    from onepeace.finetune.build import build_task_model
    from onepeace.finetune.validate import evaluate_task

    ranks = [torch.load(worker_dir / f"{task}.{strategy}.eval.rank{r}.pt") for r in range(W.WORLD)]
    assert ranks[0] == ranks[1]
    cfg = W.task_config(task, W.LOCAL, worker_dir / "eval_data")
    model = build_task_model(cfg)
    model.load_state_dict(torch.load(worker_dir / f"{task}.{strategy}.pt"))
    one = evaluate_task(model, cfg, progress=False)
    assert ranks[0] == one
    assert one["examples"] == W.EVAL_ROWS and one["skipped"] == 0
    if task.endswith("_retrieval"):
        assert one["text_queries"] == one["media_queries"] == W.EVAL_ROWS
    report = worker_dir / f"{task}.{strategy}.report" / "metrics.json"
    assert report.is_file()
