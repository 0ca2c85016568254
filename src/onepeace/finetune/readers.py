"""Readers of the official downstream-task TSV files (spec §6.1) into typed rows.

A file is UTF-8 text with a header row; columns are selected by header name and every data line is split on tab
into at most ``#header`` fields (so the last column may contain tabs). Empty lines are skipped. Several files are
read as one concatenated table. Media paths are resolved against ``root`` when given, else against the directory
of their TSV file (absolute paths are kept), and normalised (``a/../b`` -> ``b``). The ``duration`` column of the
audio layouts is not needed.

Every malformed row raises ``ValueError`` naming the file, the line number (the header is line 1) and the problem.
A row's ``id`` is its ``uniq_id`` / ``image_id``, or for layouts without one (RefCOCO, ImageNet) its 0-based
position in the concatenated table.

Parsed fields:

* VQA ``refs``: items joined by ``&&``, each ``answer|!+answer_id|!+confidence`` -> ``{answer_id: confidence}``
  (an empty ``refs`` gives ``{}``, e.g. test splits without answers).
* NLVR2 ``label``: ``True`` -> 0, ``False`` -> 1.
* RefCOCO ``region_coord``: ``x0,y0,x1,y1`` in pixels with ``x0 < x1`` and ``y0 < y1``.
* AQA ``text``: ``question&&&a1&&&a2&&&a3&&&a4&&&choice``. ``choice`` is read as the 0-based index of the correct
  answer when it is one of ``0, 1, 2, 3``; otherwise it must equal (after stripping spaces) the text of one of the
  answers, and the first such answer is the correct one.
* FSD50K ``refs``: comma-separated class ids; VGGSound ``text``: one class id (both 0-based).
* ImageNet ``label``: 1..C -> 0-based index.
* ESC-50 (zero-shot) ``text``: the class name; ``label`` is its index in the sorted distinct class names of all the
  files read (:func:`read_class_names`).
* Retrieval: ``group`` numbers the distinct media paths in order of first appearance.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from onepeace.finetune.tasks import TaskKind, TaskSpec

PathLike = str | os.PathLike
VQA_ITEM_SEP = "&&"
VQA_FIELD_SEP = "|!+"
AQA_SEP = "&&&"
AQA_NUM_CHOICES = 4


@dataclass(frozen=True)
class RetrievalRow:
    """Image-text or audio-text pair; ``group`` is the id of the media path (rows sharing it share the id)."""

    id: str
    media: str
    text: str
    group: int


@dataclass(frozen=True)
class ZeroShotRow:
    """Zero-shot classification clip: ``label`` indexes the sorted distinct class names."""

    id: str
    media: str
    class_name: str
    label: int


@dataclass(frozen=True)
class ClassifyRow:
    """One media item with one 0-based class index (VGGSound, ImageNet)."""

    id: str
    media: str
    label: int


@dataclass(frozen=True)
class MultiLabelRow:
    """One clip with its sorted distinct 0-based class indices (FSD50K)."""

    id: str
    media: str
    labels: tuple[int, ...]


@dataclass(frozen=True)
class AqaRow:
    """Audio question with ``AQA_NUM_CHOICES`` answers; ``label`` is the index of the correct one."""

    id: str
    media: str
    question: str
    answers: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class VqaRow:
    """Image question; ``refs`` maps answer ids to their confidence (the soft target)."""

    id: str
    media: str
    question: str
    refs: Mapping[int, float]


@dataclass(frozen=True)
class Nlvr2Row:
    """Statement about two images; ``label`` 0 = True, 1 = False."""

    id: str
    text: str
    media: str
    media2: str
    label: int


@dataclass(frozen=True)
class GroundingRow:
    """Referring expression and its box ``(x0, y0, x1, y1)`` in pixels of the original image."""

    id: str
    media: str
    text: str
    box: tuple[float, float, float, float]


TaskRow = RetrievalRow | ZeroShotRow | ClassifyRow | MultiLabelRow | AqaRow | VqaRow | Nlvr2Row | GroundingRow


class _RowError(Exception):
    """A problem of one row; the reader adds the file and line."""


@dataclass(frozen=True)
class _Line:
    """One data line: its fields by column name, its position in the table, and where media paths resolve."""

    fields: Mapping[str, str]
    position: int
    root: str
    num_classes: int

    def get(self, column: str) -> str:
        return self.fields[column]

    def text(self, column: str) -> str:
        value = self.fields[column].strip()
        if not value:
            raise _RowError(f"empty {column!r}")
        return value

    def media(self, column: str) -> str:
        value = self.fields[column].strip()
        if not value:
            raise _RowError(f"empty media path in column {column!r}")
        return os.path.normpath(value if os.path.isabs(value) else os.path.join(self.root, value))

    def row_id(self, column: str | None) -> str:
        return self.text(column) if column is not None else str(self.position)


def _int(value: str, what: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise _RowError(f"{what} {value!r} is not an integer") from None


def _float(value: str, what: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise _RowError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise _RowError(f"{what} {value!r} is not finite")
    return number


def _class_index(value: str, what: str, num_classes: int, offset: int = 0) -> int:
    """``int(value) - offset``, checked to lie in ``[0, num_classes)`` when ``num_classes > 0``."""
    index = _int(value, what) - offset
    if index < 0 or (num_classes > 0 and index >= num_classes):
        allowed = f"[{offset}, {num_classes - 1 + offset}]" if num_classes > 0 else f"[{offset}, ...)"
        raise _RowError(f"{what} {value.strip()!r} is out of range {allowed}")
    return index


def parse_vqa_refs(refs: str, num_classes: int = 0) -> dict[int, float]:
    """``"ans|!+id|!+conf&&..."`` -> ``{id: conf}``; ids checked against ``num_classes`` (> 0), confidences in
    [0, 1]. An empty string gives ``{}``. Raises ``ValueError`` naming the bad item."""
    out: dict[int, float] = {}
    if not refs.strip():
        return out
    for item in refs.split(VQA_ITEM_SEP):
        parts = item.split(VQA_FIELD_SEP)
        if len(parts) != 3:
            raise ValueError(f"VQA refs item {item!r} is not 'answer{VQA_FIELD_SEP}id{VQA_FIELD_SEP}confidence'")
        try:
            answer_id = _class_index(parts[1], "answer id", num_classes)
            confidence = _float(parts[2], "confidence")
        except _RowError as exc:
            raise ValueError(str(exc)) from None
        if not 0.0 <= confidence <= 1.0:
            raise ValueError(f"confidence {parts[2]!r} of answer {parts[0]!r} is outside [0, 1]")
        out[answer_id] = confidence
    return out


def parse_aqa_text(text: str) -> tuple[str, tuple[str, ...], int]:
    """``"question&&&a1&&&a2&&&a3&&&a4&&&choice"`` -> ``(question, answers, correct index)``; see the module
    docstring for how ``choice`` is read. Raises ``ValueError`` naming the problem."""
    parts = [p.strip() for p in text.split(AQA_SEP)]
    if len(parts) != AQA_NUM_CHOICES + 2:
        raise ValueError(
            f"AQA text must be 'question{AQA_SEP}' + {AQA_NUM_CHOICES} answers + the choice joined by "
            f"{AQA_SEP!r}, got {len(parts)} parts"
        )
    question, answers, choice = parts[0], tuple(parts[1:-1]), parts[-1]
    if not question or not all(answers):
        raise ValueError("AQA question or an answer is empty")
    if choice in {str(k) for k in range(AQA_NUM_CHOICES)}:
        return question, answers, int(choice)
    if choice in answers:
        return question, answers, answers.index(choice)
    raise ValueError(f"AQA choice {choice!r} is neither an index 0..{AQA_NUM_CHOICES - 1} nor one of the answers")


def _box(value: str) -> tuple[float, float, float, float]:
    parts = value.split(",")
    if len(parts) != 4:
        raise _RowError(f"region_coord {value!r} must be 'x0,y0,x1,y1'")
    x0, y0, x1, y1 = (_float(p, "region_coord value") for p in parts)
    if not (x0 < x1 and y0 < y1):
        raise _RowError(f"region_coord {value!r} needs x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def _nlvr2_label(value: str) -> int:
    labels = {"True": 0, "False": 1}
    if value.strip() not in labels:
        raise _RowError(f"label {value!r} must be True or False")
    return labels[value.strip()]


def _multilabel(value: str, num_classes: int) -> tuple[int, ...]:
    items = [v for v in value.split(",") if v.strip()]
    if not items:
        raise _RowError("refs has no class id")
    return tuple(sorted({_class_index(v, "class id", num_classes) for v in items}))


def _wrap(parse: Callable[[str], object], value: str) -> object:
    try:
        return parse(value)
    except ValueError as exc:
        raise _RowError(str(exc)) from None


def _parse_row(spec: TaskSpec, line: _Line) -> TaskRow:
    """One row of ``spec``'s layout (retrieval groups and zero-shot labels are filled in afterwards)."""
    media_col, n = spec.media.value, line.num_classes
    kind = spec.kind
    if kind is TaskKind.RETRIEVAL:
        text_col = "caption" if "caption" in spec.columns else "text"
        return RetrievalRow(line.row_id(spec.columns[0]), line.media(media_col), line.text(text_col), -1)
    if kind is TaskKind.ZERO_SHOT:
        return ZeroShotRow(line.row_id("uniq_id"), line.media(media_col), line.text("text"), -1)
    if kind is TaskKind.CLASSIFY:
        return ClassifyRow(line.row_id("uniq_id"), line.media(media_col), _class_index(line.get("text"), "class id", n))
    if kind is TaskKind.IMAGE_CLASSIFY:
        return ClassifyRow(line.row_id(None), line.media(media_col), _class_index(line.get("label"), "label", n, 1))
    if kind is TaskKind.MULTILABEL:
        return MultiLabelRow(line.row_id("uniq_id"), line.media(media_col), _multilabel(line.get("refs"), n))
    if kind is TaskKind.AQA:
        question, answers, label = _wrap(parse_aqa_text, line.text("text"))  # type: ignore[misc]
        return AqaRow(line.row_id("uniq_id"), line.media(media_col), question, answers, label)
    if kind is TaskKind.VQA:
        refs = _wrap(lambda v: parse_vqa_refs(v, n), line.get("refs"))
        return VqaRow(line.row_id("uniq_id"), line.media(media_col), line.text("question"), refs)  # type: ignore[arg-type]
    if kind is TaskKind.NLVR2:
        media, media2 = line.media("image1"), line.media("image2")
        return Nlvr2Row(line.row_id("uniq_id"), line.text("text"), media, media2, _nlvr2_label(line.get("label")))
    if kind is TaskKind.GROUNDING:
        return GroundingRow(line.row_id(None), line.media(media_col), line.text("text"), _box(line.get("region_coord")))
    raise ValueError(f"no reader for task kind {kind}")


