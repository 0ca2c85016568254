"""Run metrics, written by rank 0 only: a JSONL file, a progress bar and optional TensorBoard scalars.

Each line of ``metrics.jsonl`` is one log step: ``step``, every loss term, ``lr``, ``samples_per_s``,
``tokens_per_s``, ``max_memory_mb``, ``skipped`` (records dropped by the data pipeline) and ``elapsed_s`` (wall-clock
seconds since this process opened the log, so a resumed run counts from its restart), plus any extras.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from onepeace.errors import OnePeaceWarning

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def max_memory_mb(device: torch.device | str | None = None) -> float:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` for a CUDA device, else the process's peak RSS."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        import resource
    except ImportError:  # not available on every platform
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def open_tensorboard(log_dir: str | Path) -> Any | None:
    """A TensorBoard ``SummaryWriter`` on ``log_dir``, or None with a warning when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn(
            "tensorboard logging is on but the tensorboard package is not installed; "
            "install it with: pip install 'onepeace[train]' (metrics are still written to metrics.jsonl)",
            OnePeaceWarning,
            stacklevel=2,
        )
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _number(value: Any) -> float:
    return float(value.detach().float().item()) if isinstance(value, torch.Tensor) else float(value)


class MetricsLogger:
    """Appends one JSON object per log step to ``out_dir/metrics.jsonl``; a no-op on ranks other than 0."""

    def __init__(
        self,
        out_dir: str | Path,
        rank: int = 0,
        tensorboard: bool = False,
        device: torch.device | str | None = None,
        filename: str = METRICS_FILE,
    ) -> None:
        self.enabled = rank == 0
        self.device = device
        self.path = Path(out_dir) / filename
        self._file = None
        self._tb = None
        self._opened = time.perf_counter()
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            if tensorboard:
                self._tb = open_tensorboard(Path(out_dir) / TENSORBOARD_DIR)

    def log(
        self,
        step: int,
        losses: Mapping[str, Any],
        lr: float,
        samples: int,
        tokens: int,
        seconds: float,
        skipped: int = 0,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Write one record; ``samples``/``tokens`` were processed in ``seconds`` since the previous record.

        Loss values may be floats or scalar tensors. Returns the record (None on other ranks).
        """
        if not self.enabled:
            return None
        rate = 1.0 / seconds if seconds > 0 else math.nan
        record: dict[str, Any] = {"step": int(step)}
        record.update({name: _number(value) for name, value in losses.items()})
        record.update(
            lr=float(lr),
            samples_per_s=samples * rate,
            tokens_per_s=tokens * rate,
            max_memory_mb=max_memory_mb(self.device),
            skipped=int(skipped),
            elapsed_s=round(time.perf_counter() - self._opened, 3),
        )
        record.update({name: _number(v) if isinstance(v, torch.Tensor) else v for name, v in (extra or {}).items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{name}", value, step)
        return record

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


class _NullBar:
    """Stands in for a progress bar on ranks other than 0."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(total: int | None, rank: int = 0, initial: int = 0, desc: str = "train", **kwargs: Any) -> Any:
    """A tqdm bar over updates on rank 0 (starting at ``initial`` when resuming); a silent stand-in elsewhere."""
    if rank != 0:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, **kwargs)
