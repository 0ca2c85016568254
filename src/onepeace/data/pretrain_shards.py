"""Tar-shard source of the pretraining loader (webdataset layout, spec §6.5 adapted to shards).

A shard is a tar file whose members are grouped into samples by key (``000123.jpg`` + ``000123.txt``). The
shards of an epoch are shuffled with ``seed + epoch`` and dealt to ranks, then to the loader workers of a rank;
each worker streams its own shards. Every worker produces a planned number of full batches
(``ceil(samples / batch_size)``, plus extra batches so that every rank has as many as the busiest rank); when
its shards run out it starts them again, and those repeats are flagged as duplicates.

A bad sample is replaced by the next usable sample of the worker's stream (the replacement is a duplicate) and
its failure is counted as in :mod:`.pretrain_sources`. Skipping the first ``K`` batches of an epoch replays the
loader's worker order without decoding anything, so the remaining batches equal the tail of a full epoch.
``webdataset`` is imported when used (``pip install 'onepeace[train]'``).
"""

from __future__ import annotations

import functools
import glob
import os
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from onepeace.data.pretrain_sources import BadRecord, Record, RecordMaker, add_count, try_decode
from onepeace.errors import InputError, require


def expand_shards(paths: Sequence[str]) -> list[str]:
    """Shard files named by ``paths``: brace ranges (``data-{000..009}.tar``) and glob patterns are expanded."""
    wds = require("webdataset", "train")
    out: list[str] = []
    for spec in paths:
        for name in wds.shardlists.expand_urls(os.fspath(spec)):
            out.extend(sorted(glob.glob(name)) if glob.has_magic(name) else [name])
    if not out:
        raise InputError(f"no shard files match {list(paths)}")
    return out