def required_columns(spec: TaskSpec) -> tuple[str, ...]:
    """The columns a file of ``spec`` must have (its official columns without ``duration``)."""
    return tuple(c for c in spec.columns if c != "duration")


def _lines(path: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, {column: field})`` of every non-empty data line of one TSV file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: TSV file not found")
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    try:
        header = raw[0].decode("utf-8").rstrip("\r").split("\t")
    except UnicodeDecodeError:
        raise ValueError(f"{path}, line 1: the header is not UTF-8") from None
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path}, line 1: missing column(s) {missing}; the header is {header}")
    where = {c: header.index(c) for c in columns}
    for number, data in enumerate(raw[1:], start=2):
        try:
            line = data.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise ValueError(f"{path}, line {number}: not UTF-8") from None
        if not line.strip():
            continue
        fields = line.split("\t", len(header) - 1)
        if len(fields) < len(header):
            raise ValueError(f"{path}, line {number}: {len(fields)} tab-separated fields, the header has {len(header)}")
        yield number, {c: fields[i] for c, i in where.items()}


def read_task_tsv(
    spec: TaskSpec, paths: PathLike | Sequence[PathLike], root: PathLike | None = None, num_classes: int | None = None
) -> list[TaskRow]:
    """Rows of the TSV file(s) ``paths`` (concatenated) in the layout of ``spec``.

    ``num_classes`` bounds class and answer ids (default ``spec.num_classes``; 0 = unchecked). Returns
    :class:`RetrievalRow`, :class:`ZeroShotRow`, :class:`ClassifyRow` (CLASSIFY, IMAGE_CLASSIFY),
    :class:`MultiLabelRow`, :class:`AqaRow`, :class:`VqaRow`, :class:`Nlvr2Row` or :class:`GroundingRow` by
    ``spec.kind``. Raises ``ValueError`` ``"<file>, line <n>: <problem>"`` for the first malformed row.
    """
    files = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
    if not files:
        raise ValueError(f"no TSV file given for task {spec.name!r}")
    limit = spec.num_classes if num_classes is None else num_classes
    rows: list[TaskRow] = []
    for path in files:
        base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
        for number, fields in _lines(path, required_columns(spec)):
            try:
                rows.append(_parse_row(spec, _Line(fields, len(rows), base, limit)))
            except _RowError as exc:
                raise ValueError(f"{path}, line {number}: {exc}") from None
    return _finish(rows)


