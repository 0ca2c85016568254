"""Downloading one file over HTTP(S) so that an interrupted or truncated transfer is never taken as complete.

The bytes go to ``<target>.part``; an interrupted transfer resumes from that file's size with a ``Range`` request
(a server that ignores it sends the whole file again). The file is renamed to ``<target>`` only when its size is
the one the server announced (``Content-Length``, or the total of ``Content-Range``) and, for a zip archive (what
``torch.save`` writes), when its central directory, kept at the very end, can be read.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import IO, Any

from onepeace.errors import OnePeaceError

#: Further attempts after a transfer is cut, each resuming where the last one stopped.
RETRIES = 3
#: Seconds before the first further attempt; doubled for each next one.
RETRY_WAIT = 1.0
#: Seconds without data before an attempt gives up.
TIMEOUT = 60.0
_CHUNK = 1 << 20
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class DownloadError(OnePeaceError):
    """A file could not be downloaded; the message names the URL or file and what went wrong."""


class _Cut(Exception):
    """The connection ended before the whole file arrived; another attempt may resume it."""


def part_file(target: Path) -> Path:
    """Where the bytes of ``target`` collect while it downloads."""
    return target.with_name(target.name + ".part")


def download(url: str, target: Path, *, progress: bool = True, label: str | None = None) -> Path:
    """Fetch ``url`` to ``target`` (resuming ``target.part`` when present) and return ``target``.

    Raises :class:`DownloadError` on a server error, an unreachable host, a transfer that stays short after
    :data:`RETRIES` further attempts, or a file that cannot be written; ``target`` is then left absent (the part
    file is kept only when it holds bytes a later call can resume from).
    """
    part = part_file(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = open(part, "ab")  # noqa: SIM115 (closed below; the lock lives as long as the handle)
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}") from None
    bar, locked = _Bar(label or target.name, progress), False
    try:
        with handle:  # checked and renamed under the lock, so no other process appends in between
            _lock(handle, part)
            locked = True
            total = _fetch_with_retries(url, handle, part, bar)
            _flush(handle, part)
            _check_archive(part, total, url)
            _rename(part, target)
    except BaseException:
        with contextlib.suppress(OSError):
            if locked and part.stat().st_size == 0:  # an empty part file of another process stays
                part.unlink()
        raise
    finally:
        bar.close()
    return target


def _rename(part: Path, target: Path) -> None:
    try:
        os.replace(part, target)
    except OSError as exc:
        raise DownloadError(f"cannot move {part} to {target}: {exc.strerror or exc}") from None


def _fetch_with_retries(url: str, out: IO[bytes], part: Path, bar: _Bar) -> int:
    """Run attempts until the part file holds the whole file; returns the file's size."""
    wait = RETRY_WAIT
    for attempt in range(RETRIES + 1):
        have = out.seek(0, os.SEEK_END)
        try:
            return _attempt(url, out, part, have, bar)
        except _Cut as cut:
            if attempt == RETRIES:
                got = out.seek(0, os.SEEK_END)
                raise DownloadError(
                    f"transfer of {url} cut after {got:,} bytes ({cut}); run the same command again to resume"
                ) from None
        if wait > 0:
            time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


def _attempt(url: str, out: IO[bytes], part: Path, have: int, bar: _Bar) -> int:
    """One request: resume at ``have`` bytes; returns the size of the whole file once it is all in ``out``."""
    headers = {"User-Agent": "onepeace", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return _unsatisfiable(exc, out, have)
        kept = f" ({have:,} bytes kept in {part}; run again to resume)" if have else ""
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}{kept}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
        if have:  # the host went away in the middle of a download: worth another try
            raise _Cut(f"cannot reconnect: {reason}") from None
        raise DownloadError(f"cannot reach {url}: {reason}") from None
    except OSError as exc:  # a timeout or reset before the headers arrived
        raise _Cut(str(exc) or type(exc).__name__) from None
    with response:
        start, total = _extent(response, have, url)
        if start == 0 and have:  # the server sent the whole file again
            out.seek(0)
            out.truncate()
        bar.start(total, start)
        _copy(response, out, part, total - start, bar)
    return total


def _extent(response: Any, have: int, url: str) -> tuple[int, int]:
    """(first byte, size of the whole file) of a response; raises when the size cannot be known."""
    status = getattr(response, "status", None) or 200
    if status == 206:
        match = _RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != have:
            raise DownloadError(
                f"cannot resume {url}: asked for bytes {have}- and got {response.headers.get('Content-Range')!r}"
            )
        return have, int(match.group(3))
    length = response.headers.get("Content-Length")
    if length is None or not length.strip().isdigit():
        raise DownloadError(f"cannot download {url}: the server did not say the file's size (no Content-Length)")
    return 0, int(length)


def _unsatisfiable(exc: urllib.error.HTTPError, out: IO[bytes], have: int) -> int:
    """A 416 answer to ``bytes=have-``: the part file is already whole, or longer than the file and restarted."""
    match = re.fullmatch(r"bytes \*/(\d+)", (exc.headers.get("Content-Range") or "").strip())
    if match and int(match.group(1)) == have:
        return have
    out.seek(0)
    out.truncate()
    raise _Cut("the partial file did not match the server's file; starting again")


def _copy(response: Any, out: IO[bytes], part: Path, count: int, bar: _Bar) -> None:
    """Append ``count`` bytes of ``response`` to ``out``; :class:`_Cut` when fewer arrive."""
    done = 0
    while done < count:
        try:
            chunk = response.read(min(_CHUNK, count - done))
        except OSError as exc:  # reset, timeout, or a short body the HTTP layer noticed itself
            raise _Cut(str(exc) or type(exc).__name__) from None
        except http.client.HTTPException as exc:  # e.g. IncompleteRead of a chunked body, not an OSError
            raise _Cut(type(exc).__name__) from None
        if not chunk:
            raise _Cut(f"the server closed the connection {count - done:,} bytes early")
        try:
            out.write(chunk)
        except OSError as exc:
            raise DownloadError(f"cannot write {part}: {exc.strerror or exc}") from None
        done += len(chunk)
        bar.update(len(chunk))


def _flush(out: IO[bytes], part: Path) -> None:
    try:
        out.flush()
        os.fsync(out.fileno())
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc.strerror or exc}") from None


def _check_archive(part: Path, total: int, url: str) -> None:
    """Refuse a file of the wrong size, or a zip archive whose directory is missing (the server sent too little)."""
    size = part.stat().st_size
    if size != total:
        raise DownloadError(f"download of {url} holds {size:,} bytes, expected {total:,}; run again to resume")
    with open(part, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if not is_zip:
        return
    try:
        zipfile.ZipFile(part).close()
    except (zipfile.BadZipFile, OSError):
        part.unlink()
        raise DownloadError(
            f"{url} is incomplete: the server sent {size:,} bytes as the whole file but the archive's directory "
            "is missing; nothing was kept"
        ) from None


def _lock(handle: IO[bytes], part: Path) -> None:
    """Hold an exclusive lock on the part file so that two processes never append to it at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise DownloadError(f"another process is downloading into {part}; wait for it to finish") from None
        raise


class _Bar:
    """A tqdm progress bar on stderr, created when the size is known and kept across attempts."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self.bar = label, enabled, None

    def start(self, total: int, initial: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=self.label,
                file=sys.stderr, dynamic_ncols=True,
            )  # fmt: skip
        else:
            self.bar.n = initial
            self.bar.refresh()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