def count_shard_samples(path: str) -> int:
    """Samples of a tar shard (groups of consecutive members sharing a key), read from its headers only.

    Counts are cached per process for an unchanged file (same size and modification time).
    """
    if not os.path.isfile(path):
        raise InputError(f"shard {path!r} not found")
    stat = os.stat(path)
    return _count_samples(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _count_samples(path: str, size: int, mtime_ns: int) -> int:
    wds = require("webdataset", "train")
    count, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name
                if not member.isreg() or (name.startswith("__") and "/" not in name and name.endswith("__")):
                    continue
                prefix, _ = wds.tariterators.base_plus_ext(name)
                if prefix is not None and prefix != last:
                    count, last = count + 1, prefix
    except tarfile.TarError as exc:
        raise InputError(f"shard {path!r} is not a readable tar file ({exc})") from exc
    return count


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's share of a rank's epoch: its shard files, their sample count, batches to produce."""

    shards: tuple[str, ...]
    num_real: int
    num_batches: int


def plan_shards(
    shards: Sequence[str],
    counts: Sequence[int],
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
) -> list[list[WorkerPlan]]:
    """Deal the shards (shuffled with ``seed + epoch``) to ranks and workers: ``plans[rank][worker]``.

    Each worker produces ``ceil(samples / batch_size)`` batches; ranks with fewer batches than the busiest rank
    get the difference as extra batches on their workers (in turn), which repeat the start of their streams.
    """
    if len(shards) < world_size:
        raise InputError(f"{len(shards)} shard(s) cannot be split over {world_size} ranks: give at least one per rank")
    order = np.random.default_rng(seed + epoch).permutation(len(shards))
    layout = []
    for rank in range(world_size):
        mine = order[rank::world_size]
        groups = [[int(s) for s in mine[w::num_workers]] for w in range(num_workers)]
        real = [sum(counts[s] for s in g) for g in groups]
        layout.append((groups, real, [-(-r // batch_size) for r in real]))
    target = max(sum(batches) for _, _, batches in layout)
    plans = []
    for rank, (groups, real, batches) in enumerate(layout):
        active = [w for w in range(num_workers) if real[w] > 0]
        if not active:
            raise InputError(f"the shards given to rank {rank} hold no samples")
        for k in range(target - sum(batches)):
            batches[active[k % len(active)]] += 1
        plans.append([WorkerPlan(tuple(shards[s] for s in g), r, b) for g, r, b in zip(groups, real, batches)])
    return plans


def batches_taken(num_batches: Sequence[int], skip: int) -> tuple[list[int], int]:
    """Per worker, how many of the first ``skip`` batches it produced, and which worker is next.

    A loader takes batches from its workers in turn, passing over exhausted ones; this replays that order.
    """
    taken, worker, left = [0] * len(num_batches), 0, skip
    if skip > sum(num_batches):
        raise ValueError(f"cannot skip {skip} batches of an epoch of {sum(num_batches)}")
    while left:
        if taken[worker] < num_batches[worker]:
            taken[worker] += 1
            left -= 1
        worker = (worker + 1) % len(num_batches)
    return taken, worker


class _Entry:
    """A raw shard sample and, once tried, its decoded form or :class:`BadRecord`."""

    __slots__ = ("raw", "result")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw, self.result = raw, None


class _Stream:
    """A worker's samples, cycled over its shards, with a look-ahead buffer; tar errors are counted."""

    def __init__(self, shards: Sequence[str], errors: dict[str, int]) -> None:
        self._source, self._buffer, self.errors = self._cycle(tuple(shards)), deque(), errors

    def _cycle(self, shards: tuple[str, ...]) -> Iterator[_Entry]:
        wds = require("webdataset", "train")

        def handler(exc: Exception) -> bool:
            add_count(self.errors, "bad_shard")
            return True

        while shards:
            empty = True
            for raw in wds.tariterators.tarfile_samples([{"url": s} for s in shards], handler=handler):
                empty = False
                yield _Entry(raw)
            if empty:
                return

    def pop(self) -> _Entry | None:
        return self._buffer.popleft() if self._buffer else next(self._source, None)

    def ahead(self, i: int) -> _Entry | None:
        """The ``i``-th sample after the current one (0 = the next), or None when the stream is empty."""
        while len(self._buffer) <= i:
            entry = next(self._source, None)
            if entry is None:
                return None
            self._buffer.append(entry)
        return self._buffer[i]


class ShardPretrainDataset(IterableDataset):
    """One rank's examples from tar shards, streamed by the loader workers (use ``batch_size`` batching).

    Args:
        plans: this rank's :class:`WorkerPlan` per worker (``plan_shards(...)[rank]``); the loader must run
            ``len(plans)`` workers (0 workers counts as one).
        maker: decodes records and builds examples.
        batch_size: examples per batch (the loader's ``batch_size``).
        rank, seed, epoch: seed the per-slot randomness.
        media_keys: member extensions holding the media, first present wins (e.g. ``("jpg", "png", "jpeg")``).
        text_key: member extension holding the caption (UTF-8).
        skip_batches: batches of this rank's epoch to pass over without decoding (exact resume).
        max_substitutes: samples tried after a bad one before giving up.
    """

    def __init__(
        self,
        plans: Sequence[WorkerPlan],
        maker: RecordMaker,
        batch_size: int,
        rank: int,
        seed: int,
        epoch: int,
        media_keys: Sequence[str],
        text_key: str = "txt",
        skip_batches: int = 0,
        max_substitutes: int = 64,
    ) -> None:
        self.plans, self.maker, self.batch_size = list(plans), maker, batch_size
        self.rank, self.seed, self.epoch = rank, seed, epoch
        self.media_keys, self.text_key, self.max_substitutes = tuple(media_keys), text_key, max_substitutes
        self.taken, self.first = batches_taken([p.num_batches for p in self.plans], skip_batches)

    def __len__(self) -> int:
        return sum(p.num_batches - t for p, t in zip(self.plans, self.taken)) * self.batch_size

    def _record(self, raw: dict[str, Any]) -> Record:
        key = str(raw.get("__key__", ""))
        media = next((raw[k] for k in self.media_keys if k in raw), None)
        if media is None:
            raise BadRecord("missing_media", f"sample {key!r} has none of {self.media_keys}")
        if self.text_key not in raw:
            raise BadRecord("missing_text", f"sample {key!r} has no {self.text_key!r}")
        try:
            text = raw[self.text_key].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord("bad_row", f"sample {key!r}: caption is not UTF-8") from exc
        return Record(key=key, text=text, media=media)

    def _decoded(self, entry: _Entry) -> Any:
        if entry.result is None:
            entry.result = try_decode(self.maker, lambda: self._record(entry.raw))
        return entry.result

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        physical, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != len(self.plans):
            raise RuntimeError(f"shards were planned for {len(self.plans)} loader workers, the loader runs {workers}")
        worker = (physical + self.first) % workers  # the loader restarts its worker turn at 0 after a skip
        plan, errors = self.plans[worker], {}
        stream = _Stream(plan.shards, errors)
        for slot in range(plan.num_batches * self.batch_size):
            entry = stream.pop()
            if entry is None:
                raise InputError(f"the shards {list(plan.shards)} yield no samples")
            if slot < self.taken[worker] * self.batch_size:
                errors.clear()  # failures inside skipped batches belong to the run that read them
                continue
            rng = np.random.default_rng([self.seed, self.epoch, 1, self.rank, worker, slot])
            yield self._example(entry, stream, rng, slot >= plan.num_real)

    def _example(self, entry: _Entry, stream: _Stream, rng: np.random.Generator, duplicate: bool) -> Any:
        skipped = dict(stream.errors)
        stream.errors.clear()
        decoded = self._decoded(entry)
        if not isinstance(decoded, BadRecord):
            return self.maker.build(decoded, rng, duplicate, skipped)
        if not duplicate:
            add_count(skipped, decoded.reason)
        for i in range(self.max_substitutes):
            ahead = stream.ahead(i)
            if ahead is None:
                break
            if not isinstance(self._decoded(ahead), BadRecord):
                return self.maker.build(ahead.result, rng, True, skipped)
        raise InputError(
            f"no usable sample among {self.max_substitutes + 1} consecutive samples of {entry.raw.get('__url__')}"
        )
