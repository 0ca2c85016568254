"""``onepeace checkpoint export RUN_OR_STEP_DIR OUT``: a training checkpoint -> the directory inference reads.

A pretraining checkpoint becomes a native model directory (``onepeace.load``, ``onepeace embed``); a fine-tuning
checkpoint becomes a task model directory (``onepeace evaluate TASK --model OUT``). Sharded checkpoints (runs of
several processes) are read in this one process; the optimizer state is not loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Export the checkpoint at ``path`` (a step directory, or a run directory's latest complete one) to ``out``.

    The recipe saved with the checkpoint decides the kind: one naming a ``task`` is a fine-tuning run.
    """
    from onepeace.errors import CheckpointError
    from onepeace.train.checkpoint import CONFIG, resolve_checkpoint
    from onepeace.train.config import read_mapping

    step_dir = resolve_checkpoint(path)
    if not (step_dir / CONFIG).is_file():
        raise CheckpointError(f"{step_dir} has no {CONFIG}: cannot tell which model it holds")
    raw = read_mapping((step_dir / CONFIG).read_text(), str(step_dir / CONFIG))
    if "task" in raw:
        from onepeace.finetune.loop import export_task_checkpoint

        return export_task_checkpoint(step_dir, out)
    from onepeace.train.export import export_pretrain_checkpoint

    return export_pretrain_checkpoint(step_dir, out)


def _export(args: argparse.Namespace) -> int:
    from onepeace.train.checkpoint import resolve_checkpoint

    step_dir = resolve_checkpoint(args.checkpoint)
    out = export_checkpoint(step_dir, args.out_dir)
    print(f"exported {step_dir} -> {out}")
    return 0


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "checkpoint",
        parents=parents,
        help="work with training checkpoints (export one for inference)",
        description="Training checkpoints (run directories written by pretrain and finetune).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = actions.add_parser(
        "export",
        parents=parents,
        help="write a checkpoint's model as the directory inference reads",
        description="Turn a training checkpoint (single-file or sharded) into a model directory: pretraining -> "
        "the native directory onepeace.load reads; fine-tuning -> the task directory onepeace evaluate reads.",
    )
    e.add_argument("checkpoint", metavar="RUN_OR_STEP_DIR", help="a run directory (its latest checkpoint) or step_*")
    e.add_argument("out_dir", metavar="OUT", help="folder to write (created if missing)")
    e.set_defaults(handler=_export)
