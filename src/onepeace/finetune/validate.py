"""Scoring a task model on its evaluation set, on one process or on every rank of a ``torchrun`` job (spec §8.2).

Under a process group each rank reads its contiguous block of the evaluation file (:func:`~onepeace.finetune.data.
shard_indices`: block sizes differ by at most one, nothing is repeated), runs the model on it and the outputs the
metrics need (logits, embeddings, labels, targets, boxes, sizes, group ids) are gathered to every rank in rank order,
which is the file order: the metrics are those of one process over the whole file, no example counted twice or lost.
Without a process group everything stays local. Reports are written by rank 0 only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from onepeace.finetune.batch import TaskBatch
from onepeace.finetune.config import FinetuneConfig
from onepeace.finetune.evaluate import Collected, format_markdown, score
from onepeace.finetune.model import TaskModel
from onepeace.finetune.tasks import TaskKind

#: The :class:`Collected` fields holding per-example rows (gathered across ranks).
ROW_FIELDS = tuple(f.name for f in dataclasses.fields(Collected) if f.name not in ("examples", "skipped"))


def evaluate_task(
    task: TaskModel,
    cfg: FinetuneConfig,
    out_dir: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    model_name: str = "",
    progress: bool = True,
) -> dict[str, float]:
    """Score ``task`` on ``cfg.data.valid``; with ``out_dir``, write ``metrics.json`` and ``metrics.md`` there.

    Under a process group every rank must call it (with the same ``task`` weights, plain or FSDP2-sharded; pass the
    module itself, not a DDP wrapper); each scores its share and all ranks return the same metrics, those of one
    process over the whole file. Rank 0 writes the reports and shows the progress bar.
    """
    from onepeace.finetune.data import build_task_loader
    from onepeace.train.distributed import get_rank, get_world_size
    from onepeace.train.tracking import progress_bar

    if not cfg.data.valid:
        raise ValueError("data.valid is empty: give the evaluation TSV file(s)")
    rank, world = get_rank(), get_world_size()
    audio_cfg = dataclasses.replace(task.model.cfg.audio, max_duration=cfg.data.max_duration)
    loader = build_task_loader(cfg, "valid", audio_cfg, rank, world, epoch=0)
    bar = progress_bar(len(loader), rank if progress else 1, desc=f"evaluate {cfg.task}")
    local = run_model(task, _counted(loader, bar), device, stand_in=lambda: _first_usable(loader))
    bar.close()
    collected = gather_collected(local)
    if collected.examples == 0:
        raise ValueError("the evaluation data gave no usable example")
    prompts = _class_prompts(task, cfg, device) if task.spec.kind is TaskKind.ZERO_SHOT else None
    metrics = score(task.spec, collected, prompts)
    if out_dir is not None and rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = {"task": cfg.task, "model": model_name, "data": list(cfg.data.valid), "metrics": metrics}
        (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "metrics.md").write_text(format_markdown(cfg.task, model_name, metrics))
    return metrics


def _counted(loader: Iterable[TaskBatch], bar) -> Iterator[TaskBatch]:
    for batch in loader:
        yield batch
        bar.update(1)


def _is_sharded(model: torch.nn.Module) -> bool:
    """True for an FSDP2 module: its forward is a collective, so every rank must run the same number of them."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on at least one rank (a collective)."""
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@torch.no_grad()
def run_model(
    model: TaskModel,
    batches: Iterable[TaskBatch],
    device: torch.device | str = "cpu",
    stand_in: Callable[[], TaskBatch] | None = None,
) -> Collected:
    """This rank's outputs over ``batches`` in eval mode (the previous train/eval mode is restored); may be empty.

    An FSDP2-sharded ``model`` under a process group runs in lockstep: while any rank still has a batch, a rank
    without one (its share is shorter, or the batch held only bad records) runs its last batch again, or
    ``stand_in()`` (a batch) when it has none yet, and drops the output.
    """
    import torch.distributed as dist

    lockstep = dist.is_initialized() and dist.get_world_size() > 1 and _is_sharded(model)
    comm = _comm_device()
    was_training = model.training
    model.eval()
    result, spare, source = Collected(), None, iter(batches)
    try:
        while True:
            batch = next(source, None)
            if lockstep:
                if not _any_rank(batch is not None, comm):
                    break
            elif batch is None:
                break
            if batch is not None and batch.batch_size > 0:
                batch = batch.to(device)
                result.add(model(batch), batch)  # counts the examples and the bad records replaced
                spare = batch
                continue
            if batch is not None:  # every record of the batch was unusable
                result.skipped += sum(count for _, count in batch.skipped)
            if lockstep:
                if spare is None and stand_in is None:
                    raise ValueError("a sharded model needs stand_in: this rank has no batch to run in step")
                spare = spare if spare is not None else stand_in().to(device)
                model(spare)
    finally:
        model.train(was_training)
    return result


def _first_usable(loader) -> TaskBatch:
    """A one-example batch of the first usable row of the loader's dataset (a lockstep stand-in)."""
    dataset = loader.dataset
    for index in range(len(dataset)):
        batch = loader.collate_fn([dataset[index]])
        if batch.batch_size > 0:
            return batch
    raise ValueError("the evaluation data gave no usable example")


def _comm_device() -> torch.device:
    """Where tensors must be for the default process group's collectives (CUDA under nccl, else the CPU)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_collected(local: Collected) -> Collected:
    """Every rank's :class:`Collected` joined in rank order, on every rank (a collective under a process group;
    ``local`` itself without one). Ranks may hold different numbers of rows, or none."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    world, comm = dist.get_world_size(), _comm_device()
    rows = {name: torch.cat(getattr(local, name)) if getattr(local, name) else None for name in ROW_FIELDS}
    shapes = {name: None if x is None else (tuple(x.shape), x.dtype) for name, x in rows.items()}
    meta: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(meta, {"shapes": shapes, "examples": local.examples, "skipped": local.skipped})
    out = Collected(examples=sum(m["examples"] for m in meta), skipped=sum(m["skipped"] for m in meta))
    for name in ROW_FIELDS:
        known = [m["shapes"][name] for m in meta if m["shapes"][name] is not None]
        if not known:
            continue
        (shape, dtype), counts = known[0], [0 if m["shapes"][name] is None else m["shapes"][name][0][0] for m in meta]
        mine = rows[name] if rows[name] is not None else torch.empty((0, *shape[1:]), dtype=dtype)
        padded = torch.zeros((max(counts), *shape[1:]), dtype=dtype, device=comm)
        padded[: mine.shape[0]] = mine.to(comm)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        getattr(out, name).append(torch.cat([part[:n] for part, n in zip(parts, counts)]).cpu())
    return out


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
