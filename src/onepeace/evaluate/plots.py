"""PNG plots of an evaluation: recall bars with chance markers, and training curves of pretraining runs.

matplotlib is optional (``pip install 'onepeace[demo]'``) and imported on use; figures are drawn with the Agg
canvas directly, so the global pyplot backend is never changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onepeace.errors import require
from onepeace.evaluate.retrieval import RetrievalReport

RECALL_BARS = "recall_bars.png"
TRAINING_CURVES = "training_curves.png"
METRICS_FILE = "metrics.jsonl"


def _figure(width: float, height: float, panels: int = 1) -> tuple[Any, list[Any]]:
    """A new Agg-backed figure with ``panels`` side-by-side axes: ``(figure, axes)``."""
    require("matplotlib", "demo")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _bars(ax: Any, groups: list[str], series: list[tuple[str, list[float]]], chance: list[list[float]]) -> None:
    """Grouped bars (percent) with a black chance tick over each bar; room for a legend above 100 %."""
    width = min(0.8 / len(series), 0.5)
    for j, (label, values) in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        ax.bar(xs, [100 * v for v in values], width=width * 0.95, label=label)
        ax.scatter(xs, [100 * c for c in chance[j]], marker="_", s=250, color="black", zorder=3)
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    ax.set_ylim(0, 122)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("percent")


def plot_recall_bars(report: RetrievalReport, path: str | Path) -> Path:
    """R@k per direction (and top-1 accuracy per zero-shot task, when any) with chance markers, as a PNG."""
    directions = [d for d in report.directions if d.absent is None]
    tasks = [z for z in report.zero_shot if z.absent is None]
    fig, axes = _figure(7.5 if not tasks else 11.0, 4.2, 2 if tasks else 1)
    ax = axes[0]
    if directions:
        names = [d.name.replace("->", " -> ") for d in directions]
        series = [(f"R@{k}", [d.recall[k] for d in directions]) for k in report.ks]
        _bars(ax, names, series, [[d.chance[k] for d in directions] for k in report.ks])
        ax.scatter([], [], marker="_", s=250, color="black", label="chance")
        ax.legend(loc="upper center", ncol=len(report.ks) + 1, fontsize="small")
    else:
        ax.text(0.5, 0.5, "no direction evaluated", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("held-out retrieval")
    if tasks:
        _bars(axes[1], [z.task for z in tasks], [("top-1", [z.accuracy for z in tasks])], [[z.chance for z in tasks]])
        axes[1].scatter([], [], marker="_", s=250, color="black", label="chance")
        axes[1].legend(loc="upper center", ncol=2, fontsize="small")
        axes[1].set_title("zero-shot classification")
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def metrics_path(run: str | Path) -> Path:
    """The ``metrics.jsonl`` of a run folder (or the file itself); ``FileNotFoundError`` when there is none."""
    run = Path(run)
    path = run if run.is_file() else run / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in run folder {run}")
    return path


def loss_curves(records: Sequence[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Loss name -> (steps, values) for ``loss`` and every ``*_loss`` key, skipping non-finite values."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int | float):
            continue
        for key, value in record.items():
            if (key == "loss" or key.endswith("_loss")) and isinstance(value, int | float) and math.isfinite(value):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(int(step))
                values.append(float(value))
    return dict(sorted(curves.items(), key=lambda kv: (kv[0] != "loss", kv[0])))


def plot_training_curves(runs: Sequence[str | Path], path: str | Path) -> Path:
    """One panel per run with every loss of its ``metrics.jsonl`` against the update step, as a PNG."""
    from onepeace.train.tracking import read_metrics

    if not runs:
        raise ValueError("give at least one run folder")
    files = [metrics_path(run) for run in runs]
    fig, axes = _figure(4.5 * len(files), 3.8, len(files))
    for ax, run, file in zip(axes, runs, files):
        try:
            curves = loss_curves(read_metrics(file))
        except ValueError as exc:  # json.JSONDecodeError
            raise ValueError(f"{file}: not a metrics file ({exc})") from None
        for name, (steps, values) in curves.items():
            ax.plot(steps, values, label=name, linewidth=2.0 if name == "loss" else 1.2)
        if curves:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no loss values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(Path(run).resolve().name or str(run))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    return _save(fig, path)
