"""Request batching for the server: one worker thread owns the model and embeds queued requests in batches.

Request handlers decode their media first (so a corrupt file never reaches the model) and :meth:`Batcher.submit`
a *job*: one modality and a list of decoded inputs. The worker takes the oldest job, then keeps gathering jobs for
up to ``max_wait_ms`` milliseconds (or until ``max_batch`` inputs), groups them by modality and runs one
embedding call per group. The model's embeddings do not depend on the rest of a batch (audio clips of different
lengths share a batch too), so every answer is the same as embedding the request alone.

The queue holds at most ``max_queue`` jobs; :meth:`Batcher.submit` raises :class:`QueueFull` beyond that, so the
memory held by waiting requests stays bounded. A job whose future was cancelled (its request timed out) is
dropped without running.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EmbedFn = Callable[[str, list[Any]], np.ndarray]
"""``embed_fn(modality, inputs) -> float32 array [len(inputs), D]`` of L2-normalised rows."""


class QueueFull(RuntimeError):
    """The batcher's queue is full: the server is overloaded and the request should be retried later."""


class BatcherStopped(RuntimeError):
    """The batcher is not running (the server is starting or shutting down)."""


@dataclass
class _Job:
    modality: str
    inputs: list[Any]
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters of the worker (read them through :meth:`Batcher.stats`)."""

    batches: int = 0
    items: int = 0
    jobs: int = 0
    rejected: int = 0
    cancelled: int = 0
    failed: int = 0
    max_batch_seen: int = 0


class Batcher:
    """Gather concurrent embedding jobs into batched calls of ``embed_fn`` on one worker thread.

    Args:
        embed_fn: ``(modality, inputs) -> [len(inputs), D]`` float32 array; runs on the worker thread only.
        max_batch: stop gathering once this many inputs are waiting (a single larger job still runs whole).
        max_wait_ms: how long the worker waits for more jobs after the first one arrives.
        max_queue: most jobs waiting at once; :meth:`submit` raises :class:`QueueFull` beyond it.
    """

    def __init__(self, embed_fn: EmbedFn, *, max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self._embed_fn = embed_fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats = BatchStats()

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name="onepeace-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the jobs already queued, then end the worker thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)  # waits only while the queue is full
        except queue.Full:
            return  # the worker is stuck on a job; it is a daemon thread and ends with the process
        thread.join(timeout)

    @property
    def running(self) -> bool:
        """True while the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------------------------------- submit
    def submit(self, modality: str, inputs: Sequence[Any]) -> Future:
        """Queue one job; the future gives a ``[len(inputs), D]`` array or raises the embedding error.

        Raises :class:`QueueFull` when ``max_queue`` jobs are waiting, :class:`BatcherStopped` when not running.
        """
        if not self.running:
            raise BatcherStopped("the embedding worker is not running")
        job = _Job(modality, list(inputs))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._stats.rejected += 1
            raise QueueFull(f"the embedding queue is full ({self.max_queue} requests waiting)") from None
        return job.future

    def stats(self) -> dict[str, Any]:
        """Counters as a JSON-ready dict: batches run, inputs embedded, mean/max batch size, queue depth."""
        with self._lock:
            s = BatchStats(**vars(self._stats))
        return {
            "batches_run": s.batches,
            "items_embedded": s.items,
            "jobs_done": s.jobs,
            "mean_batch_size": round(s.items / s.batches, 3) if s.batches else 0.0,
            "max_batch_size": s.max_batch_seen,
            "jobs_rejected_queue_full": s.rejected,
            "jobs_cancelled": s.cancelled,
            "jobs_failed": s.failed,
            "queue_depth": self._queue.qsize(),
            "queue_capacity": self.max_queue,
        }

    # ------------------------------------------------------------------------------------------- worker
    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """``first`` plus the jobs arriving within ``max_wait_s``; True as second item if a stop was seen."""
        jobs, size = [first], len(first.inputs)
        deadline = time.monotonic() + self.max_wait_s
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            size += len(job.inputs)
        return jobs, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            jobs, stopping = self._gather(first)
            live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            with self._lock:
                self._stats.cancelled += len(jobs) - len(live)
            groups: dict[str, list[_Job]] = {}
            for job in live:
                groups.setdefault(job.modality, []).append(job)
            for modality, group in groups.items():
                self._run_group(modality, group)

    def _call(self, modality: str, inputs: list[Any]) -> np.ndarray:
        out = self._embed_fn(modality, inputs)
        with self._lock:
            self._stats.batches += 1
            self._stats.items += len(inputs)
            self._stats.max_batch_seen = max(self._stats.max_batch_seen, len(inputs))
        return out

    def _run_group(self, modality: str, group: list[_Job]) -> None:
        """One call for the whole group; if it fails, each job runs alone so only the bad one gets the error."""
        try:
            out = self._call(modality, [x for job in group for x in job.inputs])
        except Exception as exc:
            if len(group) == 1:
                self._finish(group[0], error=exc)
                return
            for job in group:
                try:
                    self._finish(job, result=self._call(modality, job.inputs))
                except Exception as single_exc:  # the job's own error goes to its own request
                    self._finish(job, error=single_exc)
            return
        start = 0
        for job in group:
            self._finish(job, result=out[start : start + len(job.inputs)])
            start += len(job.inputs)

    def _finish(self, job: _Job, result: np.ndarray | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            self._stats.jobs += 1
            self._stats.failed += error is not None
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
