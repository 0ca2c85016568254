"""Fine-tuning loop and task evaluation: ``onepeace finetune`` and ``onepeace evaluate TASK`` (spec §8).

One process or ``torchrun`` with DDP or FSDP; the updates, logging, checkpoints and resume are the training core's
(:mod:`onepeace.train.core`), as in pretraining. Rank 0 logs ``metrics.jsonl``, shows a progress bar and writes the
fine-tuned model to ``OUT_DIR/model``; every rank writes its shard of each checkpoint (``OUT_DIR/step_*``) and, when
the recipe names validation data, scores its share of it (the scores go to ``OUT_DIR/eval``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from onepeace.finetune.config import FinetuneConfig
from onepeace.finetune.model import TaskModel
from onepeace.finetune.tasks import TaskKind
from onepeace.finetune.validate import evaluate_task
from onepeace.train.config import dump_recipe


@dataclass(frozen=True)
class FinetuneResult:
    """Where a run ended: its directory, updates done, the saved model and the validation metrics (if any)."""

    out_dir: Path
    step: int
    model_dir: Path | None
    metrics: dict[str, float] | None


def _layer_ids(task: TaskModel):
    """Layer id per parameter name for layer-wise LR decay: the backbone as in pretraining (spec §5.5), the NLVR2
    type embeddings with the adapters (id 0), the head at the top."""
    from onepeace.train.optim import count_layers, layer_id

    top = count_layers((n for n, _ in task.named_parameters()), "model.")
    return lambda name: 0 if name.startswith("type_embeddings.") else layer_id(name, top, "model.")


def _audio_cfg(task: TaskModel, cfg: FinetuneConfig):
    import dataclasses

    return dataclasses.replace(task.model.cfg.audio, max_duration=cfg.data.max_duration)


def build_and_wrap(cfg: FinetuneConfig, dist) -> tuple[TaskModel, torch.nn.Module]:
    """The task model on this rank's device, then wrapped: ``(task, wrapped)``.

    The one place the module is made: build, per-block compile, data-parallel wrap. Under DDP/FSDP with several
    processes it is built on the meta device and each rank materialises only what it holds
    (:func:`onepeace.finetune.build.build_task_for_ranks`), with the values of the eager build.
    """
    from onepeace.finetune.build import build_task_for_ranks
    from onepeace.train.core import maybe_compile
    from onepeace.train.distributed import wrap_kwargs

    return build_task_for_ranks(cfg, dist, lambda m: maybe_compile(m, cfg.compile), **wrap_kwargs(cfg))


def finetune(cfg: FinetuneConfig, resume: str | Path | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model.init_from`` on ``cfg.data.train`` (or continue the run in ``resume``), save the model,
    evaluate on ``cfg.data.valid`` (every rank scores its share)."""
    from onepeace.train.distributed import cleanup, init_distributed

    if not cfg.trains:
        raise ValueError(f"task {cfg.task} is evaluated zero-shot; use: onepeace evaluate {cfg.task}")
    if not cfg.data.train:
        raise ValueError("data.train is empty: give the training TSV file(s)")
    result = _finetune(cfg, resume, init_distributed())
    cleanup()  # the run's modules are unreachable now
    return result


