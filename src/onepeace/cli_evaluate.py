"""``onepeace evaluate TASK``: evaluations of a model; ``retrieval`` runs the held-out corpus protocol.

Heavy modules (torch, the model, matplotlib) are imported only when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def run_retrieval(args: argparse.Namespace) -> int:
    """The ``evaluate retrieval`` command: evaluate, write metrics and plots, print the table and the files."""
    from onepeace.cli_embed import load_model
    from onepeace.evaluate import plots
    from onepeace.evaluate.heldout import load_corpus
    from onepeace.evaluate.report import format_table, write_reports
    from onepeace.evaluate.retrieval import evaluate_retrieval

    data = Path(args.data)
    corpus = load_corpus(data)  # fail on bad data before loading the model
    for run in args.runs:
        plots.metrics_path(run)
    model = load_model(args.model, args.device, None, None)
    report = evaluate_retrieval(
        model, corpus, model_name=args.model, batch_size=args.batch_size, progress=not args.quiet
    )
    written = write_reports(report, args.out)
    written.append(plots.plot_recall_bars(report, Path(args.out) / plots.RECALL_BARS))
    if args.runs:
        written.append(plots.plot_training_curves(args.runs, Path(args.out) / plots.TRAINING_CURVES))
    print(format_table(report))
    print()
    for path in written:
        print(f"wrote {path}")
    return 0


def _add_retrieval(tasks: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = tasks.add_parser(
        "retrieval",
        parents=parents,
        help="held-out retrieval and zero-shot classification on a demo-format corpus",
        description="Evaluate a model on the held-out split of a corpus folder (onepeace data build-demo): "
        "R@1/5/10 with chance levels for image/audio <-> text and audio -> image, and zero-shot accuracy for "
        "each task of tasks.json (protocol: docs/demo_corpus.md). Writes metrics.json, metrics.md and "
        "recall_bars.png into OUT_DIR, plus training_curves.png when --runs are given.",
    )
    p.add_argument("--model", required=True, metavar="PATH_OR_VARIANT", help="official .pt, model folder or variant")
    p.add_argument("--data", required=True, metavar="DIR", help="corpus folder with items_heldout.jsonl")
    p.add_argument(
        "--out",
        default="out/evaluate",
        metavar="OUT_DIR",
        help="folder for the metrics and plots (default out/evaluate)",
    )
    p.add_argument(
        "--runs",
        nargs="+",
        default=[],
        metavar="RUN_DIR",
        help="pretraining run folders whose metrics.jsonl losses are plotted",
    )
    p.add_argument("--batch-size", type=_positive, default=16, metavar="N", help="items per batch (default: 16)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_retrieval)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``evaluate`` with its task subcommands (``retrieval``)."""
    p = sub.add_parser(
        "evaluate",
        parents=parents,
        help="evaluate a model (held-out retrieval, a downstream task, composed queries)",
        description="Evaluate a model. retrieval: the held-out demo-corpus protocol; a task name (vggsound, vqa, "
        "refcoco, ...): that task's metric on its TSV; composed: composed-query retrieval.",
    )
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    _add_retrieval(tasks, parents)
    from onepeace.cli_finetune import add_task_parsers

    add_task_parsers(tasks, parents)
