"""Records of the pretraining loader and the TSV source (spec §6.1, §6.5).

A source hands raw :class:`Record` s to a maker object (see :class:`RecordMaker`) that decodes them and builds
the model-ready example with a per-slot random generator, so every example is a pure function of
``(seed, epoch, slot)`` regardless of worker scheduling. Tar shards live in :mod:`.pretrain_shards`.

TSV epoch layout (spec §6.5): record ids are shuffled with ``seed + epoch``; consecutive ids form batches of
``batch_size`` that are dealt to ranks in turn; leading ids are repeated so that every rank gets the same number
of full batches (the repeats are flagged as duplicates).

A record that cannot be used is replaced by the next usable one (here: the next row in file order). The
replacement counts as a duplicate, and the failure is counted under its reason in the ``skipped`` counts of the
example that took its slot. Failures are counted only for the slot a record owns (not for duplicate slots or
look-ahead reads), so an epoch's counts equal the number of bad records.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Dataset, Sampler

from onepeace.errors import InputError


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is the short name it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One raw pair: ``media`` is a file path (TSV) or the encoded file bytes (shards)."""

    key: str
    text: str
    media: str | bytes


class RecordMaker(Protocol):
    """Turns records into examples: ``decode`` raises :class:`BadRecord`; ``build`` draws from ``rng``."""

    def decode(self, record: Record) -> Any: ...

    def build(self, decoded: Any, rng: np.random.Generator, duplicate: bool, skipped: dict[str, int]) -> Any: ...


def add_count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def try_decode(maker: RecordMaker, parse: Callable[[], Record]) -> Any:
    """``maker.decode(parse())``, or the :class:`BadRecord` raised on the way."""
    try:
        return maker.decode(parse())
    except BadRecord as exc:
        return exc


# ---------------------------------------------------------------------------------------------------- TSV
def _scan_lines(path: str) -> tuple[list[str], np.ndarray]:
    """Header fields and the byte offsets ``int64 [rows]`` of the non-empty data lines of a TSV file."""
    with open(path, "rb") as f:
        header = f.readline()
        starts, pos, last = [np.array([len(header)], dtype=np.int64)], len(header), header[-1:]
        while chunk := f.read(1 << 22):
            starts.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10).astype(np.int64) + pos + 1)
            pos, last = pos + len(chunk), chunk[-1:]
    offsets = np.concatenate(starts)
    offsets = offsets[offsets < pos]
    lengths = np.append(offsets[1:], pos) - offsets
    keep = lengths > 1  # a 1-byte line is a bare newline, unless it is a last line without one
    if last != b"\n" and lengths.size:
        keep[-1] = True
    fields = header.decode("utf-8").rstrip("\r\n").split("\t")
    return fields, offsets[keep]


class TsvIndex:
    """Map-style access to the rows of one or more TSV files with a header row (spec §6.1).

    Only byte offsets are kept in memory (``int64`` per row); rows are read on demand. ``columns`` names the
    id, media and text columns; media paths are resolved against ``root`` (default: each TSV's directory).
    """

    def __init__(self, paths: Sequence[str], columns: tuple[str, str, str], root: str | None = None) -> None:
        if not paths:
            raise InputError("no TSV files given")
        self.paths = [os.fspath(p) for p in paths]
        self.roots = [root if root else os.path.dirname(os.path.abspath(p)) for p in self.paths]
        self.columns, self._where, offsets = columns, [], []
        self._files: dict[int, Any] = {}
        self._owner = os.getpid()
        for file_id, path in enumerate(self.paths):
            if not os.path.isfile(path):
                raise InputError(f"TSV file {path!r} not found")
            header, rows = _scan_lines(path)
            missing = [c for c in columns if c not in header]
            if missing:
                raise InputError(f"TSV file {path!r} lacks the column(s) {missing}; its header is {header}")
            self._where.append((len(header), [header.index(c) for c in columns]))
            offsets.append(np.stack([np.full(rows.size, file_id, dtype=np.int64), rows], axis=1))
        self._offsets = np.concatenate(offsets)

    def __len__(self) -> int:
        return int(self._offsets.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}  # open handles stay in the process that opened them

    def record(self, i: int) -> Record:
        """The ``i``-th row as a :class:`Record`; raises :class:`BadRecord` ``"bad_row"`` for a malformed row."""
        file_id, offset = (int(v) for v in self._offsets[i])
        if self._owner != os.getpid():  # a forked worker must not share the parent's file positions
            self._files, self._owner = {}, os.getpid()
        handle = self._files.get(file_id)
        if handle is None:
            handle = self._files[file_id] = open(self.paths[file_id], "rb")
        handle.seek(offset)
        try:
            line = handle.readline().decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise BadRecord("bad_row", f"row {i} is not UTF-8") from exc
        width, (id_col, media_col, text_col) = self._where[file_id]
        fields = line.split("\t", width - 1)
        if len(fields) < width:
            raise BadRecord("bad_row", f"row {i} has {len(fields)} fields, the header {width}")
        media = os.path.join(self.roots[file_id], fields[media_col])
        return Record(key=fields[id_col], text=fields[text_col], media=media)

    def text_groups(self) -> np.ndarray:
        """Caption group ids ``int64 [rows]``: rows with the same (stripped) text share an id; a malformed row
        is a group of its own. Reads every row once."""
        ids: dict[str, int] = {}
        groups = np.empty(len(self), dtype=np.int64)
        for i in range(len(self)):
            try:
                text = self.record(i).text.strip()
            except BadRecord:
                text = f"\0row {i}"  # no caption can equal this key
            groups[i] = ids.setdefault(text, len(ids))
        return groups


