"""Fine-tuning loop and task evaluation: ``onepeace finetune`` and ``onepeace evaluate TASK`` (spec §8).

One process or ``torchrun`` with DDP. Rank 0 logs ``metrics.jsonl``, shows a progress bar, writes the fine-tuned
model to ``OUT_DIR/model`` and, when the recipe names validation data, its scores to ``OUT_DIR/eval``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from onepeace.finetune.config import FinetuneConfig
from onepeace.finetune.model import TaskModel
from onepeace.finetune.tasks import TaskKind
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


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune ``cfg.model.init_from`` on ``cfg.data.train``, save the model, evaluate on ``cfg.data.valid``."""
    from onepeace.finetune.build import build_task_model, save_task_model
    from onepeace.finetune.data import build_task_loader
    from onepeace.train.distributed import barrier, cleanup, init_distributed, wrap_model
    from onepeace.train.optim import build_optimizer
    from onepeace.train.schedule import LRSchedule, resolve_total
    from onepeace.train.tracking import MetricsLogger, progress_bar

    if not cfg.trains:
        raise ValueError(f"task {cfg.task} is evaluated zero-shot; use: onepeace evaluate {cfg.task}")
    if not cfg.data.train:
        raise ValueError("data.train is empty: give the training TSV file(s)")
    dist = init_distributed()
    task = build_task_model(cfg).to(dist.device)
    wrapped = wrap_model(task, cfg.strategy, find_unused_parameters=False)
    audio_cfg = _audio_cfg(task, cfg)
    first = build_task_loader(cfg, "train", audio_cfg, dist.rank, dist.world_size, epoch=0)
    optim_cfg = resolve_total(cfg.optim, len(first), cfg.grad_accum)
    optimizer = build_optimizer(task, optim_cfg, layer_id_fn=_layer_ids(task), backbone_prefix="model.")
    schedule = LRSchedule(optimizer, optim_cfg)
    total = optim_cfg.total_updates if cfg.max_updates is None else min(cfg.max_updates, optim_cfg.total_updates)
    out_dir = Path(cfg.out_dir)
    logger = MetricsLogger(out_dir, dist.rank, False, dist.device)
    bar = progress_bar(total, dist.rank, desc=f"finetune {cfg.task}")
    batches = _forever(cfg, first, audio_cfg, dist)
    step = 0
    try:
        while step < total:
            micro = [next(batches).to(dist.device) for _ in range(cfg.grad_accum)]
            _update(cfg, wrapped, task, optimizer, schedule, micro, logger, step, dist)
            step += 1
            bar.update(1)
    finally:
        bar.close()
        logger.close()
    model_dir = metrics = None
    if dist.is_main:
        model_dir = save_task_model(task, out_dir / "model", {"recipe": dump_recipe(cfg), "updates": step})
        if cfg.data.valid:
            metrics = evaluate_task(task, cfg, out_dir / "eval", device=dist.device, model_name=str(model_dir))
    barrier()
    cleanup()
    return FinetuneResult(out_dir, step, model_dir, metrics)


def _forever(cfg: FinetuneConfig, first, audio_cfg, dist):
    """This rank's training batches, epoch after epoch (each epoch reshuffled)."""
    from onepeace.finetune.data import build_task_loader

    loader, epoch = first, 0
    while True:
        yield from loader
        epoch += 1
        loader = build_task_loader(cfg, "train", audio_cfg, dist.rank, dist.world_size, epoch=epoch)


def _update(cfg, wrapped, task: TaskModel, optimizer, schedule, micro: list, logger, step: int, dist) -> None:
    """One optimizer update over the micro-batches ``micro`` (losses averaged over them)."""
    from onepeace.finetune.objective import task_loss
    from onepeace.train.optim import apply_update

    torch.manual_seed((cfg.seed * 1_000_003 + dist.rank * 7919 + step) % (2**63 - 1))
    wrapped.train()
    start = time.perf_counter()
    sums: dict[str, float] = {}
    gather = None
    if dist.world_size > 1 and task.spec.kind is TaskKind.RETRIEVAL:
        from onepeace.train.distributed import all_gather_no_grad as gather
    for batch in micro:
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = wrapped(batch)
        scale = task.model.logit_scale_exp() if task.spec.kind is TaskKind.RETRIEVAL else None
        losses = task_loss(task.spec, out, batch, scale, cfg.model.label_smoothing, gather, dist.rank)
        (losses.total / len(micro)).backward()
        for name, value in losses.scalars().items():
            sums[name] = sums.get(name, 0.0) + value / len(micro)
    grad_norm, lr = apply_update(task, optimizer, schedule, cfg.optim.clip_grad_norm)
    if (step + 1) % cfg.log_every == 0 or step == 0:
        tokens = int(batch.text.ne(1).sum()) if batch.text is not None else 0
        skipped = sum(count for _, count in batch.skipped)
        extra = {"grad_norm": float(grad_norm)}
        logger.log(
            step + 1, losses.scalars(), lr, batch.batch_size, tokens, time.perf_counter() - start, skipped, extra
        )


def evaluate_task(
    task: TaskModel,
    cfg: FinetuneConfig,
    out_dir: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    model_name: str = "",
    progress: bool = True,
) -> dict[str, float]:
    """Score ``task`` on ``cfg.data.valid``; with ``out_dir``, write ``metrics.json`` and ``metrics.md`` there."""
    from onepeace.finetune.data import build_task_loader
    from onepeace.finetune.evaluate import collect, format_markdown, score
    from onepeace.train.tracking import progress_bar

    if not cfg.data.valid:
        raise ValueError("data.valid is empty: give the evaluation TSV file(s)")
    loader = build_task_loader(cfg, "valid", _audio_cfg(task, cfg), 0, 1, epoch=0)
    bar = progress_bar(len(loader), 0 if progress else 1, desc=f"evaluate {cfg.task}")
    collected = collect(task, _counted(loader, bar), device)
    bar.close()
    prompts = _class_prompts(task, cfg, device) if task.spec.kind is TaskKind.ZERO_SHOT else None
    metrics = score(task.spec, collected, prompts)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = {"task": cfg.task, "model": model_name, "data": list(cfg.data.valid), "metrics": metrics}
        (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "metrics.md").write_text(format_markdown(cfg.task, model_name, metrics))
    return metrics


def _counted(loader, bar):
    for batch in loader:
        yield batch
        bar.update(1)


@torch.no_grad()
def _class_prompts(task: TaskModel, cfg: FinetuneConfig, device) -> torch.Tensor:
    """Zero-shot class embeddings ``[C, D]``: the prompt template filled with each class name, in label order."""
    from onepeace.data.tokenizer import tokenizer_for
    from onepeace.finetune.data import zero_shot_classes, zero_shot_prompts

    names = zero_shot_classes(cfg)
    tokens = tokenizer_for(cfg.data.max_text_tokens)(zero_shot_prompts(names, cfg.data.prompt))
    was_training = task.training
    task.eval()
    try:
        return task.model.encode_text(tokens.to(device)).float().cpu()
    finally:
        task.train(was_training)