def _finetune(cfg: FinetuneConfig, resume: str | Path | None, dist) -> FinetuneResult:
    from onepeace.finetune.data import build_task_loader
    from onepeace.train import core
    from onepeace.train.optim import build_optimizer
    from onepeace.train.schedule import LRSchedule, resolve_total

    task, wrapped = build_and_wrap(cfg, dist)
    audio_cfg = _audio_cfg(task, cfg)
    first = build_task_loader(cfg, "train", audio_cfg, dist.rank, dist.world_size, epoch=0, device=dist.device)
    optim_cfg = resolve_total(cfg.optim, len(first), cfg.grad_accum)
    optimizer = build_optimizer(task, optim_cfg, layer_id_fn=_layer_ids(task), backbone_prefix="model.")
    trainee = core.Trainee(task, wrapped, optimizer, LRSchedule(optimizer, optim_cfg))
    step, position = core.resume(resume, trainee, dist)
    total = optim_cfg.total_updates if cfg.max_updates is None else min(cfg.max_updates, optim_cfg.total_updates)
    epoch, skip = (position["epoch"], position["batch"]) if position else (0, 0)
    batches = _batches(cfg, audio_cfg, dist, epoch, skip)
    settings = core.CoreSettings.of(cfg, f"finetune {cfg.task}")
    state = core.run(settings, trainee, _compute(task, cfg, dist), batches, dist, step, total)
    out_dir = Path(cfg.out_dir)
    model_dir = _save_model(task, cfg, dist, out_dir / "model", state.step)
    metrics = None
    if cfg.data.valid:  # every rank scores its share
        metrics = evaluate_task(task, cfg, out_dir / "eval", device=dist.device, model_name=str(out_dir / "model"))
    return FinetuneResult(out_dir, state.step, model_dir, metrics)


def _save_model(task: TaskModel, cfg: FinetuneConfig, dist, out: Path, step: int) -> Path | None:
    """Rank 0 writes the task model directory (under FSDP after gathering the full weights, a collective)."""
    from onepeace.finetune.build import save_task_model
    from onepeace.train.distributed import barrier

    state = None
    if cfg.strategy == "fsdp" and dist.world_size > 1:
        from onepeace.train.distributed import full_model_state

        state = full_model_state(task)
    path = None
    if dist.is_main:
        path = save_task_model(task, out, {"recipe": dump_recipe(cfg), "updates": step}, state=state)
    barrier()
    return path


def _batches(cfg: FinetuneConfig, audio_cfg, dist, epoch: int, skip: int):
    """This rank's training batches from ``(epoch, skip)`` on, epoch after epoch (each reshuffled), each with the
    data position after it: ``{"epoch", "batch"}`` (batches of that epoch consumed)."""
    from onepeace.finetune.data import build_task_loader

    while True:
        loader = build_task_loader(
            cfg, "train", audio_cfg, dist.rank, dist.world_size, epoch, device=dist.device, skip_batches=skip
        )
        for i, batch in enumerate(loader, start=skip):
            yield batch, {"epoch": epoch, "batch": i + 1}
        epoch, skip = epoch + 1, 0


def _compute(task: TaskModel, cfg: FinetuneConfig, dist):
    """The core's micro-batch function: the task model's forward and the task loss."""
    from onepeace.finetune.objective import task_loss
    from onepeace.train.core import MicroStep

    retrieval = task.spec.kind is TaskKind.RETRIEVAL
    gather = None
    if retrieval:  # keys without gradient, as on several ranks (one process: the detached local batch)
        from onepeace.train.distributed import all_gather_no_grad as gather

    def compute(wrapped, batch) -> MicroStep:
        out = wrapped(batch)
        scale = task.model.logit_scale_exp() if retrieval else None
        losses = task_loss(task.spec, out, batch, scale, cfg.model.label_smoothing, gather, dist.rank)
        tokens = batch.text.ne(1).sum() if batch.text is not None else 0
        return MicroStep(losses, batch.batch_size, tokens, sum(count for _, count in batch.skipped))

    return compute


def export_task_checkpoint(step_dir: str | Path, out: str | Path) -> Path:
    """The task model of a complete fine-tuning step directory (either layout) as a task model directory."""
    from onepeace.finetune.build import build_task_model, save_task_model
    from onepeace.finetune.config import parse_finetune_recipe
    from onepeace.train.checkpoint import CONFIG, read_checkpoint_weights, read_trainer

    recipe = Path(step_dir) / CONFIG
    text = recipe.read_text()
    task = build_task_model(parse_finetune_recipe(text, source=str(recipe)))
    task.load_state_dict(read_checkpoint_weights(step_dir))
    return save_task_model(task, out, {"recipe": text, "updates": int(read_trainer(step_dir)["step"])})
