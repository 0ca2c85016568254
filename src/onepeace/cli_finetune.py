"""``onepeace finetune --task NAME --config RECIPE.yaml`` and ``onepeace evaluate TASK`` / ``evaluate composed``.

Heavy modules are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from onepeace.finetune.tasks import TASKS


def run_finetune(args: argparse.Namespace) -> int:
    """The ``finetune`` command: train, save the model, print the validation metrics."""
    from onepeace.finetune.config import load_finetune_recipe
    from onepeace.finetune.loop import finetune

    cfg = load_finetune_recipe(args.config, args.overrides, task=args.task)
    result = finetune(cfg, resume=args.resume)
    if result.model_dir is None:  # ranks other than 0 print nothing
        return 0
    print(f"finished {cfg.task} after {result.step} updates: model {result.model_dir}")
    if result.metrics is not None:
        print(json.dumps(result.metrics, indent=2))
        print(f"wrote {result.out_dir / 'eval' / 'metrics.json'} and metrics.md")
    return 0


def add_finetune_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "finetune",
        parents=parents,
        help="fine-tune on a downstream task from a recipe",
        description="Fine-tune a model on a downstream task (configs/finetune/*.yaml; docs/finetune.md). "
        "Several processes: torchrun --nproc_per_node N -m onepeace finetune --task NAME --config RECIPE.yaml "
        "strategy=ddp",
    )
    p.add_argument("--task", required=True, choices=sorted(TASKS), metavar="NAME", help="task name")
    p.add_argument("--config", required=True, metavar="RECIPE.yaml", help="the recipe")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue from the latest complete checkpoint in RUN_DIR (a fresh start when it has none)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. optim.lr=1e-4")
    p.set_defaults(handler=run_finetune)


def _task_config(args: argparse.Namespace):
    """The recipe of an evaluation: ``--config`` (with ``--data`` as its validation data) or the defaults."""
    from onepeace.finetune.config import load_finetune_recipe, parse_finetune_recipe

    overrides = [f"data.valid=[{json.dumps(str(args.data))}]", f"data.eval_batch_size={args.batch_size}"]
    overrides += ["data.num_workers=0", f"model.init_from={json.dumps(str(args.model))}"]
    if args.config:
        return load_finetune_recipe(args.config, overrides, task=args.task)
    return parse_finetune_recipe("{}", overrides, task=args.task)


def run_task_evaluation(args: argparse.Namespace) -> int:
    """``evaluate TASK``: a fine-tuned task model (or a backbone for zero-shot tasks) on a task TSV."""
    import dataclasses

    import torch

    from onepeace.finetune.build import build_task_model, is_task_dir, load_task_model, task_classes
    from onepeace.finetune.loop import evaluate_task

    if not Path(args.data).is_file():
        raise FileNotFoundError(f"no such data file: {args.data}")
    cfg = _task_config(args)
    device = torch.device(args.device or "cpu")
    if is_task_dir(args.model):
        task = load_task_model(args.model, device)
        if task.spec.name != cfg.task and task.spec.kind is not cfg.spec.kind:
            raise ValueError(f"{args.model} was fine-tuned for {task.spec.name}, not {cfg.task}")
        image_size = task.model.cfg.image.image_size
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=image_size))
    else:  # one table per layer (the fine-tuning layout) holds a shared table too: it is copied to every layer
        task = build_task_model(cfg).to(device)
    if task.head is not None:  # the head decides the width of the targets
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=task_classes(task)))
    metrics = evaluate_task(task, cfg, args.out, device=device, model_name=str(args.model), progress=not args.quiet)
    width = max(len(name) for name in metrics)
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.4f}")
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'metrics.md'}")
    return 0


def run_composed(args: argparse.Namespace) -> int:
    """``evaluate composed``: the composed-query protocol of :mod:`onepeace.evaluate.composed`."""
    from onepeace.cli_embed import load_model
    from onepeace.evaluate.composed import evaluate_composed, format_composed, read_queries

    queries = read_queries(args.data)
    model = load_model(args.model, args.device, None, None)
    results = evaluate_composed(model, queries, batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"task": "composed", "model": str(args.model), "data": str(args.data), "metrics": results}
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    text = format_composed(results, str(args.model))
    (out / "metrics.md").write_text(text)
    print(text)
    print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
    return 0


def _common(p: argparse.ArgumentParser, data_help: str, batch_size: int) -> None:
    p.add_argument("--model", required=True, metavar="PATH_OR_VARIANT", help="model to evaluate")
    p.add_argument("--data", required=True, metavar="TSV", help=data_help)
    p.add_argument("--out", default="out/evaluate", metavar="OUT_DIR", help="folder for metrics.json and metrics.md")
    p.add_argument("--batch-size", type=int, default=batch_size, metavar="N", help=f"batch size (default {batch_size})")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cpu)")


def add_task_parsers(tasks: Any, parents: list[argparse.ArgumentParser]) -> None:
    """One ``evaluate`` subcommand per task of :data:`TASKS`, plus ``composed``."""
    for name, spec in sorted(TASKS.items()):
        p = tasks.add_parser(
            name,
            parents=parents,
            help=f"{spec.kind.value}: {spec.metric} on {name} data (TSV)",
            description=f"Evaluate on {name} data, a TSV file (columns: {', '.join(spec.columns)}). --model: a "
            "folder written by onepeace finetune, an official fine-tuned .pt, or (zero-shot and retrieval) any model.",
        )
        _common(p, f"{name} TSV file ({', '.join(spec.columns)})", 16)
        p.add_argument("--config", metavar="RECIPE.yaml", help="recipe whose data settings to use (optional)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(handler=run_task_evaluation)
    p = tasks.add_parser(
        "composed",
        parents=parents,
        help="composed-query and cross-modal retrieval (audio+text->image, audio->image, ...)",
        description="Rank every target image of a query TSV (uniq_id, audio, text, image, target) for queries made "
        "of any mix of audio, text and image; R@1/5/10 with chance per query type (docs/finetune.md).",
    )
    _common(p, "query TSV file (uniq_id, audio, text, image, target)", 16)
    p.set_defaults(handler=run_composed)
