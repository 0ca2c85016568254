"""Writing a :class:`~onepeace.evaluate.retrieval.RetrievalReport`: ``metrics.json``, ``metrics.md`` and a
plain-text table for the terminal. Tables show percentages; the JSON keeps fractions in [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

from onepeace.evaluate.retrieval import DirectionResult, RetrievalReport, ZeroShotResult

METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _with_chance(value: float | None, chance: float | None) -> str:
    """``"12.5 (chance 0.8)"``: a percentage with its chance level."""
    return f"{_pct(value)} (chance {_pct(chance)})"


def _direction_cells(d: DirectionResult, ks: tuple[int, ...]) -> list[str]:
    cells = [d.name.replace("->", " -> "), str(d.queries), str(d.gallery)]
    return cells + [_with_chance(d.recall.get(k), d.chance.get(k)) for k in ks]


def _task_cells(z: ZeroShotResult) -> list[str]:
    return [z.task, z.modality, str(z.items), str(z.labels), _pct(z.accuracy), _pct(z.chance)]


def _absent_lines(report: RetrievalReport) -> list[str]:
    lines = [f"{d.name.replace('->', ' -> ')}: {d.absent}" for d in report.directions if d.absent]
    return lines + [f"zero-shot {z.task}: {z.absent}" for z in report.zero_shot if z.absent]


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def format_markdown(report: RetrievalReport) -> str:
    """The content of ``metrics.md``: a retrieval table and a zero-shot table, in percent."""
    lines = [
        "# Held-out retrieval",
        "",
        f"Model `{report.model}` on `{report.data_dir}`. Recall at k in percent, each with the recall a random "
        "ranking would get (docs/demo_corpus.md, evaluation protocol).",
        "",
    ]
    present = [d for d in report.directions if d.absent is None]
    header = ["direction", "queries", "gallery", *(f"R@{k}" for k in report.ks)]
    lines += _markdown_table(header, [_direction_cells(d, report.ks) for d in present]) if present else ["(none)"]
    lines += ["", "## Zero-shot classification", ""]
    tasks = [z for z in report.zero_shot if z.absent is None]
    header = ["task", "modality", "items", "labels", "accuracy", "chance"]
    lines += _markdown_table(header, [_task_cells(z) for z in tasks]) if tasks else ["(none)"]
    absent = _absent_lines(report)
    if absent or report.notes:
        lines += ["", "## Not evaluated", ""] + [f"* {line}" for line in absent + list(report.notes)]
    return "\n".join(lines) + "\n"


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_table(report: RetrievalReport) -> str:
    """A plain-text table of the results (percentages, chance in parentheses) for printing."""
    lines: list[str] = []
    present = [d for d in report.directions if d.absent is None]
    if present:
        header = ["direction", "queries", "gallery", *(f"R@{k}" for k in report.ks)]
        lines += _text_table(header, [_direction_cells(d, report.ks) for d in present])
    tasks = [z for z in report.zero_shot if z.absent is None]
    if tasks:
        header = ["zero-shot task", "modality", "items", "labels", "accuracy", "chance"]
        lines += ([""] if lines else []) + _text_table(header, [_task_cells(z) for z in tasks])
    skipped = _absent_lines(report) + list(report.notes)
    if skipped:
        lines += ([""] if lines else []) + [f"not evaluated: {line}" for line in skipped]
    return "\n".join(lines)


def write_reports(report: RetrievalReport, out_dir: str | Path) -> list[Path]:
    """Write ``metrics.json`` and ``metrics.md`` into ``out_dir`` (created if missing); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / METRICS_JSON, out / METRICS_MD
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(format_markdown(report), encoding="utf-8")
    return [json_path, md_path]