def _finish(rows: list[TaskRow]) -> list[TaskRow]:
    """Fill in retrieval groups (by media path) and zero-shot labels (by sorted class name)."""
    if rows and isinstance(rows[0], RetrievalRow):
        groups: dict[str, int] = {}
        return [replace(r, group=groups.setdefault(r.media, len(groups))) for r in rows]  # type: ignore[union-attr]
    if rows and isinstance(rows[0], ZeroShotRow):
        index = {name: i for i, name in enumerate(class_names(rows))}  # type: ignore[arg-type]
        return [replace(r, label=index[r.class_name]) for r in rows]  # type: ignore[union-attr]
    return rows


def class_names(rows: Sequence[ZeroShotRow]) -> tuple[str, ...]:
    """The sorted distinct class names of zero-shot rows (``row.label`` indexes this tuple)."""
    return tuple(sorted({r.class_name for r in rows}))


def read_class_names(
    spec: TaskSpec, paths: PathLike | Sequence[PathLike], root: PathLike | None = None
) -> tuple[str, ...]:
    """The sorted distinct class names (``text`` column) of the zero-shot TSV file(s) ``paths``."""
    if spec.kind is not TaskKind.ZERO_SHOT:
        raise ValueError(f"task {spec.name!r} is not a zero-shot task")
    return class_names(read_task_tsv(spec, paths, root))  # type: ignore[arg-type]
