"""Fine-tuning steps of every trainable task on 2 gloo ranks, and distributed evaluation; run under ``torchrun``.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 dist_finetune_worker.py OUT_DIR``. For
each (task, strategy) of :data:`CASES` every rank trains a freshly built tiny task model for :data:`UPDATES` updates
on its share of the training file (batches of :data:`LOCAL`); rank 0 writes the full weights to
``OUT_DIR/<task>.<strategy>.pt`` (under FSDP gathered with ``full_model_state``). For each case of
:data:`EVAL_CASES` every rank then scores the trained model on its share of :func:`eval_file` with
:func:`onepeace.finetune.validate.evaluate_task`; rank 0 writes the metrics to ``OUT_DIR/<task>.<strategy>.eval.pt``.

The module also holds what :mod:`test_finetune_dist` needs to compute the single-process references with the same
code: :func:`task_config` and :func:`train`.

Setup, identical on every rank and in the reference (why the two must agree exactly, up to float summation order):

* Model: the ``onepeace-tiny`` architecture at random, seeded by the recipe seed (every rank builds the same
  weights), or for retrieval the shipped ``onepeace-small`` (:func:`start_model`); images at 32 px, drop path 0,
  float32, no dropout in the model or the heads.
* Data: the tiny task files. Training shards deal the shuffled rows to the ranks in turn, so the two local
  batches of 4 are the single process's batch of 8. Every random image transform (NLVR2, grounding, ImageNet) draws
  from a generator seeded by the example's index, not by rank or batch; mixup and cutmix are off (they mix within a
  batch). Audio clips are cut to ``max_duration`` 1 s (every tiny clip is at least 0.54 s and shorter clips are
  tiled to 1 s), so no clip is padded: with padding, the zero frames would reach real frames through the
  convolutional position embedding and a clip's features would depend on its batch. Text padding is masked out of
  attention and pooling, so it does not change the real tokens' outputs.
* Losses are per-example means; retrieval gathers the contrastive keys without gradient from every rank, which on
  one process is the detached local batch, so the average of the rank gradients (what DDP and FSDP apply) is the
  single-process gradient of the batch of 8.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from onepeace.finetune.config import FinetuneConfig, load_finetune_recipe
from onepeace.finetune.model import TaskModel
from onepeace.finetune.tasks import TASKS, TaskKind
from onepeace.train import distributed as D

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "tiny"
WORLD, LOCAL, UPDATES = 2, 4, 2
"""Ranks, examples per rank and batch, updates per case; the single process trains on batches of WORLD * LOCAL."""
SAME_KIND_RECIPE = {"flickr30k_retrieval": "coco_retrieval", "clotho_retrieval": "audiocaps_retrieval"}
SAME_KIND_RECIPE["refcoco_plus"] = "refcoco"
TRAINED = tuple(name for name, spec in TASKS.items() if spec.trainable)
"""The 13 trainable tasks."""


def _first_of_each_kind() -> tuple[str, ...]:
    first: dict[TaskKind, str] = {}
    for name in TRAINED:
        first.setdefault(TASKS[name].kind, name)
    return tuple(first.values())


FSDP_TASKS = _first_of_each_kind()
"""The first trainable task of every kind (in registry order)."""
CASES = tuple((task, "ddp") for task in TRAINED) + tuple((task, "fsdp") for task in FSDP_TASKS)
EVAL_CASES = (("coco_retrieval", "ddp"), ("coco_retrieval", "fsdp"), ("imagenet", "ddp"), ("vqa", "fsdp"))
"""Trained cases scored on every rank: retrieval R@k, accuracy, VQA score; DDP passes the plain model, FSDP the
sharded one (its forward is a collective, so the ranks' unequal shares run in lockstep)."""
EVAL_ROWS, EVAL_BATCH = 21, 5
"""Rows of the evaluation file and evaluation batch: rank 0 scores 11 rows in 3 batches, rank 1 10 rows in 2."""


def task_config(task: str, batch: int, eval_dir: Path | None = None) -> FinetuneConfig:
    """The tiny recipe of ``task`` (or of a task of the same kind) set up as in the module docstring."""
    recipe = TINY / f"{SAME_KIND_RECIPE.get(task, task)}.yaml"
    base = load_finetune_recipe(recipe, [f"task={task}"])
    train = [str(ROOT / p) for p in base.data.train]
    overrides = [
        f"task={task}",
        f"model.init_from={start_model(task)}",
        "model.drop_path_rate=0.0",
        "precision=fp32",
        f"data.train=[{','.join(train)}]",
        f"data.valid=[{eval_file(task, eval_dir)}]" if eval_dir is not None else "data.valid=[]",
        f"data.root={Path(train[0]).parent}",
        f"data.batch_size={batch}",
        f"data.eval_batch_size={EVAL_BATCH}",
        "data.num_workers=0",
        "data.image_size=32",
        "data.max_duration=1.0",
        "data.mixup=0.0",
        "data.cutmix=0.0",
        f"max_updates={UPDATES}",
    ]
    return load_finetune_recipe(recipe, overrides)


def start_model(task: str) -> str:
    """``onepeace-tiny`` at random; retrieval starts from the shipped ``onepeace-small`` weights instead.

    At random initialisation every embedding of a retrieval pass is nearly the same vector, so the contrastive
    gradient is a sum of per-example terms that almost cancel: its rounding error, which depends on how the batch
    is split, is as large as the gradient itself, and Adam's normalised step turns that into weight differences of
    the order of the learning rate. Trained weights give distinct embeddings and a well-conditioned gradient.
    """
    return "onepeace-small" if TASKS[task].kind is TaskKind.RETRIEVAL else "onepeace-tiny"


def eval_file(task: str, eval_dir: Path) -> Path:
    """The first :data:`EVAL_ROWS` rows of the task's training file, written once into ``eval_dir``."""
    path = eval_dir / f"{task}.tsv"
    if not path.is_file():
        recipe = load_finetune_recipe(TINY / f"{SAME_KIND_RECIPE.get(task, task)}.yaml", [f"task={task}"])
        lines = (ROOT / recipe.data.train[0]).read_text().splitlines()
        path.write_text("\n".join(lines[: EVAL_ROWS + 1]) + "\n")
    return path


def _layer_ids(task: TaskModel):
    """Layer id per parameter for layer-wise LR decay, as the fine-tuning loop assigns them."""
    from onepeace.train.optim import count_layers, layer_id

    top = count_layers((n for n, _ in task.named_parameters()), "model.")
    return lambda name: 0 if name.startswith("type_embeddings.") else layer_id(name, top, "model.")


def train(
    cfg: FinetuneConfig,
    strategy: str,
    rank: int = 0,
    world: int = 1,
    task: TaskModel | None = None,
    after_backward: Callable[[TaskModel], None] | None = None,
) -> TaskModel:
    """Train :data:`UPDATES` updates on this rank's share; ``after_backward(task)`` is called after every backward.

    The task model is ``task`` wrapped under ``strategy``, or, without ``task``, made as the fine-tuning loop makes
    it (:func:`onepeace.finetune.loop.build_and_wrap`: under a process group built on the meta device, each rank
    materialising its part). Returns the task model (under FSDP the sharded module itself; under DDP the module
    inside the wrapper).
    """
    import dataclasses

    from onepeace.finetune.data import build_task_loader
    from onepeace.finetune.loop import build_and_wrap
    from onepeace.finetune.objective import task_loss
    from onepeace.train.optim import apply_update, build_optimizer
    from onepeace.train.schedule import LRSchedule, resolve_total

    if task is None:
        info = D.DistInfo(rank, world, 0, torch.device("cpu"))
        task, wrapped = build_and_wrap(dataclasses.replace(cfg, strategy=strategy), info)
    else:
        wrapped = D.wrap_model(task, strategy, **D.wrap_kwargs(cfg))  # type: ignore[arg-type]
    audio_cfg = dataclasses.replace(task.model.cfg.audio, max_duration=cfg.data.max_duration)
    loader = build_task_loader(cfg, "train", audio_cfg, rank, world, epoch=0)
    optim_cfg = resolve_total(cfg.optim, len(loader), cfg.grad_accum)
    optimizer = build_optimizer(task, optim_cfg, layer_id_fn=_layer_ids(task), backbone_prefix="model.")
    schedule = LRSchedule(optimizer, optim_cfg)
    retrieval = task.spec.kind is TaskKind.RETRIEVAL
    wrapped.train()
    for _, batch in zip(range(UPDATES), loader):
        out = wrapped(batch)
        scale = task.model.logit_scale_exp() if retrieval else None
        loss = task_loss(task.spec, out, batch, scale, cfg.model.label_smoothing, D.all_gather_no_grad, rank)
        loss.total.backward()
        if after_backward is not None:
            after_backward(task)
        apply_update(task, optimizer, schedule, cfg.optim.clip_grad_norm)
    return task


def full_weights(task: TaskModel, strategy: str) -> dict[str, torch.Tensor]:
    """Every tensor of the task model on rank 0 (a collective under FSDP; empty on the other ranks)."""
    if strategy == "fsdp":
        return D.full_model_state(task)
    return {k: v.detach().clone() for k, v in task.state_dict().items()} if D.is_main() else {}


def main(out_dir: Path) -> None:
    """Run :data:`CASES` and :data:`EVAL_CASES` on this rank; rank 0 saves the results into ``out_dir``."""
    torch.set_num_threads(1)
    info = D.init_distributed("gloo")
    if info.world_size != WORLD:
        raise RuntimeError(f"expected {WORLD} ranks, got {info.world_size}")
    eval_dir = out_dir / "eval_data"
    if info.is_main:
        eval_dir.mkdir(exist_ok=True)
        for task, _ in EVAL_CASES:
            eval_file(task, eval_dir)
    D.barrier()
    _run_cases(info, out_dir, eval_dir)
    D.barrier()
    D.cleanup()  # the models are unreachable now: the process group goes down before interpreter exit


def _run_cases(info: D.DistInfo, out_dir: Path, eval_dir: Path) -> None:
    from onepeace.finetune.validate import evaluate_task

    for task, strategy in CASES:
        cfg = task_config(task, LOCAL, eval_dir)
        model = train(cfg, strategy, info.rank, info.world_size)
        weights = full_weights(model, strategy)
        if info.is_main:
            torch.save(weights, out_dir / f"{task}.{strategy}.pt")
        if (task, strategy) in EVAL_CASES:
            metrics = evaluate_task(model, cfg, out_dir / f"{task}.{strategy}.report", progress=False)
            torch.save(metrics, out_dir / f"{task}.{strategy}.eval.rank{info.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