def cap_groups(order: np.ndarray, groups: np.ndarray, cap: int) -> np.ndarray:
    """The ids of ``order`` (``int64 [N]``) preceded there by fewer than ``cap`` ids of their own group
    (``groups[id]``); the order is kept. With a shuffled ``order`` this keeps a random ``cap`` rows per group."""
    g = groups[order]
    by_group = np.argsort(g, kind="stable")  # positions grouped, each group in order of appearance
    sorted_g = g[by_group]
    starts = np.flatnonzero(np.r_[True, sorted_g[1:] != sorted_g[:-1]])
    sizes = np.diff(np.r_[starts, g.size])
    rank = np.empty(g.size, dtype=np.int64)
    rank[by_group] = np.arange(g.size) - np.repeat(starts, sizes)
    return order[rank < cap]


@dataclass(frozen=True)
class Slot:
    """One place of a batch: the record to read, its position in the epoch (seeds its randomness), and
    whether it repeats a record to even out ranks."""

    index: int
    position: int
    duplicate: bool


class EpochBatchSampler(Sampler[list[Slot]]):
    """This rank's batches of one epoch (spec §6.5), optionally starting after ``skip_batches`` batches.

    With ``groups`` (``int64 [num_records]``, e.g. :meth:`TsvIndex.text_groups`) and ``max_per_group``, an epoch
    uses at most that many records of each group, drawn afresh every epoch (:func:`cap_groups`); the number of
    batches is then the same in every epoch.
    """

    def __init__(
        self,
        num_records: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        skip_batches: int = 0,
        groups: np.ndarray | None = None,
        max_per_group: int | None = None,
    ) -> None:
        if num_records < 1:
            raise InputError("the dataset has no records")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        order = np.random.default_rng(seed + epoch).permutation(num_records)
        if max_per_group is not None:
            if groups is None or len(groups) != num_records or max_per_group < 1:
                raise ValueError("max_per_group needs max_per_group >= 1 and one group id per record")
            order = cap_groups(order, np.asarray(groups), max_per_group)
        per_step = batch_size * world_size
        self.num_batches = -(-order.size // per_step)
        if not 0 <= skip_batches <= self.num_batches:
            raise ValueError(f"skip_batches must lie in [0, {self.num_batches}], got {skip_batches}")
        padded = np.resize(order, self.num_batches * per_step)  # repeats the leading ids
        self._ids, self._num_records = padded, order.size
        self.batch_size, self.rank, self.world_size, self.skip_batches = batch_size, rank, world_size, skip_batches

    def __len__(self) -> int:
        return self.num_batches - self.skip_batches

    def __iter__(self) -> Iterator[list[Slot]]:
        for k in range(self.skip_batches, self.num_batches):
            start = (k * self.world_size + self.rank) * self.batch_size
            yield [Slot(int(self._ids[p]), p, p >= self._num_records) for p in range(start, start + self.batch_size)]


class TsvPretrainDataset(Dataset):
    """Examples of a :class:`TsvIndex`, indexed by :class:`Slot` (use with :class:`EpochBatchSampler`)."""

    def __init__(self, index: TsvIndex, maker: RecordMaker, seed: int, epoch: int, max_substitutes: int = 64) -> None:
        self.index, self.maker, self.seed, self.epoch = index, maker, seed, epoch
        self.max_substitutes = max_substitutes

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, slot: Slot) -> Any:
        rng = np.random.default_rng([self.seed, self.epoch, 0, slot.position])
        skipped: dict[str, int] = {}
        decoded = try_decode(self.maker, lambda: self.index.record(slot.index))
        if not isinstance(decoded, BadRecord):
            return self.maker.build(decoded, rng, slot.duplicate, skipped)
        if not slot.duplicate:
            add_count(skipped, decoded.reason)
        n = len(self.index)
        tries = min(self.max_substitutes, n - 1)
        for k in range(1, tries + 1):
            index = (slot.index + k) % n
            decoded = try_decode(self.maker, lambda i=index: self.index.record(i))
            if not isinstance(decoded, BadRecord):
                return self.maker.build(decoded, rng, True, skipped)
        raise InputError(f"no usable record among row {slot.index} of the TSV data and the {tries} rows after it")
